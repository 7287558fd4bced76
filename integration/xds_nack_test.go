//go:build linux

package integration

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/encoding/protojson"
)

// xdsWait bounds every wait of these tests for the proxy to take, ACK or
// NACK an update.
const xdsWait = 10 * time.Second

// TestXDSNackPerResource is issue 12's end-to-end test of Envoy's update
// promises (gRFC A46), over delta and state-of-the-world ADS, against the
// real binary: an EDS update whose second assignment is invalid is NACKed
// naming that assignment alone; the first is applied, and /clusters,
// /config_dump?include_eds and traffic through the captured pod agree on
// it; the invalid cluster keeps its last good host in all three. A later
// CDS change to another cluster, while the server still holds the bad
// assignment, is ACKed and in force. A listener whose socket cannot bind
// (the test holds its address open in the pod) is NACKed by name while a
// second new listener of the same LDS update serves. Once the control plane
// fixes the assignment and the port is free, both are ACKed and in force.
func TestXDSNackPerResource(t *testing.T) {
	requireRoot(t)
	for _, api := range []string{"DELTA_GRPC", "GRPC"} {
		t.Run(api, func(t *testing.T) { xdsNackPerResource(t, api) })
	}
}

func xdsNackPerResource(t *testing.T, api string) {
	const (
		clA = "outbound|9081||a.default.svc.cluster.local"
		clB = "outbound|9082||b.default.svc.cluster.local"
		clC = "outbound|9083||c.default.svc.cluster.local"
	)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	a1 := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9081), echo)  // A's first endpoint
	a2 := startTCPServer(t, topo.Services, ap(topo.Svc2V4, 9081), echo) // A's second
	b1 := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9082), echo)  // B's first endpoint
	b2 := startTCPServer(t, topo.Services, ap(topo.Svc2V4, 9082), echo) // B's once fixed
	c1 := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9083), echo)
	hostA1, hostA2, hostB1 := ap(topo.SvcV4, 9081), ap(topo.Svc2V4, 9081), ap(topo.SvcV4, 9082)
	vA, vB := ap(vip(topo, false, 101), 9081), ap(vip(topo, false, 102), 9082)

	// BlackHole as the catch-all: a flow no listener takes is refused,
	// never passed through to some real host.
	listeners := []obj{virtualOutbound("BlackHoleCluster"), virtualInbound(),
		serviceListener(vip(topo, false, 101), 9081, clA), serviceListener(vip(topo, false, 102), 9082, clB)}
	clusters := append(istioClusters(), edsCluster(clA), edsCluster(clB))
	cp.pushObjs(t, "1", listeners, clusters, []obj{
		assignmentOf(clA, topo.SvcV4.String(), 9081), assignmentOf(clB, topo.SvcV4.String(), 9082)})
	startProxy(t, topo, "--bootstrap", adsBootstrap(t, topo, api))
	waitServes(t, topo, vA)
	waitServes(t, topo, vB)
	expectHosts(t, topo, map[string][]string{clA: {hostA1}, clB: {hostB1}})

	// {A → a2, B → "not-an-ip"}: B alone is rejected.
	seen := cp.replyCount()
	cp.pushObjs(t, "2", listeners, clusters, []obj{
		assignmentOf(clA, topo.Svc2V4.String(), 9081), assignmentOf(clB, "not-an-ip", 9082)})
	nack := cp.waitReply(t, seen, "the NACK of the invalid assignment", func(r xdsReply) bool {
		return r.typ == resource.EndpointType && r.nack
	})
	if want := fmt.Sprintf("cluster_load_assignment %q: ", clB); !strings.HasPrefix(nack.detail, want) ||
		!strings.Contains(nack.detail, `"not-an-ip"`) || strings.Contains(nack.detail, clA) {
		t.Fatalf("EDS NACK error_detail %q: want it to name %s and its address alone", nack.detail, want+`..."not-an-ip"...`)
	}
	if api == "GRPC" && nack.version != "1" {
		t.Errorf("EDS NACK version_info %q, want the accepted 1", nack.version)
	}
	// A's new assignment is in force in /clusters and /config_dump; B
	// keeps its last good host in both...
	expectHosts(t, topo, map[string][]string{clA: {hostA2}, clB: {hostB1}})
	// ...and in traffic.
	expectFlows(t, topo, vA, 3, map[*tcpServer]int{a2: 3, a1: 0, b1: 0})
	expectFlows(t, topo, vB, 2, map[*tcpServer]int{b1: 2, a1: 0, a2: 0})

	// A CDS change to another cluster (C is added) with the server still
	// holding B's bad assignment: ACKed and in force.
	seen = cp.replyCount()
	success := statValue(t, topo, "cluster_manager.cds.update_success")
	clusters3 := append(append([]obj(nil), clusters...), staticCluster(clC, "ROUND_ROBIN", netip.MustParseAddrPort(ap(topo.SvcV4, 9083))))
	cp.pushObjs(t, "3", listeners, clusters3, []obj{
		assignmentOf(clA, topo.Svc2V4.String(), 9081), assignmentOf(clB, "not-an-ip", 9082)})
	cp.waitACK(t, seen, api, resource.ClusterType, "3")
	eventually(t, xdsWait, "cds.update_success to move", func() bool {
		return statValue(t, topo, "cluster_manager.cds.update_success") > success
	})
	d := readDump(t, topo)
	if c := d.clusters[clC]; c == nil || d.clusterVersions[clC] != "3" {
		t.Fatalf("/config_dump after the CDS change: %s at version %q, want it at 3", clC, d.clusterVersions[clC])
	}
	for _, r := range cp.repliesSince(seen) {
		if r.typ == resource.ClusterType && r.nack {
			t.Fatalf("CDS NACKed after the rejected assignment: %q", r.detail)
		}
	}
	expectHosts(t, topo, map[string][]string{clA: {hostA2}, clB: {hostB1}})
	if h := clusterHosts(t, topo)[clC]; !slices.Equal(h, []string{ap(topo.SvcV4, 9083)}) {
		t.Fatalf("/clusters: %s has hosts %v, want %s", clC, h, ap(topo.SvcV4, 9083))
	}
	expectFlows(t, topo, vB, 1, map[*tcpServer]int{b1: 1, a1: 0, a2: 0})

	// A listener whose socket cannot bind, next to another new one: the
	// first is rejected by name, the second serves.
	held, err := listenTCP(topo.Pod, "127.0.0.1:19091")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	seen = cp.replyCount()
	rejected := statValue(t, topo, "listener_manager.lds.update_rejected")
	listeners4 := append(append([]obj(nil), listeners...), boundListener(19091, clC), boundListener(19092, clC))
	cp.pushObjs(t, "4", listeners4, clusters3, []obj{
		assignmentOf(clA, topo.Svc2V4.String(), 9081), assignmentOf(clB, "not-an-ip", 9082)})
	nack = cp.waitReply(t, seen, "the NACK of the listener that cannot bind", func(r xdsReply) bool {
		return r.typ == resource.ListenerType && r.nack
	})
	if !strings.HasPrefix(nack.detail, `listener "127.0.0.1_19091": `) || !strings.Contains(nack.detail, "address already in use") ||
		strings.Contains(nack.detail, "19092") {
		t.Fatalf("LDS NACK error_detail %q: want it to name listener 127.0.0.1_19091 alone and the bind error", nack.detail)
	}
	if api == "GRPC" && nack.version != "3" {
		t.Errorf("LDS NACK version_info %q, want the accepted 3", nack.version)
	}
	if n := statValue(t, topo, "listener_manager.lds.update_rejected"); n <= rejected {
		t.Errorf("lds.update_rejected = %d after the NACK, was %d", n, rejected)
	}
	before := len(c1.accepted())
	if _, err := tcpEcho(topo.Pod, "127.0.0.1:19092", 1024); err != nil {
		t.Fatalf("the listener added next to the rejected one does not serve: %v", err)
	}
	if n := len(c1.accepted()) - before; n != 1 {
		t.Fatalf("%s accepted %d connections through 127.0.0.1:19092, want 1", clC, n)
	}
	names := adminGet(t, topo, "/listeners")
	if !strings.Contains(names, "127.0.0.1_19092::127.0.0.1:19092\n") || strings.Contains(names, "127.0.0.1_19091") {
		t.Fatalf("/listeners after the partly rejected update:\n%s", names)
	}
	d = readDump(t, topo)
	if d.listeners["127.0.0.1_19092"] == nil || d.listeners["127.0.0.1_19091"] != nil {
		t.Fatalf("dynamic listeners in /config_dump: %v, want 127.0.0.1_19092 and not 127.0.0.1_19091", slices.Sorted(maps.Keys(d.listeners)))
	}
	// The socket the test holds is its own still: the proxy took nothing.
	held.SetDeadline(time.Now().Add(5 * time.Second))
	got := make(chan error, 1)
	go func() {
		c, err := held.Accept()
		if err == nil {
			c.Close()
		}
		got <- err
	}()
	if c, err := dialTCP(topo.Pod, "127.0.0.1:19091", dialTimeout); err != nil {
		t.Fatalf("the held socket: %v", err)
	} else {
		c.Close()
	}
	if err := <-got; err != nil {
		t.Fatalf("the held socket accepted nothing: %v", err)
	}
	// The rest of the configuration is as before.
	expectHosts(t, topo, map[string][]string{clA: {hostA2}, clB: {hostB1}})
	expectFlows(t, topo, vA, 1, map[*tcpServer]int{a2: 1, a1: 0, b1: 0})

	// What was rejected sticks nowhere: once B's assignment is fixed and
	// the listener's port is free, both are taken and ACKed.
	// (A delta server sends only what changed since it last sent it: the
	// control plane sends a new version of the listener, as it does of
	// the assignment.)
	held.Close()
	seen = cp.replyCount()
	fixed := boundListener(19091, clC)
	fixed["filter_chains"].([]obj)[0]["filters"].([]obj)[0]["typed_config"].(obj)["idle_timeout"] = "3600s"
	listeners5 := append(append([]obj(nil), listeners...), fixed, boundListener(19092, clC))
	cp.pushObjs(t, "5", listeners5, clusters3, []obj{
		assignmentOf(clA, topo.Svc2V4.String(), 9081), assignmentOf(clB, topo.Svc2V4.String(), 9082)})
	for _, typ := range []string{resource.EndpointType, resource.ListenerType} {
		cp.waitACK(t, seen, api, typ, "5")
	}
	expectHosts(t, topo, map[string][]string{clA: {hostA2}, clB: {ap(topo.Svc2V4, 9082)}})
	expectFlows(t, topo, vB, 2, map[*tcpServer]int{b2: 2, b1: 0})
	before = len(c1.accepted())
	if _, err := tcpEcho(topo.Pod, "127.0.0.1:19091", 1024); err != nil {
		t.Fatalf("127.0.0.1_19091 once its port is free: %v", err)
	}
	if n := len(c1.accepted()) - before; n != 1 {
		t.Fatalf("%s accepted %d connections through 127.0.0.1:19091, want 1", clC, n)
	}
}

