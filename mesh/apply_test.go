package mesh

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sort"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/httpconn"
	"github.com/meshtun/meshtun/mesh/stats"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/xdsclient"
)

// newApplier is a proxy configured over xDS with no static resources,
// serving bound listeners on loopback.
func newApplier(t testing.TB) (*XDSApplier, *Dispatcher) {
	t.Helper()
	d := &Dispatcher{}
	pools := httpconn.NewPools()
	a := &XDSApplier{
		Server: &Server{D: d, Log: zerolog.Nop()},
		Options: BuildOptions{Roles: IstioRoles, Cluster: cluster.Options{Dialer: &upstream.Dialer{}, Log: zerolog.Nop()},
			AllowUnknownClusters: true, Pools: pools},
	}
	t.Cleanup(func() {
		a.Server.Close()
		done, cancel := context.WithCancel(context.Background())
		cancel()
		pools.Close(done) // nothing pooled is waited for
		if s := d.Snapshot(); s != nil {
			s.Retire(nil)
		}
	})
	return a, d
}

func resources(clusters []*clusterv3.Cluster, eps []*endpointv3.ClusterLoadAssignment, ls []*listenerv3.Listener, rcs ...*routev3.RouteConfiguration) *xdsclient.Resources {
	r := &xdsclient.Resources{
		Clusters:  map[string]*clusterv3.Cluster{},
		Endpoints: map[string]*endpointv3.ClusterLoadAssignment{},
		Listeners: map[string]*listenerv3.Listener{},
		Routes:    map[string]*routev3.RouteConfiguration{},
		Versions:  map[string]string{xdsclient.ClusterType: "1", xdsclient.ListenerType: "1"},
	}
	for _, c := range clusters {
		r.Clusters[c.GetName()] = c
	}
	for _, e := range eps {
		r.Endpoints[e.GetClusterName()] = e
	}
	for _, l := range ls {
		r.Listeners[l.GetName()] = l
	}
	for _, rc := range rcs {
		r.Routes[rc.GetName()] = rc
	}
	return r
}

// badAssignment names a host where an IP address is required.
func badAssignment(name string) *endpointv3.ClusterLoadAssignment {
	cla := xdstest.Assignment(name, netip.MustParseAddrPort("10.0.0.2:80"))
	cla.Endpoints[0].LbEndpoints[0].GetEndpoint().Address = xdstest.SocketAddress("not-an-ip", 80)
	return cla
}

func addrs(hs []*cluster.Host) []string {
	out := make([]string, len(hs))
	for i, h := range hs {
		out[i] = h.Address().String()
	}
	return out
}

func rejected(t *testing.T, err error) []string {
	t.Helper()
	es, ok := xdsclient.AsResourceErrors(err)
	if !ok {
		t.Fatalf("Apply: %v, want ResourceErrors", err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.TypeURL+" "+e.Name)
	}
	sort.Strings(out)
	return out
}

func dumpedEndpoint(s *Snapshot, name string) *endpointv3.ClusterLoadAssignment {
	for _, r := range s.Dump.Endpoints {
		if r.Name == name {
			return r.Msg.(*endpointv3.ClusterLoadAssignment)
		}
	}
	return nil
}

