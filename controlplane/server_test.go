package controlplane

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/xdsclient"
)

// proxyStub is the proxy's xDS client with an applier that validates every
// update with the proxy's own snapshot builder, and remembers what it
// accepted.
type proxyStub struct {
	client *xdsclient.Client
	mu     sync.Mutex
	last   *resources
	n      int
}

func startProxyStub(t *testing.T, addr string, delta bool, nodeID string) *proxyStub {
	t.Helper()
	p := &proxyStub{}
	apply := xdsclient.ApplierFunc(func(_ context.Context, r *xdsclient.Resources) error {
		res := &resources{}
		for _, n := range sortedKeys(r.Listeners) {
			res.Listeners = append(res.Listeners, r.Listeners[n])
		}
		for _, n := range sortedKeys(r.Clusters) {
			res.Clusters = append(res.Clusters, r.Clusters[n])
		}
		for _, n := range sortedKeys(r.Endpoints) {
			res.Endpoints = append(res.Endpoints, r.Endpoints[n])
		}
		for _, n := range sortedKeys(r.Routes) {
			res.Routes = append(res.Routes, r.Routes[n])
		}
		if err := buildInProxy(res); err != nil {
			return err
		}
		p.mu.Lock()
		p.last, p.n = res, p.n+1
		p.mu.Unlock()
		return nil
	})
	p.client = xdsclient.New(xdsclient.Config{Server: addr, Delta: delta, Node: &corev3.Node{Id: nodeID}, Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
		BackoffBase: 20 * time.Millisecond, BackoffMax: 100 * time.Millisecond}, apply)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); p.client.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return p
}

func (p *proxyStub) accepted() *resources {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last
}

// waitFor polls cond for up to d.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func startServer(t *testing.T, reg *Registry, p *Profile) (*Server, string) {
	t.Helper()
	srv := NewServer(reg, p, zerolog.Nop())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); srv.serve(ctx, lis) }()
	t.Cleanup(func() { cancel(); <-done })
	return srv, lis.Addr().String()
}