// TestXDSCountersSurviveChangingUpdates is issue 12's end-to-end test of
// counters that live in the stats store, not in the configuration objects:
// after flows through a captured VIP and two bound listeners, a CDS update
// that changes both clusters (an EDS one's connect_timeout, a STRICT_DNS
// one's dns_refresh_rate) and an LDS update that changes the three listeners
// (tcp_proxy idle_timeout) leave every cluster.<name>.*,
// listener.<addr>.* and tcp.<stat_prefix>.* stat of the live proxy's /stats
// where it was, and the next flow counts on from there. Delta and SotW.
func TestXDSCountersSurviveChangingUpdates(t *testing.T) {
	requireRoot(t)
	for _, api := range []string{"DELTA_GRPC", "GRPC"} {
		t.Run(api, func(t *testing.T) { xdsCountersSurvive(t, api) })
	}
}

func xdsCountersSurvive(t *testing.T, api string) {
	const cl = "outbound|9081||a.default.svc.cluster.local"
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	srv := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9081), echo)
	v := vip(topo, false, 103)
	vipL, boundL := serviceListener(v, 9081, cl), boundListener(19093, cl)
	clusterA := edsCluster(cl)
	eds := []obj{assignmentOf(cl, topo.SvcV4.String(), 9081)}
	// The issue's own case: a STRICT_DNS cluster whose dns_refresh_rate
	// changes, behind a second bound listener.
	const dnsCl = "outbound|9084||d.default.svc.cluster.local"
	dnsSrv := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9084), echo)
	clusterD := staticCluster(dnsCl, "ROUND_ROBIN", netip.AddrPortFrom(topo.SvcV4, 9084))
	clusterD["type"], clusterD["dns_refresh_rate"] = "STRICT_DNS", "5s"
	dnsL := boundListener(19094, dnsCl)
	push := func(version string) {
		cp.pushObjs(t, version, []obj{virtualOutbound("BlackHoleCluster"), virtualInbound(), vipL, boundL, dnsL},
			append(istioClusters(), clusterA, clusterD), eds)
	}
	push("1")
	startProxy(t, topo, "--bootstrap", adsBootstrap(t, topo, api))
	waitServes(t, topo, ap(v, 9081))
	for i := 0; i < 3; i++ {
		if _, err := tcpEcho(topo.Pod, ap(v, 9081), 1000); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 2; i++ {
		if _, err := tcpEcho(topo.Pod, "127.0.0.1:19093", 1000); err != nil {
			t.Fatal(err)
		}
	}
	const flows = 6 // waitServes's, 3 through the VIP, 2 through the bound listener
	if n := len(srv.accepted()); n != flows {
		t.Fatalf("upstream accepted %d connections, want %d", n, flows)
	}
	if _, err := tcpEcho(topo.Pod, "127.0.0.1:19094", 1000); err != nil {
		t.Fatal(err)
	}
	if n := len(dnsSrv.accepted()); n != 1 {
		t.Fatalf("the STRICT_DNS cluster's upstream accepted %d connections, want 1", n)
	}
	// Every stat of the cluster, of both listeners and of the tcp_proxy
	// scope (its stat_prefix is the cluster's name).
	vipScope := "listener." + strings.ReplaceAll(ap(v, 9081), ":", "_") + "."
	scopes := "^(" + strings.Join([]string{
		regexp.QuoteMeta("cluster." + cl + "."),
		regexp.QuoteMeta(vipScope),
		regexp.QuoteMeta("listener.127.0.0.1_19093."),
		regexp.QuoteMeta("tcp." + cl + "."),
		regexp.QuoteMeta("cluster." + dnsCl + "."),
		regexp.QuoteMeta("listener.127.0.0.1_19094."),
		regexp.QuoteMeta("tcp." + dnsCl + "."),
	}, "|") + ")"
	traffic := []string{
		"cluster." + cl + ".upstream_cx_total",
		"cluster." + cl + ".upstream_cx_destroy",
		"cluster." + cl + ".upstream_cx_rx_bytes_total",
		"cluster." + cl + ".upstream_cx_tx_bytes_total",
		"listener.127.0.0.1_19093.downstream_cx_total",
		"listener.127.0.0.1_19093.downstream_cx_destroy",
		vipScope + "downstream_cx_total",
		"tcp." + cl + ".downstream_cx_total",
		"tcp." + cl + ".downstream_cx_rx_bytes_total",
		"cluster." + dnsCl + ".upstream_cx_total",
		"cluster." + dnsCl + ".upstream_cx_rx_bytes_total",
		"listener.127.0.0.1_19094.downstream_cx_total",
		"tcp." + dnsCl + ".downstream_cx_tx_bytes_total",
	}
	// Counters settle once the flows' splices have ended.
	var before map[string]uint64
	eventually(t, xdsWait, "the flows' counters to settle", func() bool {
		before = statsMatching(t, topo, scopes)
		return before["cluster."+cl+".upstream_cx_destroy"] == flows && before["listener.127.0.0.1_19093.downstream_cx_destroy"] == 2 &&
			before["tcp."+cl+".downstream_cx_rx_bytes_total"] == 5004 && // waitServes's "ping" and 5 × 1000
			before["cluster."+dnsCl+".upstream_cx_destroy"] == 1 && before["tcp."+dnsCl+".downstream_cx_tx_bytes_total"] == 1000
	})
	for _, name := range traffic {
		if before[name] == 0 {
			t.Fatalf("%s is 0 before the update: nothing to keep\n%s", name, formatStats(before))
		}
	}
	if n := before["cluster."+cl+".upstream_cx_total"]; n != flows {
		t.Fatalf("upstream_cx_total = %d before the update, want %d", n, flows)
	}

	// The clusters and the listeners change; names and stat prefixes do not.
	seen := cp.replyCount()
	clusterA["connect_timeout"] = "7s"
	clusterD["dns_refresh_rate"] = "9s"
	for _, l := range []obj{vipL, boundL, dnsL} {
		l["filter_chains"].([]obj)[0]["filters"].([]obj)[0]["typed_config"].(obj)["idle_timeout"] = "3600s"
	}
	push("2")
	for _, typ := range []string{resource.ClusterType, resource.ListenerType} {
		cp.waitACK(t, seen, api, typ, "2")
	}
	vipName := fmt.Sprintf("%s_%d", v, 9081)
	eventually(t, xdsWait, "the changed cluster and listeners in /config_dump", func() bool {
		d := readDump(t, topo)
		return d.clusters[cl].GetConnectTimeout().AsDuration() == 7*time.Second && d.clusters[dnsCl].GetDnsRefreshRate().AsDuration() == 9*time.Second &&
			idleTimeoutOf(t, d.listeners[vipName]) == time.Hour && idleTimeoutOf(t, d.listeners["127.0.0.1_19093"]) == time.Hour &&
			idleTimeoutOf(t, d.listeners["127.0.0.1_19094"]) == time.Hour
	})
	after := statsMatching(t, topo, scopes)
	for name, b := range before {
		a, ok := after[name]
		switch {
		case !ok:
			t.Errorf("%s (%d before) is gone after the update", name, b)
		case a < b:
			t.Errorf("%s went from %d to %d across the update", name, b, a)
		}
	}
	for _, name := range traffic {
		if after[name] != before[name] {
			t.Errorf("%s = %d after the update with no flow in between, was %d", name, after[name], before[name])
		}
	}
	if t.Failed() {
		t.Fatalf("before:\n%s\nafter:\n%s", formatStats(before), formatStats(after))
	}

	// The counters in force are the ones that kept their values.
	if _, err := tcpEcho(topo.Pod, "127.0.0.1:19093", 500); err != nil {
		t.Fatal(err)
	}
	eventually(t, xdsWait, "the next flow's counters", func() bool {
		after = statsMatching(t, topo, scopes)
		return after["cluster."+cl+".upstream_cx_destroy"] == flows+1 && after["tcp."+cl+".downstream_cx_rx_bytes_total"] == 5504
	})
	for _, name := range []string{"cluster." + cl + ".upstream_cx_total", "listener.127.0.0.1_19093.downstream_cx_total", "tcp." + cl + ".downstream_cx_total"} {
		if after[name] != before[name]+1 {
			t.Errorf("%s = %d after one more flow, want %d", name, after[name], before[name]+1)
		}
	}
}