// TestApplyRejectsOnlyTheInvalidAssignment is defect 1 of issue 12: an
// EDS update {a → 10.0.0.9, b → "not-an-ip"} is rejected naming b alone,
// and nothing live changes (a keeps 10.0.0.1 in /clusters and in
// /config_dump); the update the xDS client then applies (b at its last
// accepted version) puts a's new assignment in force, into the same
// cluster object.
func TestApplyRejectsOnlyTheInvalidAssignment(t *testing.T) {
	a, d := newApplier(t)
	ip1, ip2, ip9 := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("10.0.0.9:80")
	cs := []*clusterv3.Cluster{xdstest.EDSCluster("a"), xdstest.EDSCluster("b")}
	bGood := xdstest.Assignment("b", ip2)
	if err := a.Apply(context.Background(), resources(cs, []*endpointv3.ClusterLoadAssignment{xdstest.Assignment("a", ip1), bGood}, nil)); err != nil {
		t.Fatal(err)
	}
	s1 := d.Snapshot()
	ca := s1.Clusters["a"]

	aNew := xdstest.Assignment("a", ip9)
	err := a.Apply(context.Background(), resources(cs, []*endpointv3.ClusterLoadAssignment{aNew, badAssignment("b")}, nil))
	if got := rejected(t, err); len(got) != 1 || got[0] != xdsclient.EndpointType+" b" {
		t.Fatalf("rejected %v, want exactly the assignment b", got)
	}
	if d.Snapshot() != s1 {
		t.Fatal("a rejected update swapped the snapshot")
	}
	if got := addrs(ca.Hosts()); len(got) != 1 || got[0] != ip1.String() {
		t.Fatalf("live hosts of a after the rejected update: %v, want [10.0.0.1:80]", got)
	}
	if got := dumpedEndpoint(d.Snapshot(), "a"); !proto.Equal(got, xdstest.Assignment("a", ip1)) {
		t.Fatalf("config_dump of a after the rejected update: %v", got)
	}
	if v, _ := s1.Clusters["b"].Stat("update_rejected"); v != 1 {
		t.Fatalf("b: update_rejected %d, want 1", v)
	}

	// What the xDS client applies next: b at its last accepted version.
	if err := a.Apply(context.Background(), resources(cs, []*endpointv3.ClusterLoadAssignment{aNew, bGood}, nil)); err != nil {
		t.Fatal(err)
	}
	s2 := d.Snapshot()
	if s2.Clusters["a"] != ca {
		t.Fatal("an endpoint update replaced the cluster object")
	}
	if got := addrs(ca.Hosts()); len(got) != 1 || got[0] != ip9.String() {
		t.Fatalf("live hosts of a: %v, want [10.0.0.9:80]", got)
	}
	if got := addrs(s2.Clusters["b"].Hosts()); len(got) != 1 || got[0] != ip2.String() {
		t.Fatalf("live hosts of b: %v, want its last good [10.0.0.2:80]", got)
	}
	if got := dumpedEndpoint(s2, "a"); got != aNew {
		t.Fatalf("config_dump of a: %v, want the applied assignment", got)
	}
}

// TestApplyNamesEveryInvalidResource: one update with an invalid
// cluster, assignment, route configuration and two invalid listeners (one
// whose address an earlier listener has) is rejected naming each of them
// and nothing else; the snapshot in force stays.
func TestApplyNamesEveryInvalidResource(t *testing.T) {
	a, d := newApplier(t)
	good := []*listenerv3.Listener{xdstest.TCPListener(t, "a-first", "10.0.0.1", 80, "c", false)}
	if err := a.Apply(context.Background(), resources([]*clusterv3.Cluster{xdstest.EDSCluster("c")}, nil, good)); err != nil {
		t.Fatal(err)
	}
	s1 := d.Snapshot()

	badCluster := xdstest.StaticCluster("bad-cluster")
	badCluster.LoadAssignment = badAssignment("bad-cluster")
	badRoute := xdstest.RouteConfig("bad-route", "c")
	badRoute.VirtualHosts[0].Domains = []string{"*", "*"}
	badIP := xdstest.TCPListener(t, "c-bad-ip", "10.0.0.300", 80, "c", false)
	ls := append(good, xdstest.TCPListener(t, "b-second", "10.0.0.1", 80, "c", false), badIP,
		xdstest.TCPListener(t, "d-fine", "10.0.0.4", 80, "c", false))
	r := resources([]*clusterv3.Cluster{xdstest.EDSCluster("c"), badCluster}, []*endpointv3.ClusterLoadAssignment{badAssignment("c")}, ls,
		badRoute, xdstest.RouteConfig("fine-route", "c"))
	err := a.Apply(context.Background(), r)
	want := []string{
		xdsclient.ClusterType + " bad-cluster",
		xdsclient.EndpointType + " c",
		xdsclient.ListenerType + " b-second",
		xdsclient.ListenerType + " c-bad-ip",
		xdsclient.RouteType + " bad-route",
	}
	sort.Strings(want)
	if got := rejected(t, err); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("rejected\n %v\nwant\n %v", got, want)
	}
	if d.Snapshot() != s1 {
		t.Fatal("a rejected update swapped the snapshot")
	}
	// The conflict is the later listener's: the message says whose
	// address it is.
	es, _ := xdsclient.AsResourceErrors(err)
	for _, e := range es {
		if e.Name == "b-second" && e.Err.Error() != `address 10.0.0.1:80: already used by listener "a-first"` {
			t.Fatalf("b-second: %v", e.Err)
		}
	}
}

