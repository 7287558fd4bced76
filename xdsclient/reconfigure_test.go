package xdsclient

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// reconfigureConfig is the client Config of these tests: node id on server addr.
func reconfigureConfig(t *testing.T, addr, node string, delta bool) Config {
	return Config{
		Server:      addr,
		Delta:       delta,
		Node:        &corev3.Node{Id: node, Cluster: "app.default"},
		BackoffBase: 20 * time.Millisecond,
		BackoffMax:  200 * time.Millisecond,
		Log:         zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
	}
}

// runClient runs c until the test ends.
func runClient(t *testing.T, c *Client) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Run returned %v, want context.Canceled", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
}

// nodeResources is what the control plane serves a node: cluster c and the
// given TCP listeners to it.
func nodeResources(t *testing.T, listeners ...string) map[string][]types.Resource {
	res := map[string][]types.Resource{
		resource.ClusterType: {xdstest.StaticCluster("c", netip.MustParseAddrPort("10.1.0.9:80"))},
	}
	for i, name := range listeners {
		res[resource.ListenerType] = append(res[resource.ListenerType], xdstest.TCPListener(t, name, "0.0.0.0", uint32(8001+i), "c", false))
	}
	return res
}

// counterWatch samples the client's update counters until stopped and
// reports any that went down.
func counterWatch(t *testing.T, c *Client) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	var back []string
	go func() {
		defer close(done)
		prev := c.Stats()
		for {
			select {
			case <-quit:
				return
			case <-time.After(time.Millisecond):
			}
			cur := c.Stats()
			for _, name := range []string{StatCDSUpdateSuccess, StatLDSUpdateSuccess, StatCDSUpdateRejected, StatLDSUpdateRejected, StatUpdateAttempt} {
				if cur[name] < prev[name] {
					mu.Lock()
					back = append(back, name)
					mu.Unlock()
				}
			}
			prev = cur
		}
	}()
	return func() {
		close(quit)
		<-done
		mu.Lock()
		defer mu.Unlock()
		if len(back) > 0 {
			t.Errorf("counters went back during the reconfiguration: %v", back)
		}
	}
}

// TestReconfigureNewNodeKeepsAcceptedState: a running client given a new node
// restarts its stream with it (the control plane then serves that node's
// configuration) and keeps what it accepted meanwhile: no Apply after the
// reconfiguration lacks the listener in force, and its counters only go up.
func TestReconfigureNewNodeKeepsAcceptedState(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		srv := xdstest.NewServer(t)
		srv.Set(t, "node-a", nodeResources(t, "l1"))
		srv.Set(t, "node-b", nodeResources(t, "l1", "l2"))
		rec := &recorder{t: t}
		c := New(reconfigureConfig(t, srv.Addr, "node-a", delta), rec)
		runClient(t, c)
		rec.waitApply(t, wait, "node-a's configuration", func(r *Resources) bool { return r.Listeners["l1"] != nil })
		xdstest.Eventually(t, wait, "LDS ACK", func() bool { return srv.ACKs(ListenerType) > 0 })
		before := c.Stats()
		calls := len(rec.all())

		stop := counterWatch(t, c)
		if err := c.Reconfigure(reconfigureConfig(t, srv.Addr, "node-b", delta)); err != nil {
			t.Fatal(err)
		}
		rec.waitApply(t, wait, "node-b's configuration", func(r *Resources) bool { return r.Listeners["l2"] != nil })
		xdstest.Eventually(t, wait, "node-b's update counted", func() bool {
			return c.Stats()[StatLDSUpdateSuccess] > before[StatLDSUpdateSuccess]
		})
		stop()

		for i, r := range rec.all()[calls:] {
			if r.Listeners["l1"] == nil || r.Clusters["c"] == nil {
				t.Errorf("Apply %d after the reconfiguration dropped the accepted configuration: %s", i, describe(r))
			}
		}
		after := c.Stats()
		if after[StatCDSUpdateSuccess] < before[StatCDSUpdateSuccess] {
			t.Errorf("cds.update_success %d after the new node's update, was %d", after[StatCDSUpdateSuccess], before[StatCDSUpdateSuccess])
		}
		if after[StatConnectedState] != 1 {
			t.Errorf("connected_state %d after the reconfiguration", after[StatConnectedState])
		}
		if err := c.LastError(); err != nil {
			t.Errorf("LastError %v: a reconfiguration is not a failure", err)
		}
		if n := srv.NACKs(); len(n) > 0 {
			t.Errorf("NACKs: %v", n)
		}
	})
}

