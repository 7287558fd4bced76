package proxy

import (
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/xdsclient"
)

// apis runs f for state of the world and for delta xDS.
func apis(t *testing.T, f func(t *testing.T, api string)) {
	t.Run("sotw", func(t *testing.T) { f(t, "GRPC") })
	t.Run("delta", func(t *testing.T) { f(t, "DELTA_GRPC") })
}

const (
	svc0 = "10.96.0.1_8080" // the listener of service 0
	svc1 = "10.96.0.2_8080" // the listener of service 1
)

// startServing starts a proxy on node with ADS from srv and waits until the
// control plane's configuration for node, svc0's listener among it, is in
// force and acknowledged.
func startServing(t *testing.T, srv *xdstest.Server, node, api string) (*Proxy, string, *adminClient) {
	t.Helper()
	p, path := startProxy(t, bootstrapDoc(node, srv.Addr, api))
	a := newAdminClient(t, p)
	xdstest.Eventually(t, wait, "the first xDS configuration in force", func() bool {
		code, _ := a.get(t, "/ready")
		return code == 200 && a.listeners(t)[svc0] && p.Stats()[xdsclient.StatLDSUpdateSuccess] > 0
	})
	return p, path, a
}

// servingWatch checks every millisecond that listener name is in the
// snapshot in force, until stopped.
func servingWatch(t *testing.T, p *Proxy, name string) (stop func()) {
	var missing atomic.Int64
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			if p.dispatcher.Snapshot().Listener(name) == nil {
				missing.Add(1)
			}
			select {
			case <-quit:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	return func() {
		close(quit)
		<-done
		if n := missing.Load(); n > 0 {
			t.Errorf("listener %s was out of the configuration in force %d times", name, n)
		}
	}
}

// TestReloadSameBootstrap: a reload of an unchanged bootstrap is counted as
// applied and changes nothing else: the xDS stream goes on (the next
// update arrives on it), no listener drains, the counters stay.
func TestReloadSameBootstrap(t *testing.T) {
	apis(t, func(t *testing.T, api string) {
		srv := xdstest.NewServer(t)
		srv.Set(t, "node-a", services(t, 1))
		p, _, a := startServing(t, srv, "node-a", api)
		before := p.Stats()
		stopCounters := monotonic(t, p)
		stopServing := servingWatch(t, p, svc0)

		if err := p.Reload(); err != nil {
			t.Fatalf("Reload: %v", err)
		}
		// Reload returned: a restarted stream would be cut by now, and the
		// next update would come on a new one.
		srv.Set(t, "node-a", services(t, 2))
		xdstest.Eventually(t, wait, "the next update in force", func() bool { return a.listeners(t)[svc1] })
		stopServing()
		stopCounters()

		if n := srv.Streams(); n != 1 {
			t.Errorf("%d xDS streams opened, want 1: the reload restarted the stream", n)
		}
		if got := a.stat(t, statReloadSuccess); got != 1 {
			t.Errorf("%s = %d, want 1", statReloadSuccess, got)
		}
		if got := a.stat(t, statReloadRejected); got != 0 {
			t.Errorf("%s = %d, want 0", statReloadRejected, got)
		}
		if _, dump := a.get(t, "/config_dump"); strings.Contains(dump, "draining_state") {
			t.Errorf("a listener drains after a reload of the same bootstrap:\n%.2000s", dump)
		}
		if got := a.stat(t, xdsclient.StatCDSUpdateSuccess); got < before[xdsclient.StatCDSUpdateSuccess] {
			t.Errorf("cds.update_success %d, was %d", got, before[xdsclient.StatCDSUpdateSuccess])
		}
	})
}

// TestReloadNewNode: a reload that changes the node restarts the xDS
// stream with the new node; the configuration accepted from the old one
// serves until the new stream delivers (its listener never leaves the
// configuration in force, nothing drains), and the update counters go on
// from where they were.
func TestReloadNewNode(t *testing.T) {
	apis(t, func(t *testing.T, api string) {
		srv := xdstest.NewServer(t)
		srv.Set(t, "node-a", services(t, 1))
		srv.Set(t, "node-b", services(t, 2))
		p, path, a := startServing(t, srv, "node-a", api)
		before := p.Stats()
		stopCounters := monotonic(t, p)
		stopServing := servingWatch(t, p, svc0)

		writeFile(t, path, bootstrapDoc("node-b", srv.Addr, api))
		if err := p.Reload(); err != nil {
			t.Fatalf("Reload: %v", err)
		}
		if !a.listeners(t)[svc0] {
			t.Error("the accepted configuration left with the old node's stream")
		}
		xdstest.Eventually(t, wait, "node-b's configuration in force", func() bool { return a.listeners(t)[svc1] })
		xdstest.Eventually(t, wait, "node-b's LDS update counted", func() bool {
			return p.Stats()[xdsclient.StatLDSUpdateSuccess] > before[xdsclient.StatLDSUpdateSuccess]
		})
		stopServing()
		stopCounters()

		if n := srv.Streams(); n != 2 {
			t.Errorf("%d xDS streams opened, want 2 (node-a's, then node-b's)", n)
		}
		if b, _ := p.src.Bootstrap(); b.GetNode().GetId() != "node-b" {
			t.Errorf("bootstrap in force has node %q", b.GetNode().GetId())
		}
		if _, dump := a.get(t, "/config_dump"); strings.Contains(dump, "draining_state") {
			t.Errorf("a listener drains after a reload that changed only the node:\n%.2000s", dump)
		}
		if got := a.stat(t, statReloadSuccess); got != 1 {
			t.Errorf("%s = %d, want 1", statReloadSuccess, got)
		}
		if n := srv.NACKs(); len(n) > 0 {
			t.Errorf("NACKs: %v", n)
		}
	})
}

// TestReloadRejected: a bootstrap that cannot be read, or one that cannot
// be applied (a static listener whose address is taken, xDS settings the
// client refuses) while it also changes the node, is rejected with an error naming the problem and
// counted; the configuration in force serves on, and the xDS client keeps
// its node and its stream: nothing was stopped, so there is nothing to
// restart (the rollback that could fail silently is gone).
func TestReloadRejected(t *testing.T) {
	srv := xdstest.NewServer(t)
	srv.Set(t, "node-a", services(t, 1))
	srv.Set(t, "node-b", services(t, 1))
	p, path, a := startServing(t, srv, "node-a", "GRPC")
	stopCounters := monotonic(t, p)
	stopServing := servingWatch(t, p, svc0)

	writeFile(t, path, []byte("{not a bootstrap"))
	if err := p.Reload(); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("Reload of a broken file: %v, want an error naming %s", err, path)
	}

	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	writeFile(t, path, bootstrapDoc("node-b", srv.Addr, "GRPC", boundListener("taken", taken.Addr().String())))
	if err := p.Reload(); err == nil || !strings.Contains(err.Error(), `listener "taken"`) {
		t.Errorf("Reload with a listener that cannot bind: %v, want an error naming it", err)
	}
	// xDS settings the client would refuse are refused before anything
	// is applied, not found out after the static part is in force.
	doc := bootstrapDoc("node-b", srv.Addr, "GRPC")
	doc["dynamic_resources"].(obj)["cds_config"].(obj)["initial_fetch_timeout"] = "-1s"
	writeFile(t, path, doc)
	if err := p.Reload(); err == nil || !strings.Contains(err.Error(), "initial_fetch_timeout") {
		t.Errorf("Reload with a negative initial_fetch_timeout: %v, want an error naming it", err)
	}
	if got := a.stat(t, statReloadRejected); got != 3 {
		t.Errorf("%s = %d, want 3", statReloadRejected, got)
	}
	if got := a.stat(t, statReloadSuccess); got != 0 {
		t.Errorf("%s = %d, want 0", statReloadSuccess, got)
	}
	if b, _ := p.src.Bootstrap(); b.GetNode().GetId() != "node-a" {
		t.Errorf("bootstrap in force has node %q after rejected reloads", b.GetNode().GetId())
	}
	// The client is still node-a's, on its first stream: node-a's next
	// update arrives.
	srv.Set(t, "node-a", services(t, 2))
	xdstest.Eventually(t, wait, "node-a's next update in force", func() bool { return a.listeners(t)[svc1] })
	stopServing()
	stopCounters()
	if n := srv.Streams(); n != 1 {
		t.Errorf("%d xDS streams opened, want 1: a rejected reload touched the client", n)
	}
}