// TestApplyNamesListenerThatCannotBind: a listener whose port another
// socket holds is rejected by name; the rest of the update is valid, no
// socket of it stays open, and the update without that listener serves.
func TestApplyNamesListenerThatCannotBind(t *testing.T) {
	a, d := newApplier(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	echo := echoServer(t)
	free := freePort(t)
	cs := []*clusterv3.Cluster{xdstest.StaticCluster("echo", echo)}
	ok := xdstest.TCPListener(t, "ok", "127.0.0.1", uint32(free), "echo", true)
	blocked := xdstest.TCPListener(t, "blocked", "127.0.0.1", uint32(taken.Addr().(*net.TCPAddr).Port), "echo", true)
	err = a.Apply(context.Background(), resources(cs, nil, []*listenerv3.Listener{ok, blocked}))
	if got := rejected(t, err); len(got) != 1 || got[0] != xdsclient.ListenerType+" blocked" {
		t.Fatalf("rejected %v, want exactly the listener blocked", got)
	}
	if d.Snapshot() != nil {
		t.Fatal("a rejected update swapped a snapshot in")
	}
	// The socket opened for "ok" was closed again: its port is free.
	if ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", free)); err != nil {
		t.Fatalf("the socket of the accepted listener stayed open after the rejection: %v", err)
	} else {
		ln.Close()
	}
	if err := a.Apply(context.Background(), resources(cs, nil, []*listenerv3.Listener{ok})); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, fmt.Sprintf("127.0.0.1:%d", free))
}