func names(r *resources) string {
	if r == nil {
		return ""
	}
	var out []string
	for _, l := range r.Listeners {
		out = append(out, "L "+l.GetName())
	}
	for _, c := range r.Clusters {
		out = append(out, "C "+c.GetName())
	}
	for _, e := range r.Endpoints {
		out = append(out, "E "+e.GetClusterName())
	}
	for _, rc := range r.Routes {
		out = append(out, "R "+rc.GetName())
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

func catchAllOf(t *testing.T, r *resources) string {
	if r == nil {
		return ""
	}
	l := findListener(r, virtualOutbound)
	if l == nil {
		return ""
	}
	return tcpCluster(t, l.GetFilterChains()[1])
}

// TestADSServesSwitchesAndForgets runs the proxy's real xDS client, delta
// and state of the world, against the server: the node receives exactly
// what generate gives its class and every update passes the proxy's
// builder (ACK); a profile change reaches it within a second (the
// listeners and the HTTP route configuration's catch-all); a registry
// change too; the node is listed with its ACKs while connected and
// forgotten when it leaves.
func TestADSServesSwitchesAndForgets(t *testing.T) {
	for _, delta := range []bool{true, false} {
		t.Run(map[bool]string{true: "delta", false: "sotw"}[delta], func(t *testing.T) {
			reg := mustRegistry(t, "testdata/registry.yaml")
			def, _ := BuiltinProfile("default")
			srv, addr := startServer(t, reg, def)
			const id = "sidecar~10.1.0.5~app.default~default.svc.cluster.local"
			px := startProxyStub(t, addr, delta, id)

			want := names(generate(reg, &def.Spec, node(t, id, "")))
			if !waitFor(5*time.Second, func() bool { r := px.accepted(); return r != nil && names(r) == want }) {
				t.Fatalf("the proxy never accepted the generated configuration; last error %v; has:\n%v", px.client.LastError(), px.accepted())
			}
			if got, vh := catchAllOf(t, px.accepted()), catchAllVHost(px.accepted(), "80"); got != passthroughCluster || vh != allowAnyVirtualHost {
				t.Fatalf("catch-all %s, HTTP catch-all %q", got, vh)
			}

			// The mode switch flips virtualOutbound's catch-all and, in the
			// route configuration of the HTTP port, allow_any to block_all.
			strict := mustProfile(t, "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n")
			start := time.Now()
			srv.setProfile(strict)
			if !waitFor(time.Second, func() bool {
				return catchAllOf(t, px.accepted()) == blackHoleCluster && catchAllVHost(px.accepted(), "80") == blockAllVirtualHost
			}) {
				t.Fatalf("REGISTRY_ONLY not in force at the proxy 1s after SetProfile (HTTP catch-all %q)", catchAllVHost(px.accepted(), "80"))
			}
			t.Logf("profile change applied by the proxy after %v", time.Since(start))

			more, err := parseRegistry("more.yaml", []byte("services:\n- name: ratings\n  vip: 10.96.0.50\n  ports: [{port: 9080, protocol: TCP}]\n  endpoints: [{address: 10.1.9.9}]\n"))
			if err != nil {
				t.Fatal(err)
			}
			srv.setRegistry(more)
			if !waitFor(time.Second, func() bool {
				r := px.accepted()
				return findListener(r, "10.96.0.50_9080") != nil && findListener(r, "10.96.0.20_9080") == nil
			}) {
				t.Fatalf("the registry change did not reach the proxy within 1s:\n%s", names(px.accepted()))
			}

			// Make before break: version 3 added the new cluster next to the
			// old ones, version 4 (once the node ACKed it) the listeners,
			// version 5 (once it ACKed those) dropped the unused clusters.
			want = names(generate(more, &strict.Spec, node(t, id, "")))
			if !waitFor(time.Second, func() bool { return names(px.accepted()) == want }) {
				t.Fatalf("the removed clusters were never dropped:\n%s", names(px.accepted()))
			}
			st := srv.status()
			if len(st.Nodes) != 1 || st.Nodes[0].ID != id || st.Nodes[0].ACKs == 0 || st.Nodes[0].NACKs != 0 || st.Version != "5" || st.Pending != "" {
				t.Errorf("status %+v", st)
			}
		})
	}
}

// TestADSNodesAndClasses: nodes of different IP families get their own
// snapshot (the IPv6 node binds ::6); a node id that is not an Istio
// sidecar's is refused; a node that disconnects is forgotten.
func TestADSNodesAndClasses(t *testing.T) {
	reg := mustRegistry(t, "testdata/registry.yaml")
	def, _ := BuiltinProfile("default")
	srv, addr := startServer(t, reg, def)

	v6 := startProxyStub(t, addr, true, "sidecar~fd00:1::5~app.default~default.svc.cluster.local")
	if !waitFor(5*time.Second, func() bool { return findListener(v6.accepted(), virtualOutbound) != nil }) {
		t.Fatalf("v6 node got nothing: %v", v6.client.LastError())
	}
	var bind string
	for _, c := range v6.accepted().Clusters {
		if c.GetName() == inboundPassthroughCluster {
			bind = c.GetUpstreamBindConfig().GetSourceAddress().GetAddress()
		}
	}
	if bind != "::6" || findListener(v6.accepted(), virtualOutbound).GetAddress().GetSocketAddress().GetAddress() != "::" {
		t.Errorf("IPv6-only node: bind %q, virtualOutbound %v", bind, findListener(v6.accepted(), virtualOutbound).GetAddress())
	}

	bad := startProxyStub(t, addr, false, "router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local")
	if !waitFor(5*time.Second, func() bool {
		err := bad.client.LastError()
		return err != nil && strings.Contains(err.Error(), `proxy type "router" is not supported`)
	}) {
		t.Errorf("bad node id: last error %v", bad.client.LastError())
	}
	if bad.accepted() != nil {
		t.Error("a refused node got configuration")
	}

	// A second stream of the same node id, then both gone.
	ctx, cancel := context.WithCancel(context.Background())
	c := xdsclient.New(xdsclient.Config{Server: addr, Delta: false, Node: &corev3.Node{Id: "sidecar~10.9.0.1~x.y~y.svc.cluster.local"}},
		xdsclient.ApplierFunc(func(context.Context, *xdsclient.Resources) error { return nil }))
	done := make(chan struct{})
	go func() { defer close(done); c.Run(ctx) }()
	if !waitFor(5*time.Second, func() bool { return len(srv.status().Nodes) == 2 }) {
		t.Fatalf("nodes %+v", srv.status().Nodes)
	}
	cancel()
	<-done
	if !waitFor(5*time.Second, func() bool { return len(srv.status().Nodes) == 1 }) {
		t.Errorf("disconnected node still listed: %+v", srv.status().Nodes)
	}
}

// TestWatcherRejectsKeepsAndApplies: a registry file is watched; an
// invalid change is rejected (counted, reported with the file, entry and
// field) and the previous configuration keeps serving; a touch without
// change pushes nothing; a valid change, also by rename, is pushed; a
// missing file changes nothing.
func TestWatcherRejectsKeepsAndApplies(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "registry.yaml")
	write := func(s string) {
		t.Helper()
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	svc := func(vip string) string {
		return fmt.Sprintf("services:\n- name: reviews\n  vip: %s\n  ports: [{port: 9080, protocol: TCP}]\n", vip)
	}
	write(svc("10.96.0.20"))
	def, _ := BuiltinProfile("default")
	srv := NewServer(EmptyRegistry(), def, zerolog.Nop())
	var mu sync.Mutex
	var rejected []string
	w := &watcher{Path: path, Interval: 10 * time.Millisecond, Log: zerolog.Nop(),
		Apply: func(data []byte) error {
			r, err := parseRegistry(path, data)
			if err != nil {
				return err
			}
			srv.setRegistry(r)
			return nil
		},
		Reject: func(err error) {
			srv.rejectRegistry(err)
			mu.Lock()
			rejected = append(rejected, err.Error())
			mu.Unlock()
		},
	}
	if err := w.Load(); err != nil {
		t.Fatal(err)
	}
	if srv.currentVersion() != "2" {
		t.Fatalf("version after load %s", srv.currentVersion())
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.Run(ctx) }()
	defer func() { cancel(); <-done }()

	write(strings.Replace(svc("10.96.0.21"), "TCP", "TPC", 1))
	if !waitFor(2*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return len(rejected) == 1 }) {
		t.Fatal("invalid change not rejected")
	}
	mu.Lock()
	msg := rejected[0]
	mu.Unlock()
	if want := path + `: services[0] (reviews.default): ports[0].protocol: "TPC" is not valid; valid choices: TCP, HTTP, TLS, UDP`; msg != want {
		t.Errorf("rejection %q, want %q", msg, want)
	}
	time.Sleep(50 * time.Millisecond) // more polls: rejected once, not per poll
	if st := srv.status(); st.Version != "2" || st.RegistryRejected != 1 || st.LastRejection != msg {
		t.Errorf("after the invalid change: %+v", st)
	}
	if srv.reg.hosts[0].Addresses[0].String() != "10.96.0.20" {
		t.Error("the invalid change replaced the registry")
	}

	os.Remove(path)
	time.Sleep(50 * time.Millisecond)
	if srv.currentVersion() != "2" {
		t.Error("a missing file changed the configuration")
	}
	write(svc("10.96.0.22"))
	if !waitFor(2*time.Second, func() bool { return srv.currentVersion() == "3" }) {
		t.Fatalf("valid change not applied: %+v", srv.status())
	}
	now := time.Now()
	os.Chtimes(path, now, now) // touched, same content
	time.Sleep(50 * time.Millisecond)
	if srv.currentVersion() != "3" {
		t.Errorf("a touch pushed version %s", srv.currentVersion())
	}
	// Same size, same second: found by the hash.
	write(svc("10.96.0.23"))
	if !waitFor(2*time.Second, func() bool { return srv.currentVersion() == "4" }) {
		t.Fatalf("same-size change not applied: %+v", srv.status())
	}
}

// TestADSChangesNeverNACKed: twenty registry changes in quick succession,
// each adding and removing services (and some arriving while the previous
// one is still under way), reach proxies over delta and state of the world
// without a single NACK, and every node ends on the last registry.
func TestADSChangesNeverNACKed(t *testing.T) {
	def, _ := BuiltinProfile("default")
	regs := make([]*Registry, 20)
	for i := range regs {
		doc := "services:\n"
		for j := i; j < i+3; j++ {
			doc += fmt.Sprintf("- name: svc%d\n  vip: 10.96.1.%d\n  ports: [{port: %d, protocol: TCP}]\n  endpoints: [{address: 10.1.1.%d}]\n", j, j, 8000+j%2, j)
		}
		r, err := parseRegistry("r.yaml", []byte(doc))
		if err != nil {
			t.Fatal(err)
		}
		regs[i] = r
	}
	srv, addr := startServer(t, regs[0], def)
	const id = "sidecar~10.1.0.5~app.default~default.svc.cluster.local"
	delta := startProxyStub(t, addr, true, id)
	sotw := startProxyStub(t, addr, false, "sidecar~10.1.0.6~app2.default~default.svc.cluster.local")
	for i, r := range regs[1:] {
		srv.setRegistry(r)
		if i%3 == 0 {
			time.Sleep(20 * time.Millisecond) // let some changes finish, others overlap
		}
	}
	want := names(generate(regs[len(regs)-1], &def.Spec, node(t, id, "")))
	for _, px := range []*proxyStub{delta, sotw} {
		if !waitFor(5*time.Second, func() bool { return names(px.accepted()) == want }) {
			t.Fatalf("a proxy did not end on the last registry:\n%s\nwant\n%s\nstatus %+v", names(px.accepted()), want, srv.status())
		}
	}
	if !waitFor(2*time.Second, func() bool { return srv.status().Pending == "" }) {
		t.Errorf("a change is still under way: %s", srv.status().Pending)
	}
	for _, n := range srv.status().Nodes {
		if n.NACKs != 0 {
			t.Errorf("node %s NACKed %d times: %s", n.ID, n.NACKs, n.LastNACK)
		}
	}
}

// TestADSLaggingNodeDoesNotBlock: a node that NACKs every update does not
// hold the others back: the next step goes out after the step wait.
func TestADSLaggingNodeDoesNotBlock(t *testing.T) {
	def, _ := BuiltinProfile("default")
	first, _ := parseRegistry("a", []byte("services:\n- name: a\n  vip: 10.96.0.1\n  ports: [{port: 80, protocol: TCP}]\n"))
	second, _ := parseRegistry("b", []byte("services:\n- name: b\n  vip: 10.96.0.2\n  ports: [{port: 80, protocol: TCP}]\n"))
	srv := NewServer(first, def, zerolog.Nop())
	srv.stepWait = 300 * time.Millisecond
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); srv.serve(ctx, lis) }()
	defer func() { cancel(); <-done }()

	good := startProxyStub(t, lis.Addr().String(), true, "sidecar~10.1.0.5~good.default~default.svc.cluster.local")
	if !waitFor(5*time.Second, func() bool { return findListener(good.accepted(), "10.96.0.1_80") != nil }) {
		t.Fatal("no initial configuration")
	}
	var once sync.Once
	badReady := make(chan struct{})
	bad := xdsclient.New(xdsclient.Config{Server: lis.Addr().String(), Delta: true, Node: &corev3.Node{Id: "sidecar~10.1.0.7~bad.default~default.svc.cluster.local"}},
		xdsclient.ApplierFunc(func(_ context.Context, r *xdsclient.Resources) error {
			if len(r.Listeners) > 0 {
				once.Do(func() { close(badReady) })
				return fmt.Errorf("this proxy refuses every change")
			}
			return nil
		}))
	bctx, bcancel := context.WithCancel(context.Background())
	bdone := make(chan struct{})
	go func() { defer close(bdone); bad.Run(bctx) }()
	defer func() { bcancel(); <-bdone }()
	<-badReady

	start := time.Now()
	srv.setRegistry(second)
	if !waitFor(5*time.Second, func() bool {
		r := good.accepted()
		return findListener(r, "10.96.0.2_80") != nil && findListener(r, "10.96.0.1_80") == nil &&
			!strings.Contains(names(r), "outbound|80||a.default")
	}) {
		t.Fatalf("the good node is held back by the bad one: %s\n%s", srv.status().Pending, names(good.accepted()))
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("finished after %v: did not wait for the lagging node at all", d)
	}
}