// TestReloadWithoutADS: a reload to a bootstrap without ADS stops the xDS
// client and drops the dynamic configuration; the xDS counters stay at
// their values (a stopped client is still the process's).
func TestReloadWithoutADS(t *testing.T) {
	srv := xdstest.NewServer(t)
	srv.Set(t, "node-a", services(t, 1))
	p, path, a := startServing(t, srv, "node-a", "GRPC")
	before := p.Stats()[xdsclient.StatLDSUpdateSuccess]
	doc := bootstrapDoc("node-a", srv.Addr, "GRPC")
	delete(doc, "dynamic_resources")
	writeFile(t, path, doc)
	if err := p.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if a.listeners(t)[svc0] {
		t.Error("the dynamic listener is still in force without ADS")
	}
	if code, body := a.get(t, "/ready"); code != 200 {
		t.Errorf("/ready %d %q after a static-only reload", code, body)
	}
	if got := a.stat(t, xdsclient.StatLDSUpdateSuccess); got != before {
		t.Errorf("lds.update_success %d after the client stopped, was %d", got, before)
	}
	if got := a.stat(t, xdsclient.StatConnectedState); got != 0 {
		t.Errorf("connected_state %d after the client stopped", got)
	}
}

// TestReloadKeepsClusterAndListenerCounters: the xDS side of "counters
// survive": a reload that restarts the xDS client (a new node served the
// same resources) keeps the cluster.<name>.* and listener.<addr>.* counters
// of the resources it did not change.
func TestReloadKeepsClusterAndListenerCounters(t *testing.T) {
	up, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns sync.WaitGroup
	defer conns.Wait()
	defer up.Close()
	go func() {
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer conns.Done()
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	listen := netip.MustParseAddrPort(freeAddr(t))
	res := map[string][]types.Resource{
		resource.ClusterType:  {xdstest.StaticCluster("echo", netip.MustParseAddrPort(up.Addr().String()))},
		resource.ListenerType: {xdstest.TCPListener(t, "echo", "127.0.0.1", uint32(listen.Port()), "echo", true)},
	}
	srv := xdstest.NewServer(t)
	srv.Set(t, "node-a", res)
	srv.Set(t, "node-b", res)
	p, path := startProxy(t, bootstrapDoc("node-a", srv.Addr, "GRPC"))
	a := newAdminClient(t, p)
	xdstest.Eventually(t, wait, "the echo listener in force", func() bool { return a.listeners(t)["echo"] })

	roundTrip := func() {
		t.Helper()
		c, err := net.DialTimeout("tcp", listen.String(), wait)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(wait))
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("echo through the proxy: %q, %v", buf, err)
		}
	}
	roundTrip()
	cx := "cluster.echo.upstream_cx_total"
	lx := "listener." + strings.ReplaceAll(listen.String(), ":", "_") + ".downstream_cx_total"
	xdstest.Eventually(t, wait, "the flow counted", func() bool { return a.stat(t, cx) == 1 && a.stat(t, lx) == 1 })

	before := p.Stats()[xdsclient.StatCDSUpdateSuccess]
	writeFile(t, path, bootstrapDoc("node-b", srv.Addr, "GRPC"))
	if err := p.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	xdstest.Eventually(t, wait, "node-b's clusters applied", func() bool {
		return p.Stats()[xdsclient.StatCDSUpdateSuccess] > before
	})
	if n := srv.Streams(); n != 2 {
		t.Fatalf("%d xDS streams, want 2: the reload did not restart the client", n)
	}
	if got := a.stat(t, cx); got != 1 {
		t.Errorf("%s = %d after a reload restarting the xDS client, want 1", cx, got)
	}
	if got := a.stat(t, lx); got != 1 {
		t.Errorf("%s = %d after a reload restarting the xDS client, want 1", lx, got)
	}
	roundTrip()
	xdstest.Eventually(t, wait, "the second flow counted on top", func() bool { return a.stat(t, cx) == 2 && a.stat(t, lx) == 2 })
}