// boundListener is a listener that binds 127.0.0.1:port in the pod and
// proxies to cluster.
func boundListener(port uint16, cluster string) obj {
	lo := netip.MustParseAddr("127.0.0.1")
	return obj{"name": fmt.Sprintf("%s_%d", lo, port), "address": sockAddr(lo, port),
		"filter_chains": []obj{{"filters": []obj{tcpProxy(cluster)}}}}
}

// assignmentOf is an EDS assignment of cluster to one endpoint whose
// address is given as text, so that it can be invalid.
func assignmentOf(cluster, addr string, port uint16) obj {
	return obj{"cluster_name": cluster, "endpoints": []obj{{"lb_endpoints": []obj{
		{"endpoint": obj{"address": obj{"socket_address": obj{"address": addr, "port_value": port}}}}}}}}
}

// pushObjs serves listeners, clusters and EDS assignments (built by
// assignmentOf) as one snapshot of the given version.
func (cp *controlPlane) pushObjs(t *testing.T, version string, listeners, clusters, assignments []obj) {
	t.Helper()
	res := map[resource.Type][]types.Resource{}
	for _, l := range listeners {
		res[resource.ListenerType] = append(res[resource.ListenerType], xdsListener(t, l))
	}
	for _, c := range clusters {
		res[resource.ClusterType] = append(res[resource.ClusterType], toProto(t, c, &clusterv3.Cluster{}))
	}
	for _, a := range assignments {
		res[resource.EndpointType] = append(res[resource.EndpointType], toProto(t, a, &endpointv3.ClusterLoadAssignment{}))
	}
	snap, err := cachev3.NewSnapshot(version, res)
	if err != nil {
		t.Fatal(err)
	}
	if err := cp.cache.SetSnapshot(context.Background(), xdsNode, snap); err != nil {
		t.Fatal(err)
	}
}