// TestCountersSurviveChangingUpdates is defect 2 of issue 12: every
// cluster.<name>.*, listener.<addr>.*, tcp.* and http.* counter keeps its
// value across an update that changes the cluster and the listener (both
// rebuilt), and counting goes on from there.
func TestCountersSurviveChangingUpdates(t *testing.T) {
	a, d := newApplier(t)
	echo := echoServer(t)
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer web.Close()
	webAddr := netip.MustParseAddrPort(web.Listener.Addr().String())
	tcpPort, httpPort := freePort(t), freePort(t)

	update := func(v int) {
		t.Helper()
		cs := []*clusterv3.Cluster{xdstest.StaticCluster("echo", echo), xdstest.StaticCluster("web", webAddr)}
		tl := xdstest.TCPListener(t, "tcp", "127.0.0.1", uint32(tcpPort), "echo", true)
		hl := xdstest.HTTPListener(t, "http", "127.0.0.1", uint32(httpPort), "r", true)
		for _, c := range cs {
			c.ConnectTimeout = durationpb.New(time.Duration(v) * time.Second)
		}
		tl.FilterChains[0].Name = fmt.Sprint("v", v)
		hl.FilterChains[0].Name = fmt.Sprint("v", v)
		if err := a.Apply(context.Background(), resources(cs, nil, []*listenerv3.Listener{tl, hl}, xdstest.RouteConfig("r", "web"))); err != nil {
			t.Fatal(err)
		}
	}
	traffic := func(n int) {
		t.Helper()
		roundTrip(t, fmt.Sprintf("127.0.0.1:%d", tcpPort))
		get(t, fmt.Sprintf("http://127.0.0.1:%d/", httpPort))
		xdstest.Eventually(t, 5*time.Second, "flows counted as ended", func() bool {
			c := counters(d.Snapshot())
			return c["cluster.echo.upstream_cx_destroy"] == uint64(n) && c["listener.127.0.0.1_"+fmt.Sprint(tcpPort)+".downstream_cx_destroy"] == uint64(n) &&
				c["listener.127.0.0.1_"+fmt.Sprint(httpPort)+".downstream_cx_destroy"] == uint64(n)
		})
	}

	update(1)
	traffic(1)
	s1 := d.Snapshot()
	before := counters(s1)
	for _, k := range []string{"cluster.echo.upstream_cx_total", "cluster.echo.upstream_cx_rx_bytes_total", "cluster.web.upstream_cx_total",
		"cluster.web.upstream_rq_200", "cluster.web.upstream_rq_total", "tcp.echo.downstream_cx_total", "http.http.downstream_rq_total",
		"listener.127.0.0.1_" + fmt.Sprint(tcpPort) + ".downstream_cx_total", "listener.127.0.0.1_" + fmt.Sprint(httpPort) + ".downstream_cx_total"} {
		if before[k] != 1 && !(k == "cluster.echo.upstream_cx_rx_bytes_total" && before[k] > 0) {
			t.Fatalf("%s = %d before the update, want it counted", k, before[k])
		}
	}

	update(2)
	s2 := d.Snapshot()
	if s2.Clusters["echo"] == s1.Clusters["echo"] || s2.Clusters["web"] == s1.Clusters["web"] ||
		proto.Equal(s2.Listener("tcp").Proto, s1.Listener("tcp").Proto) || proto.Equal(s2.Listener("http").Proto, s1.Listener("http").Proto) {
		t.Fatal("the update did not change the clusters and listeners")
	}
	after := counters(s2)
	for k, v := range before {
		if after[k] != v {
			t.Errorf("%s: %d before the update, %d after", k, v, after[k])
		}
	}

	traffic(2)
	after = counters(d.Snapshot())
	for _, k := range []string{"cluster.echo.upstream_cx_total", "tcp.echo.downstream_cx_total", "http.http.downstream_rq_total", "cluster.web.upstream_rq_200"} {
		if after[k] != 2 {
			t.Errorf("%s = %d after one more flow, want 2", k, after[k])
		}
	}
}

// TestRetiredSnapshotIsImmutable: a snapshot replaced by an EDS update
// still reports the hosts and the dump it was built with, while the live
// cluster (the same object) serves the new hosts.
func TestRetiredSnapshotIsImmutable(t *testing.T) {
	a, d := newApplier(t)
	ip1, ip9 := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.9:80")
	cs := []*clusterv3.Cluster{xdstest.EDSCluster("a")}
	first := xdstest.Assignment("a", ip1)
	if err := a.Apply(context.Background(), resources(cs, []*endpointv3.ClusterLoadAssignment{first}, nil)); err != nil {
		t.Fatal(err)
	}
	s1 := d.Snapshot()
	dump1 := s1.Dump
	if err := a.Apply(context.Background(), resources(cs, []*endpointv3.ClusterLoadAssignment{xdstest.Assignment("a", ip9)}, nil)); err != nil {
		t.Fatal(err)
	}
	s2 := d.Snapshot()
	if got := addrs(s1.Hosts("a")); len(got) != 1 || got[0] != ip1.String() {
		t.Fatalf("retired snapshot's hosts of a: %v, want [10.0.0.1:80]", got)
	}
	if s1.Dump != dump1 || dumpedEndpoint(s1, "a") != first {
		t.Fatal("retired snapshot's dump changed")
	}
	if got := addrs(s2.Hosts("a")); len(got) != 1 || got[0] != ip9.String() {
		t.Fatalf("new snapshot's hosts of a: %v", got)
	}
	if s2.Clusters["a"] != s1.Clusters["a"] || addrs(s2.Clusters["a"].Hosts())[0] != ip9.String() {
		t.Fatal("the live cluster is not the same object serving the new hosts")
	}
}

