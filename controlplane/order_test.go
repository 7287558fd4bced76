package controlplane

import (
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func servedNames(s *Server) (listeners, clusters string) {
	r := s.served(nodeClass{v4: true})
	var ls, cs []string
	for _, l := range r.Listeners {
		ls = append(ls, l.GetName())
	}
	for _, c := range r.Clusters {
		if !strings.Contains(c.GetName(), "Cluster") {
			cs = append(cs, c.GetName())
		}
	}
	sort.Strings(cs)
	return strings.Join(ls, " "), strings.Join(cs, " ")
}

// TestOrderMakeBeforeBreak steps through a change that replaces service a
// by b with one node, whose ACKs the test plays: first b's cluster next to
// a's under a's listeners, then b's listeners once the node ACKed the
// clusters, then a's cluster dropped once it ACKed the listeners; content
// changes meanwhile go out at once; a node that does not ACK is waited
// for only stepWait.
func TestOrderMakeBeforeBreak(t *testing.T) {
	def, _ := BuiltinProfile("default")
	reg := func(name, vip string) *Registry { return oneService(t, name, vip, "TCP") }
	s := NewServer(reg("a", "10.96.0.1"), def, zerolog.Nop())
	s.stepWait = time.Hour
	e := &nodeEntry{node: nodeInfo{ID: "n", IPs: nil}, clusters: 1, listeners: 1}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nodes["n"] = e
	check := func(version, lis, cls string) {
		t.Helper()
		l, c := servedNames(s)
		if s.versionString() != version || !strings.Contains(l, lis) || c != cls {
			t.Fatalf("version %s listeners %q clusters %q; want %s, %s, %q (pending: %s)", s.versionString(), l, c, version, lis, cls, s.seq.describe())
		}
	}
	ca, cb := "outbound|80||a.default.svc.cluster.local", "outbound|80||b.default.svc.cluster.local"

	s.reg = reg("b", "10.96.0.2")
	s.rebuild()
	check("2", "10.96.0.1_80", ca+" "+cb) // 1: new cluster, old listeners
	if s.step() {
		t.Fatal("stepped without the node's ACK")
	}
	s.profile = mustProfile(t, "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec: {connectTimeout: 3s}\n")
	s.rebuild() // a content change goes out at once; the sequence waits on
	check("3", "10.96.0.1_80", ca+" "+cb)
	e.clusters = 2
	if !s.step() {
		t.Fatal("no step after the node ACKed the clusters")
	}
	check("4", "10.96.0.2_80", ca+" "+cb) // 2: new listeners, a's cluster kept
	if s.step() {
		t.Fatal("dropped a cluster before the node ACKed the listeners")
	}
	e.clusters, e.listeners = 4, 4
	if !s.step() {
		t.Fatal("no step after the node ACKed the listeners")
	}
	check("5", "10.96.0.2_80", cb) // 3: unused cluster dropped
	if s.seq.pending() || s.step() {
		t.Fatalf("still pending: %s", s.seq.describe())
	}
	for _, c := range s.served(nodeClass{v4: true}).Clusters {
		if c.GetName() == cb && c.GetConnectTimeout().AsDuration() != 3*time.Second {
			t.Errorf("content of the profile change lost: %v", c.GetConnectTimeout())
		}
	}

	// A node that never ACKs holds each step back for stepWait only. (It
	// has not ACKed the clusters of version 5 either: one change of cluster
	// names at a time, so c's cluster waits too.)
	// The wait is decided by comparing with stepWait at each step: an hour
	// is "not yet", a nanosecond "timed out", however slow the machine.
	s.reg = reg("c", "10.96.0.3")
	s.rebuild()
	check("6", "10.96.0.2_80", cb)
	cc := "outbound|80||c.default.svc.cluster.local"
	for i, want := range [][3]string{{"7", "10.96.0.2_80", cb + " " + cc}, {"8", "10.96.0.3_80", cb + " " + cc}, {"9", "10.96.0.3_80", cc}} {
		s.stepWait = time.Hour
		if s.step() {
			t.Fatalf("step %d went out before stepWait", i)
		}
		s.stepWait = time.Nanosecond
		time.Sleep(time.Millisecond)
		if !s.step() {
			t.Fatalf("step %d: the lagging node held the change back past stepWait", i)
		}
		check(want[0], want[1], want[2])
	}
}

// TestOrderRoutesFollowListeners: replacing HTTP service a by b on port
// 80, the route configuration "80" is served from the same configuration
// as the listeners: while b's cluster is only being added it still routes
// to a; once the node ACKed the clusters it routes to b; a's cluster is
// dropped only once the node ACKed the listeners and the routes. At every
// step what is served passes the proxy's builder and every cluster a
// route names is served.
func TestOrderRoutesFollowListeners(t *testing.T) {
	def, _ := BuiltinProfile("default")
	reg := func(name, vip string) *Registry { return oneService(t, name, vip, "HTTP") }
	s := NewServer(reg("a", "10.96.0.1"), def, zerolog.Nop())
	s.stepWait = time.Hour
	e := &nodeEntry{node: nodeInfo{ID: "n"}, clusters: 1, listeners: 1, routes: 1}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nodes["n"] = e
	s.changes.note(e.node.class(s.reg), 1, s.snapshot(e.node.class(s.reg)))
	check := func(version, vhost, cls string) {
		t.Helper()
		r := s.served(nodeClass{v4: true})
		if err := buildInProxy(r); err != nil {
			t.Fatalf("version %s: %v", version, err)
		}
		_, c := servedNames(s)
		rc := findRoutes(r, "80")
		if s.versionString() != version || rc == nil || rc.GetVirtualHosts()[0].GetName() != vhost || c != cls {
			t.Fatalf("version %s vhost %v clusters %q; want %s, %s, %q (pending: %s)", s.versionString(), rc.GetVirtualHosts(), c, version, vhost, cls, s.seq.describe())
		}
	}
	ca, cb := "outbound|80||a.default.svc.cluster.local", "outbound|80||b.default.svc.cluster.local"
	va, vb := "a.default.svc.cluster.local:80", "b.default.svc.cluster.local:80"

	s.reg = reg("b", "10.96.0.2")
	s.rebuild()
	check("2", va, ca+" "+cb) // new cluster, routes of before
	e.clusters = 2
	if !s.step() {
		t.Fatal("no step after the node ACKed the clusters")
	}
	check("3", vb, ca+" "+cb) // new routes, a's cluster kept
	e.listeners = 3           // the listeners ACKed, not yet the routes
	if s.step() {
		t.Fatal("dropped a cluster before the node ACKed the routes")
	}
	e.routes = 3
	if !s.step() {
		t.Fatal("no step after the node ACKed listeners and routes")
	}
	check("4", vb, cb)
}

// TestOrderProfileNotHeldBack: a profile change while a change of cluster
// names waits for a node's ACK goes out at once — the catch-all of
// virtualOutbound and of the HTTP route configuration, in the listeners
// and routes that change still serves from before — at each step of the
// sequence, which goes on where it was.
func TestOrderProfileNotHeldBack(t *testing.T) {
	def, _ := BuiltinProfile("default")
	strict := mustProfile(t, "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}, connectTimeout: 3s}\n")
	reg := func(name, vip string) *Registry { return oneService(t, name, vip, "HTTP") }
	s := NewServer(reg("a", "10.96.0.1"), def, zerolog.Nop())
	s.stepWait = time.Hour // the lagging node is waited for, longer than the test
	e := &nodeEntry{node: nodeInfo{ID: "n"}, clusters: 1, listeners: 1, routes: 1}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nodes["n"] = e
	s.changes.note(e.node.class(s.reg), 1, s.snapshot(e.node.class(s.reg)))
	ca, cb := "outbound|80||a.default.svc.cluster.local", "outbound|80||b.default.svc.cluster.local"
	va, vb := "a.default.svc.cluster.local:80", "b.default.svc.cluster.local:80"
	check := func(version, catchAll, httpCatchAll, vhost, cls string) {
		t.Helper()
		r := s.served(nodeClass{v4: true})
		if err := buildInProxy(r); err != nil {
			t.Fatalf("version %s: %v", version, err)
		}
		_, c := servedNames(s)
		rc := findRoutes(r, "80")
		if s.versionString() != version || catchAllOf(t, r) != catchAll || catchAllVHost(r, "80") != httpCatchAll ||
			rc == nil || rc.GetVirtualHosts()[0].GetName() != vhost || c != cls {
			t.Fatalf("version %s catch-all %s/%s vhost %v clusters %q; want %s, %s/%s, %s, %q (pending: %s)", s.versionString(),
				catchAllOf(t, r), catchAllVHost(r, "80"), rc.GetVirtualHosts(), c, version, catchAll, httpCatchAll, vhost, cls, s.seq.describe())
		}
	}

	// Step 1 waits: b's cluster is out next to a's, the node has not
	// ACKed it. REGISTRY_ONLY goes out at once, in a's listeners and routes.
	s.reg = reg("b", "10.96.0.2")
	s.rebuild()
	check("2", passthroughCluster, allowAnyVirtualHost, va, ca+" "+cb)
	s.profile = strict
	s.rebuild()
	check("3", blackHoleCluster, blockAllVirtualHost, va, ca+" "+cb)
	for _, c := range s.served(nodeClass{v4: true}).Clusters {
		if c.GetName() == ca && c.GetConnectTimeout().AsDuration() != 3*time.Second {
			t.Errorf("the kept cluster %s has connect_timeout %v, want the new profile's 3s", ca, c.GetConnectTimeout().AsDuration())
		}
	}
	// The sequence goes on: b's listeners and routes once the node ACKs
	// the clusters, under the profile in force.
	if s.step() {
		t.Fatal("stepped without the node's ACK")
	}
	e.clusters = 3
	if !s.step() {
		t.Fatal("no step after the node ACKed the clusters")
	}
	check("4", blackHoleCluster, blockAllVirtualHost, vb, ca+" "+cb)
	// Step 3 waits for the node's ACK of b's listeners and routes; back to
	// ALLOW_ANY meanwhile: at once, and the sequence is still at step 3
	// (not back at the listeners: the registry is the same).
	s.profile = def
	s.rebuild()
	check("5", passthroughCluster, allowAnyVirtualHost, vb, ca+" "+cb)
	if s.seq.lis != s.seq.target || !strings.HasPrefix(s.seq.describe(), "unused clusters") {
		t.Fatalf("a profile change set the sequence back: %s", s.seq.describe())
	}
	e.clusters, e.listeners, e.routes = 5, 5, 5
	if !s.step() {
		t.Fatal("no step after the node ACKed the listeners and routes")
	}
	check("6", passthroughCluster, allowAnyVirtualHost, vb, cb)
	if s.seq.pending() {
		t.Fatalf("still pending: %s", s.seq.describe())
	}
}

// TestADSProfileSwitchWithLaggingNode: a node that does not ACK a
// registry change holds that change's next step back (up to maxStepWait),
// but not a profile change: a connected proxy has REGISTRY_ONLY within a
// second of SetProfile.
func TestADSProfileSwitchWithLaggingNode(t *testing.T) {
	reg := mustRegistry(t, "testdata/registry.yaml")
	def, _ := BuiltinProfile("default")
	srv, addr := startServer(t, reg, def)
	const id = "sidecar~10.1.0.5~app.default~default.svc.cluster.local"
	px := startProxyStub(t, addr, true, id)
	if !waitFor(5*time.Second, func() bool { return catchAllOf(t, px.accepted()) == passthroughCluster }) {
		t.Fatalf("the proxy never accepted a configuration; last error %v", px.client.LastError())
	}
	// A node with no stream: it never ACKs.
	srv.mu.Lock()
	srv.nodes["sidecar~10.1.0.6~lag.default~default.svc.cluster.local"] = &nodeEntry{node: nodeInfo{ID: "lag"}}
	srv.mu.Unlock()
	more, err := parseRegistry("more.yaml", []byte("services:\n- name: ratings\n  vip: 10.96.0.50\n  ports: [{port: 9080, protocol: TCP}]\n  endpoints: [{address: 10.1.9.9}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	srv.setRegistry(more)
	if st := srv.status(); st.Pending == "" {
		t.Fatalf("test premise: the registry change is not waiting for the lagging node: %+v", st)
	}
	strict := mustProfile(t, "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n")
	start := time.Now()
	srv.setProfile(strict)
	if !waitFor(time.Second, func() bool {
		return catchAllOf(t, px.accepted()) == blackHoleCluster && catchAllVHost(px.accepted(), "80") == blockAllVirtualHost
	}) {
		t.Fatalf("REGISTRY_ONLY not in force at the proxy 1s after SetProfile, a registry change waiting for a lagging node (%s)", srv.status().Pending)
	}
	t.Logf("profile change applied by the proxy after %v, the registry change still pending: %s", time.Since(start), srv.status().Pending)
}

// oneService is a registry of one service, name at vip, port 80 with
// proto, one endpoint.
func oneService(t *testing.T, name, vip, proto string) *Registry {
	t.Helper()
	r, err := parseRegistry(name, []byte("services:\n- name: "+name+"\n  vip: "+vip+"\n  ports: [{port: 80, protocol: "+proto+"}]\n  endpoints: [{address: 10.1.0.1}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	return r
}