// replyCount is how many ACKs and NACKs the control plane has received.
func (cp *controlPlane) replyCount() int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return len(cp.replies)
}

// repliesSince returns the ACKs and NACKs received after the first n.
func (cp *controlPlane) repliesSince(n int) []xdsReply {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return append([]xdsReply(nil), cp.replies[n:]...)
}

// waitReply waits (xdsWait at most) for the first ACK or NACK after the
// first n that satisfies match, and returns it.
func (cp *controlPlane) waitReply(t *testing.T, n int, what string, match func(xdsReply) bool) xdsReply {
	t.Helper()
	var found xdsReply
	eventually(t, xdsWait, what, func() bool {
		for _, r := range cp.repliesSince(n) {
			if match(r) {
				found = r
				return true
			}
		}
		return false
	})
	return found
}

// waitACK waits (xdsWait at most) for an ACK of typ after the first n
// replies: over SotW (api "GRPC") one of version, over delta (whose
// requests carry no version) any. A NACK is no answer: over SotW the
// server resends a rejected response and the client's paced NACKs of it
// may come after n; the NACKs seen are named if no ACK comes.
func (cp *controlPlane) waitACK(t *testing.T, n int, api, typ, version string) {
	t.Helper()
	deadline := time.Now().Add(xdsWait)
	for {
		var nacks []string
		for _, r := range cp.repliesSince(n) {
			switch {
			case r.typ != typ:
			case r.nack:
				nacks = append(nacks, r.detail)
			case api != "GRPC" || r.version == version:
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ACK of version %s of %s within %v; NACKs meanwhile: %q", version, typ, xdsWait, nacks)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// eventually polls cond every 50 ms until it holds, failing the test after d.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// statsMatching reads every stat of the proxy's /stats whose name matches re.
func statsMatching(t *testing.T, topo *topology, re string) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	sc := bufio.NewScanner(strings.NewReader(adminGet(t, topo, "/stats?filter="+url.QueryEscape(re))))
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), ": ")
		n, err := strconv.ParseUint(v, 10, 64)
		if !ok || err != nil {
			t.Fatalf("/stats line %q", sc.Text())
		}
		out[name] = n
	}
	return out
}