// TestRemovedClusterStatsAreDropped: the stats of a cluster removed by an
// update leave the store, and the cluster added back starts from 0, as
// in Envoy.
func TestRemovedClusterStatsAreDropped(t *testing.T) {
	a, d := newApplier(t)
	cs := []*clusterv3.Cluster{xdstest.EDSCluster("a"), xdstest.EDSCluster("b")}
	if err := a.Apply(context.Background(), resources(cs, nil, nil)); err != nil {
		t.Fatal(err)
	}
	d.Snapshot().Clusters["b"].CountConnectAttemptsExceeded()
	n := a.Options.Stats.Len()
	if err := a.Apply(context.Background(), resources(cs[:1], nil, nil)); err != nil {
		t.Fatal(err)
	}
	if got := a.Options.Stats.Len(); got != n-1 {
		t.Fatalf("store holds %d blocks after removing a cluster, want %d", got, n-1)
	}
	if err := a.Apply(context.Background(), resources(cs, nil, nil)); err != nil {
		t.Fatal(err)
	}
	if v, _ := d.Snapshot().Clusters["b"].Stat("upstream_cx_connect_attempts_exceeded"); v != 0 {
		t.Fatalf("re-added cluster: upstream_cx_connect_attempts_exceeded %d, want 0", v)
	}
}

// counters are the snapshot's counters (no gauges) with their /stats names.
func counters(s *Snapshot) map[string]uint64 {
	out := map[string]uint64{}
	for _, c := range s.Clusters {
		p := "cluster." + c.ObservabilityName() + "."
		for _, st := range append(c.Stats(), c.HTTPStats().Stats()...) {
			if !st.Gauge {
				out[p+st.Name] = st.Value
			}
		}
	}
	for _, l := range s.Listeners {
		out[l.Stats.Prefix+"downstream_cx_total"] = l.Stats.DownstreamCxTotal.Load()
		out[l.Stats.Prefix+"downstream_cx_destroy"] = l.Stats.DownstreamCxDestroy.Load()
		out[l.Stats.Prefix+"no_filter_chain_match"] = l.Stats.NoFilterChainMatch.Load()
		out[l.Stats.Prefix+"downstream_pre_cx_timeout"] = l.Stats.DownstreamListenerTimeout.Load()
	}
	for _, ts := range s.TCPStats() {
		out[ts.Prefix+"downstream_cx_total"] = ts.DownstreamCxTotal.Load()
		out[ts.Prefix+"downstream_cx_no_route"] = ts.DownstreamCxNoRoute.Load()
		out[ts.Prefix+"downstream_cx_rx_bytes_total"] = ts.DownstreamRxBytes.Load()
		out[ts.Prefix+"downstream_cx_tx_bytes_total"] = ts.DownstreamTxBytes.Load()
		out[ts.Prefix+"idle_timeout"] = ts.IdleTimeout.Load()
	}
	for p, hs := range s.HTTPStats() {
		for _, st := range hs.List() {
			if !st.Gauge {
				out["http."+p+"."+st.Name] = st.Value
			}
		}
	}
	return out
}

// echoServer echoes every connection on loopback until the test ends.
func echoServer(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	xdstest.ServeConns(t, ln, func(c net.Conn) { io.Copy(c, c) })
	return netip.MustParseAddrPort(ln.Addr().String())
}

// freePort is a loopback port nothing listens on (the kernel's pick).
func freePort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// roundTrip sends "ping" through the proxy at addr and expects it back.
func roundTrip(t *testing.T, addr string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo through %s: %q %v", addr, buf, err)
	}
}