// TestReconfigureNewServer: a client moved to another control plane takes its
// configuration from there, starting from the one it accepted from the first.
func TestReconfigureNewServer(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		one, two := xdstest.NewServer(t), xdstest.NewServer(t)
		one.Set(t, "node", nodeResources(t, "l1"))
		two.Set(t, "node", nodeResources(t, "l1", "l2"))
		two.Set(t, "node", nodeResources(t, "l1", "l2")) // a version the first server never sent
		rec := &recorder{t: t}
		c := New(reconfigureConfig(t, one.Addr, "node", delta), rec)
		runClient(t, c)
		rec.waitApply(t, wait, "the first server's configuration", func(r *Resources) bool { return r.Listeners["l1"] != nil })
		if err := c.Reconfigure(reconfigureConfig(t, two.Addr, "node", delta)); err != nil {
			t.Fatal(err)
		}
		rec.waitApply(t, wait, "the second server's configuration", func(r *Resources) bool { return r.Listeners["l2"] != nil })
		xdstest.Eventually(t, wait, "the second server's LDS ACK", func() bool { return two.ACKs(ListenerType) > 0 })
	})
}

// TestReconfigureUnusableConfig: a Config Run would refuse is an error from
// Reconfigure, and the stream in force goes on.
func TestReconfigureUnusableConfig(t *testing.T) {
	srv := xdstest.NewServer(t)
	srv.Set(t, "node", nodeResources(t, "l1"))
	rec := &recorder{t: t}
	c := New(reconfigureConfig(t, srv.Addr, "node", false), rec)
	runClient(t, c)
	rec.waitApply(t, wait, "the configuration", func(r *Resources) bool { return r.Listeners["l1"] != nil })
	if err := c.Reconfigure(Config{}); err == nil || err.Error() != "xdsclient: Config.Server is empty" {
		t.Fatalf("Reconfigure(Config{}) = %v, want the empty server named", err)
	}
	bad := reconfigureConfig(t, srv.Addr, "node", false)
	bad.InitialFetchTimeout = -time.Second
	if err := c.Reconfigure(bad); err == nil {
		t.Fatal("Reconfigure with a negative initial fetch timeout: no error")
	}
	// The stream in force still delivers.
	srv.Set(t, "node", nodeResources(t, "l1", "l2"))
	rec.waitApply(t, wait, "an update on the stream in force", func(r *Resources) bool { return r.Listeners["l2"] != nil })
}

// TestReconfigureWakesBackoff: a client waiting out its backoff (its server
// unreachable) connects with a new config at once, not at the end of the wait.
func TestReconfigureWakesBackoff(t *testing.T) {
	srv := xdstest.NewServer(t)
	srv.Set(t, "node", nodeResources(t, "l1"))
	cfg := reconfigureConfig(t, "127.0.0.1:1", "node", false) // nothing listens on port 1
	cfg.BackoffBase, cfg.BackoffMax = time.Hour, time.Hour
	rec := &recorder{t: t}
	c := New(cfg, rec)
	runClient(t, c)
	xdstest.Eventually(t, wait, "the first failed attempt", func() bool { return c.LastError() != nil })
	cfg.Server = srv.Addr
	if err := c.Reconfigure(cfg); err != nil {
		t.Fatal(err)
	}
	rec.waitApply(t, wait, "the configuration from the new server", func(r *Resources) bool { return r.Listeners["l1"] != nil })
}

// TestReconfigureBeforeRun: a Config given before Run replaces New's.
func TestReconfigureBeforeRun(t *testing.T) {
	srv := xdstest.NewServer(t)
	srv.Set(t, "node", nodeResources(t, "l1"))
	rec := &recorder{t: t}
	c := New(reconfigureConfig(t, "127.0.0.1:1", "node", false), rec)
	if err := c.Reconfigure(reconfigureConfig(t, srv.Addr, "node", false)); err != nil {
		t.Fatal(err)
	}
	runClient(t, c)
	rec.waitApply(t, wait, "the configuration from the reconfigured server", func(r *Resources) bool { return r.Listeners["l1"] != nil })
}