// statValue reads one stat of /stats by its full name.
func statValue(t *testing.T, topo *topology, name string) uint64 {
	t.Helper()
	v, ok := statsMatching(t, topo, "^"+regexp.QuoteMeta(name)+"$")[name]
	if !ok {
		t.Fatalf("/stats has no %s", name)
	}
	return v
}

func formatStats(m map[string]uint64) string {
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(m)) {
		fmt.Fprintf(&b, "%s: %d\n", name, m[name])
	}
	return b.String()
}

// dumpView is the dynamic part of /config_dump?include_eds, by name.
type dumpView struct {
	clusters        map[string]*clusterv3.Cluster
	clusterVersions map[string]string
	endpoints       map[string][]string // the assignment's hosts, "ip:port"
	listeners       map[string]*listenerv3.Listener
}

func readDump(t *testing.T, topo *topology) dumpView {
	t.Helper()
	cd := &adminv3.ConfigDump{}
	if err := protojson.Unmarshal([]byte(adminGet(t, topo, "/config_dump?include_eds")), cd); err != nil {
		t.Fatalf("/config_dump does not parse: %v", err)
	}
	d := dumpView{clusters: map[string]*clusterv3.Cluster{}, clusterVersions: map[string]string{},
		endpoints: map[string][]string{}, listeners: map[string]*listenerv3.Listener{}}
	for _, a := range cd.GetConfigs() {
		m, err := a.UnmarshalNew()
		if err != nil {
			t.Fatalf("/config_dump: %v", err)
		}
		switch m := m.(type) {
		case *adminv3.ClustersConfigDump:
			for _, c := range m.GetDynamicActiveClusters() {
				pb := &clusterv3.Cluster{}
				if err := c.GetCluster().UnmarshalTo(pb); err != nil {
					t.Fatalf("/config_dump cluster: %v", err)
				}
				d.clusters[pb.GetName()], d.clusterVersions[pb.GetName()] = pb, c.GetVersionInfo()
			}
		case *adminv3.EndpointsConfigDump:
			for _, e := range m.GetDynamicEndpointConfigs() {
				pb := &endpointv3.ClusterLoadAssignment{}
				if err := e.GetEndpointConfig().UnmarshalTo(pb); err != nil {
					t.Fatalf("/config_dump endpoints: %v", err)
				}
				hosts := []string{}
				for _, l := range pb.GetEndpoints() {
					for _, ep := range l.GetLbEndpoints() {
						sa := ep.GetEndpoint().GetAddress().GetSocketAddress()
						hosts = append(hosts, fmt.Sprintf("%s:%d", sa.GetAddress(), sa.GetPortValue()))
					}
				}
				d.endpoints[pb.GetClusterName()] = hosts
			}
		case *adminv3.ListenersConfigDump:
			for _, l := range m.GetDynamicListeners() {
				if l.GetActiveState() == nil {
					continue
				}
				pb := &listenerv3.Listener{}
				if err := l.GetActiveState().GetListener().UnmarshalTo(pb); err != nil {
					t.Fatalf("/config_dump listener: %v", err)
				}
				d.listeners[pb.GetName()] = pb
			}
		}
	}
	return d
}