// get makes one request on a connection of its own, closed after.
func get(t *testing.T, url string) {
	t.Helper()
	cl := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := cl.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
}

// TestStaticResourcesKeepWholeUpdateErrors: an invalid bootstrap resource
// rejects the update with a plain error (the client cannot keep a last
// good version of it), while a dynamic listener whose name a static one
// has is the one rejected, by name.
func TestStaticResourcesKeepWholeUpdateErrors(t *testing.T) {
	a, d := newApplier(t)
	a.StaticListeners = []*listenerv3.Listener{xdstest.TCPListener(t, "x", "10.0.0.1", 80, "c", false)}
	r := resources([]*clusterv3.Cluster{xdstest.EDSCluster("c")}, nil, []*listenerv3.Listener{xdstest.TCPListener(t, "x", "10.0.0.2", 80, "c", false)})
	err := a.Apply(context.Background(), r)
	if got := rejected(t, err); len(got) != 1 || got[0] != xdsclient.ListenerType+" x" || err.Error() != `listener "x": duplicate name` {
		t.Fatalf("dynamic listener named as a static one: %v (%v)", got, err)
	}
	if err := a.Apply(context.Background(), resources([]*clusterv3.Cluster{xdstest.EDSCluster("c")}, nil, nil)); err != nil {
		t.Fatal(err)
	}
	s := d.Snapshot()

	bad := xdstest.StaticCluster("static-bad")
	bad.LoadAssignment = badAssignment("static-bad")
	a.StaticClusters = []*clusterv3.Cluster{bad}
	err = a.Apply(context.Background(), resources([]*clusterv3.Cluster{xdstest.EDSCluster("c")}, nil, nil))
	if _, ok := xdsclient.AsResourceErrors(err); ok || err == nil || !strings.HasPrefix(err.Error(), `cluster "static-bad": `) {
		t.Fatalf("invalid static cluster: %v, want a plain error naming it", err)
	}
	if d.Snapshot() != s {
		t.Fatal("a rejected update swapped the snapshot")
	}
}

// TestApplyCarriedAssignments: an assignment the snapshot in force was
// built with (the same message) is not parsed again for clusters it
// already serves, but a cluster replaced by a changed configuration gets
// its hosts from it, and an assignment no cluster uses is still judged
// when it changes.
func TestApplyCarriedAssignments(t *testing.T) {
	a, d := newApplier(t)
	ip1, ip2 := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80")
	claA, unused := xdstest.Assignment("a", ip1), xdstest.Assignment("unused", ip2)
	eps := []*endpointv3.ClusterLoadAssignment{claA, unused}
	if err := a.Apply(context.Background(), resources([]*clusterv3.Cluster{xdstest.EDSCluster("a")}, eps, nil)); err != nil {
		t.Fatal(err)
	}
	s1 := d.Snapshot()

	// Cluster a changes (a new object), its assignment does not.
	changed := xdstest.EDSCluster("a")
	changed.ConnectTimeout = durationpb.New(7 * time.Second)
	if err := a.Apply(context.Background(), resources([]*clusterv3.Cluster{changed}, eps, nil)); err != nil {
		t.Fatal(err)
	}
	s2 := d.Snapshot()
	if s2.Clusters["a"] == s1.Clusters["a"] {
		t.Fatal("a changed cluster was carried over")
	}
	if got := addrs(s2.Hosts("a")); len(got) != 1 || got[0] != ip1.String() {
		t.Fatalf("hosts of the replaced cluster a: %v, want [10.0.0.1:80] from its unchanged assignment", got)
	}
	if got := addrs(s2.Clusters["a"].Hosts()); len(got) != 1 || got[0] != ip1.String() {
		t.Fatalf("live hosts of the replaced cluster a: %v, want [10.0.0.1:80]", got)
	}

	// Nothing changes: everything is carried over.
	if err := a.Apply(context.Background(), resources([]*clusterv3.Cluster{changed}, eps, nil)); err != nil {
		t.Fatal(err)
	}
	if s3 := d.Snapshot(); s3.Clusters["a"] != s2.Clusters["a"] || s3.endpoints["a"] != s2.endpoints["a"] {
		t.Fatal("an unchanged cluster or its host set was rebuilt")
	}

	// The unused assignment turns invalid: named, nothing swapped.
	s3 := d.Snapshot()
	err := a.Apply(context.Background(), resources([]*clusterv3.Cluster{changed}, []*endpointv3.ClusterLoadAssignment{claA, badAssignment("unused")}, nil))
	if got := rejected(t, err); len(got) != 1 || got[0] != xdsclient.EndpointType+" unused" {
		t.Fatalf("rejected %v, want exactly the assignment unused", got)
	}
	if d.Snapshot() != s3 {
		t.Fatal("a rejected update swapped the snapshot")
	}
}