// idleTimeoutOf is the tcp_proxy idle_timeout of l's first filter chain (-1
// when l is nil or has none).
func idleTimeoutOf(t *testing.T, l *listenerv3.Listener) time.Duration {
	t.Helper()
	if l == nil {
		return -1
	}
	tp := &tcpproxyv3.TcpProxy{}
	if err := l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(tp); err != nil {
		t.Fatalf("listener %s: %v", l.GetName(), err)
	}
	if tp.GetIdleTimeout() == nil {
		return -1
	}
	return tp.GetIdleTimeout().AsDuration()
}

// clusterHosts reads each cluster's hosts from /clusters' text lines.
func clusterHosts(t *testing.T, topo *topology) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	sc := bufio.NewScanner(strings.NewReader(adminGet(t, topo, "/clusters")))
	for sc.Scan() {
		f := strings.Split(sc.Text(), "::")
		if len(f) == 4 && f[2] == "health_flags" {
			out[f[0]] = append(out[f[0]], f[1])
		}
	}
	return out
}

// expectHosts waits (xdsWait at most) until /clusters and
// /config_dump?include_eds both give each EDS cluster of want exactly its
// hosts.
func expectHosts(t *testing.T, topo *topology, want map[string][]string) {
	t.Helper()
	var live, dumped map[string][]string
	deadline := time.Now().Add(xdsWait)
	for {
		live, dumped = clusterHosts(t, topo), readDump(t, topo).endpoints
		ok := true
		for name, hosts := range want {
			ok = ok && slices.Equal(slices.Sorted(slices.Values(live[name])), hosts) && slices.Equal(slices.Sorted(slices.Values(dumped[name])), hosts)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("hosts after %v: /clusters %v, /config_dump %v; want %v", xdsWait, live, dumped, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// expectFlows echoes n flows through dst from the pod and checks how many
// connections each server accepted meanwhile.
func expectFlows(t *testing.T, topo *topology, dst string, n int, want map[*tcpServer]int) {
	t.Helper()
	before := map[*tcpServer]int{}
	for s := range want {
		before[s] = len(s.accepted())
	}
	for i := 0; i < n; i++ {
		if _, err := tcpEcho(topo.Pod, dst, 512); err != nil {
			t.Fatalf("flow %d to %s: %v", i, dst, err)
		}
	}
	for s, w := range want {
		if got := len(s.accepted()) - before[s]; got != w {
			t.Errorf("%d flows to %s: %s accepted %d, want %d", n, dst, s.ln.Addr(), got, w)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}