// TestApplyCarriesUnchangedListeners: an update that changes only an
// assignment keeps every listener whose message did not change, the same
// object (not drained, not rebuilt), with its counters registered in the
// new snapshot (listed, kept by the sweep); a changed listener is rebuilt
// and drains.
func TestApplyCarriesUnchangedListeners(t *testing.T) {
	a, d := newApplier(t)
	ip1, ip2 := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80")
	cs := []*clusterv3.Cluster{xdstest.EDSCluster("c")}
	tcp := xdstest.TCPListener(t, "tcp", "10.96.0.1", 80, "c", false)
	web := xdstest.HTTPListener(t, "web", "10.96.0.2", 80, "r", false)
	other := xdstest.TCPListener(t, "other", "10.96.0.3", 80, "c", false)
	rc := xdstest.RouteConfig("r", "c")
	ls := []*listenerv3.Listener{tcp, web, other}
	if err := a.Apply(context.Background(), resources(cs, []*endpointv3.ClusterLoadAssignment{xdstest.Assignment("c", ip1)}, ls, rc)); err != nil {
		t.Fatal(err)
	}
	s1 := d.Snapshot()
	blocks := s1.store.Len()

	changed := xdstest.TCPListener(t, "other", "10.96.0.3", 81, "c", false)
	if err := a.Apply(context.Background(), resources(cs, []*endpointv3.ClusterLoadAssignment{xdstest.Assignment("c", ip2)}, []*listenerv3.Listener{tcp, web, changed}, rc)); err != nil {
		t.Fatal(err)
	}
	s2 := d.Snapshot()
	for _, name := range []string{"tcp", "web"} {
		if s2.Listener(name) != s1.Listener(name) {
			t.Errorf("listener %s, unchanged, was rebuilt", name)
		}
	}
	if s2.Listener("other") == s1.Listener("other") || s2.Listener("other").drain == s1.Listener("other").drain {
		t.Error("the changed listener was carried over")
	}
	if got := addrs(s2.Hosts("c")); len(got) != 1 || got[0] != ip2.String() {
		t.Errorf("hosts of c: %v, want the new assignment's", got)
	}
	// The carried listeners' counters are the snapshot's: listed, and the
	// blocks the store keeps after the sweep.
	if _, ok := s2.HTTPStats()["web"]; !ok {
		t.Error("the carried HTTP listener's http.web. block is not listed")
	}
	if len(s2.TCPStats()) != 1 || s2.TCPStats()[0] != s1.TCPStats()[0] {
		t.Errorf("tcp.* blocks %v, want the one of s1 carried", s2.TCPStats())
	}
	l := s2.Listener("tcp")
	if got := stats.Scope(s2.store, l.Stats.Prefix, func() *ListenerStats { return &ListenerStats{} }); got != l.Stats {
		t.Error("the carried listener counts into a block the store dropped")
	}
	// other's listener block changed name (port 81); nothing else went.
	if n := s2.store.Len(); n != blocks {
		t.Errorf("%d stats blocks after the update, want %d (one listener block replaced)", n, blocks)
	}
}
