package xdsclient

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// validate judges each resource on its own and names every invalid one, as
// mesh's Applier does: an endpoint address that is not an IP (in an EDS
// assignment or a STATIC cluster's load_assignment), a listener whose address
// is not an IP or whose socket cannot be bound, a virtual host domain with a
// space in it.
func validate(r *Resources) error {
	var es ResourceErrors
	for _, name := range slices.Sorted(maps.Keys(r.Clusters)) {
		if err := checkAssignment(r.Clusters[name].GetLoadAssignment()); err != nil {
			es = append(es, ResourceError{TypeURL: ClusterType, Name: name, Err: fmt.Errorf("load_assignment.%w", err)})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(r.Endpoints)) {
		if err := checkAssignment(r.Endpoints[name]); err != nil {
			es = append(es, ResourceError{TypeURL: EndpointType, Name: name, Err: err})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(r.Listeners)) {
		if err := bindCheck(r.Listeners[name]); err != nil {
			es = append(es, ResourceError{TypeURL: ListenerType, Name: name, Err: err})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(r.Routes)) {
		for i, vh := range r.Routes[name].GetVirtualHosts() {
			for j, d := range vh.GetDomains() {
				if strings.Contains(d, " ") {
					es = append(es, ResourceError{TypeURL: RouteType, Name: name,
						Err: fmt.Errorf("virtual_hosts[%d].domains[%d]: %q is not a domain", i, j, d)})
				}
			}
		}
	}
	if len(es) > 0 {
		return es
	}
	return nil
}

func checkAssignment(a *endpointv3.ClusterLoadAssignment) error {
	for i, l := range a.GetEndpoints() {
		for j, ep := range l.GetLbEndpoints() {
			addr := ep.GetEndpoint().GetAddress().GetSocketAddress().GetAddress()
			if _, err := netip.ParseAddr(addr); err != nil {
				return fmt.Errorf("endpoints[%d].lb_endpoints[%d]: address %q is not an IP", i, j, addr)
			}
		}
	}
	return nil
}

// bindCheck binds the listener's socket and closes it again.
func bindCheck(l *listenerv3.Listener) error {
	sa := l.GetAddress().GetSocketAddress()
	ip, err := netip.ParseAddr(sa.GetAddress())
	if err != nil {
		return fmt.Errorf("address %q is not an IP", sa.GetAddress())
	}
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, uint16(sa.GetPortValue())).String())
	if err != nil {
		return fmt.Errorf("binding the listener socket: %w", err)
	}
	return ln.Close()
}

// hostOf returns the address of the first endpoint of a.
func hostOf(a *endpointv3.ClusterLoadAssignment) string {
	return a.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetAddress()
}

// localListener is a TCP proxy listener on 127.0.0.1:port.
func localListener(t *testing.T, name string, port uint32, cluster string) *listenerv3.Listener {
	return xdstest.TCPListener(t, name, "127.0.0.1", port, cluster, true)
}

func countNACKs(srv *xdsServer, typeURL string) int {
	n := 0
	for _, r := range srv.requests() {
		if r.typeURL == typeURL && r.hasError {
			n++
		}
	}
	return n
}

// An EDS update {a → 10.0.0.9, b → "not-an-ip"} is NACKed naming b alone; a's
// new assignment is in force and b keeps its last good one. A later CDS change
// (a new cluster c) while the server still holds the bad assignment is ACKed
// and applied: the rejected assignment blocks nothing.
func TestNACKRejectsOnlyTheInvalidAssignment(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		const a, b, c = "outbound|80||a.default.svc.cluster.local", "outbound|80||b.default.svc.cluster.local", "outbound|80||c.default.svc.cluster.local"
		srv := startXDS(t, "127.0.0.1:0", newCache())
		srv.set(t, snapshot(t, "v1", xdstest.EDSCluster(a), xdstest.EDSCluster(b),
			xdstest.Assignment(a, netip.MustParseAddrPort("10.0.0.1:80")), xdstest.Assignment(b, netip.MustParseAddrPort("10.0.0.2:80"))))
		rec := &recorder{t: t, reject: validate}
		cl := startClient(t, srv.addr, delta, 0, rec)
		v1 := rec.waitAccepted(t, wait, "v1", func(r *Resources) bool { return len(r.Endpoints) == 2 })
		xdstest.Eventually(t, wait, "EDS v1 ACK", func() bool { return srv.acked(EndpointType, "v1", delta) })

		srv.set(t, snapshot(t, "v2", xdstest.EDSCluster(a), xdstest.EDSCluster(b),
			xdstest.Assignment(a, netip.MustParseAddrPort("10.0.0.9:80")), xdstest.AssignmentOf(b, xdstest.HostPort("not-an-ip", 80))))
		var nack req
		xdstest.Eventually(t, wait, "EDS NACK", func() (ok bool) { nack, ok = srv.nack(EndpointType); return ok })
		want := `cluster_load_assignment "` + b + `": endpoints[0].lb_endpoints[0]: address "not-an-ip" is not an IP`
		if nack.errMsg != want {
			t.Errorf("NACK error_detail = %q, want %q", nack.errMsg, want)
		}
		if !delta && nack.version != "v1" {
			t.Errorf("NACK version_info = %q, want the accepted v1", nack.version)
		}
		v2 := rec.waitAccepted(t, wait, "a's new assignment", func(r *Resources) bool { return hostOf(r.Endpoints[a]) == "10.0.0.9" })
		if v2.Endpoints[b] != v1.Endpoints[b] {
			t.Errorf("b's assignment is %v, want its last good one (10.0.0.2)", v2.Endpoints[b])
		}
		if v2.Versions[EndpointType] != "v1" {
			t.Errorf("versions = %v, want EDS v1 kept by the NACK", v2.Versions)
		}
		// Identical NACKs are spaced as before (the SotW server resends v2).
		time.Sleep(300 * time.Millisecond)
		if n := countNACKs(srv, EndpointType); (delta && n != 1) || n > 10 {
			t.Errorf("%d EDS NACKs in 300ms", n)
		}
		acc := cl.Accepted()
		if acc != rec.lastAccepted() || hostOf(acc.Endpoints[a]) != "10.0.0.9" || acc.Endpoints[b] != v1.Endpoints[b] {
			t.Errorf("Accepted() = %s, not the last Resources the Applier took", describe(acc))
		}
		if err := cl.LastError(); err == nil || err.Error() != want {
			t.Errorf("LastError() = %v, want %q", err, want)
		}

		srv.set(t, snapshot(t, "v3", xdstest.EDSCluster(a), xdstest.EDSCluster(b), xdstest.EDSCluster(c),
			xdstest.Assignment(a, netip.MustParseAddrPort("10.0.0.9:80")), xdstest.AssignmentOf(b, xdstest.HostPort("not-an-ip", 80)), xdstest.Assignment(c, netip.MustParseAddrPort("10.0.0.3:80"))))
		xdstest.Eventually(t, wait, "CDS v3 ACK", func() bool { return srv.acked(ClusterType, "v3", delta) })
		v3 := rec.waitAccepted(t, wait, "cluster c", func(r *Resources) bool { return r.Clusters[c] != nil })
		if hostOf(v3.Endpoints[c]) != "10.0.0.3" || v3.Endpoints[b] != v1.Endpoints[b] || v3.Versions[ClusterType] != "v3" {
			t.Errorf("v3 applied as %s: c=%v b=%v", describe(v3), v3.Endpoints[c], v3.Endpoints[b])
		}
		if r, ok := srv.nack(ClusterType); ok {
			t.Errorf("CDS NACKed: %q", r.errMsg)
		}
		if st := cl.Stats(); st[StatCDSUpdateRejected] != 0 || st[StatCDSUpdateSuccess] < 2 {
			t.Errorf("stats = %v", st)
		}
		if cl.Accepted() != rec.lastAccepted() {
			t.Errorf("Accepted() is not the last Resources the Applier took")
		}
	})
}

// A CDS response with two invalid clusters (a changed one and a new one) and two
// valid ones: the valid ones are applied, the changed invalid one keeps its last
// good version, the new invalid one stays absent, and the NACK names both.
func TestNACKRejectsOnlyTheInvalidClusters(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		srv := startXDS(t, "127.0.0.1:0", newCache())
		srv.set(t, snapshot(t, "v1", xdstest.StaticCluster("s1", netip.MustParseAddrPort("10.0.0.1:80")), xdstest.StaticCluster("s2", netip.MustParseAddrPort("10.0.0.2:80"))))
		rec := &recorder{t: t, reject: validate}
		cl := startClient(t, srv.addr, delta, 0, rec)
		v1 := rec.waitAccepted(t, wait, "v1", func(r *Resources) bool { return len(r.Clusters) == 2 })

		srv.set(t, snapshot(t, "v2", xdstest.StaticCluster("s1", netip.MustParseAddrPort("10.0.0.11:80")), xdstest.Cluster("s2", xdstest.WithEndpoints(xdstest.HostPort("not-an-ip", 80))),
			xdstest.Cluster("s3", xdstest.WithEndpoints(xdstest.HostPort("bad-too", 80))), xdstest.StaticCluster("s4", netip.MustParseAddrPort("10.0.0.4:80"))))
		var nack req
		xdstest.Eventually(t, wait, "CDS NACK", func() (ok bool) { nack, ok = srv.nack(ClusterType); return ok })
		want := `cluster "s2": load_assignment.endpoints[0].lb_endpoints[0]: address "not-an-ip" is not an IP; ` +
			`cluster "s3": load_assignment.endpoints[0].lb_endpoints[0]: address "bad-too" is not an IP`
		if nack.errMsg != want {
			t.Errorf("NACK error_detail = %q, want %q", nack.errMsg, want)
		}
		v2 := rec.waitAccepted(t, wait, "s4", func(r *Resources) bool { return r.Clusters["s4"] != nil })
		if hostOf(v2.Clusters["s1"].GetLoadAssignment()) != "10.0.0.11" {
			t.Errorf("s1's change not applied")
		}
		if v2.Clusters["s2"] != v1.Clusters["s2"] {
			t.Errorf("s2 = %v, want its last good version", v2.Clusters["s2"])
		}
		if v2.Clusters["s3"] != nil || len(v2.Clusters) != 3 {
			t.Errorf("clusters = %v, want s1, s2, s4", slices.Sorted(maps.Keys(v2.Clusters)))
		}
		if v2.Versions[ClusterType] != "v1" {
			t.Errorf("CDS version = %q, want v1 kept by the NACK", v2.Versions[ClusterType])
		}
		if cl.Accepted() != rec.lastAccepted() || cl.Accepted().Clusters["s4"] == nil {
			t.Errorf("Accepted() = %s, not the last Resources the Applier took", describe(cl.Accepted()))
		}
		if st := cl.Stats(); st[StatCDSUpdateRejected] == 0 || st[StatCDSUpdateSuccess] == 0 {
			t.Errorf("stats = %v", st)
		}
		if err := cl.LastError(); err == nil || err.Error() != want {
			t.Errorf("LastError() = %v", err)
		}
	})
}

// A listener whose socket cannot be bound (its port is taken) is rejected with
// the bind error; the rest of the LDS update is applied, as Envoy does.
func TestNACKRejectsAListenerThatCannotBind(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		busy, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer busy.Close()
		port := uint32(busy.Addr().(*net.TCPAddr).Port)
		cluster := xdstest.StaticCluster("outbound|80||a.default.svc.cluster.local", netip.MustParseAddrPort("10.0.0.1:80"))
		l1 := localListener(t, "l1", 0, cluster.GetName())
		srv := startXDS(t, "127.0.0.1:0", newCache())
		srv.set(t, snapshot(t, "v1", cluster, l1))
		rec := &recorder{t: t, reject: validate}
		cl := startClient(t, srv.addr, delta, 0, rec)
		v1 := rec.waitAccepted(t, wait, "v1", func(r *Resources) bool { return r.Listeners["l1"] != nil })

		l2, l3 := localListener(t, "l2", port, cluster.GetName()), localListener(t, "l3", 0, cluster.GetName())
		srv.set(t, snapshot(t, "v2", cluster, l1, l2, l3))
		var nack req
		xdstest.Eventually(t, wait, "LDS NACK", func() (ok bool) { nack, ok = srv.nack(ListenerType); return ok })
		if !strings.HasPrefix(nack.errMsg, `listener "l2": binding the listener socket: `) ||
			!strings.Contains(nack.errMsg, "address already in use") || strings.Contains(nack.errMsg, "l3") {
			t.Errorf("NACK error_detail = %q, want l2's bind error alone", nack.errMsg)
		}
		v2 := rec.waitAccepted(t, wait, "l3", func(r *Resources) bool { return r.Listeners["l3"] != nil })
		if v2.Listeners["l2"] != nil || v2.Listeners["l1"] != v1.Listeners["l1"] || len(v2.Listeners) != 2 {
			t.Errorf("v2 applied as %s, want l1 and l3", describe(v2))
		}
		if v2.Versions[ListenerType] != "v1" {
			t.Errorf("versions = %v", v2.Versions)
		}
		if st := cl.Stats(); st[StatLDSUpdateRejected] == 0 || st[StatCDSUpdateRejected] != 0 {
			t.Errorf("stats = %v", st)
		}
		if cl.Accepted() != rec.lastAccepted() {
			t.Errorf("Accepted() is not the last Resources the Applier took")
		}
	})
}

// An error that names no resource rejects the whole update, as before: nothing
// it carried is applied, valid resources included.
func TestNACKPlainErrorRejectsTheWholeUpdate(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		const a, b = "outbound|80||a.default.svc.cluster.local", "outbound|80||b.default.svc.cluster.local"
		srv := startXDS(t, "127.0.0.1:0", newCache())
		srv.set(t, snapshot(t, "v1", xdstest.EDSCluster(a), xdstest.EDSCluster(b),
			xdstest.Assignment(a, netip.MustParseAddrPort("10.0.0.1:80")), xdstest.Assignment(b, netip.MustParseAddrPort("10.0.0.2:80"))))
		rec := &recorder{t: t, reject: func(r *Resources) error {
			for _, la := range r.Endpoints {
				if lbEndpoints(la) > 1 {
					return errors.New("endpoint table full")
				}
			}
			return validate(r)
		}}
		cl := startClient(t, srv.addr, delta, 0, rec)
		v1 := rec.waitAccepted(t, wait, "v1", func(r *Resources) bool { return len(r.Endpoints) == 2 })

		two := xdstest.Assignment(b, netip.MustParseAddrPort("10.0.0.2:80"))
		two.Endpoints[0].LbEndpoints = append(two.Endpoints[0].LbEndpoints, xdstest.Assignment(b, netip.MustParseAddrPort("10.0.0.3:80")).Endpoints[0].LbEndpoints...)
		srv.set(t, snapshot(t, "v2", xdstest.EDSCluster(a), xdstest.EDSCluster(b), xdstest.Assignment(a, netip.MustParseAddrPort("10.0.0.9:80")), two))
		var nack req
		xdstest.Eventually(t, wait, "EDS NACK", func() (ok bool) { nack, ok = srv.nack(EndpointType); return ok })
		if nack.errMsg != "endpoint table full" {
			t.Errorf("NACK error_detail = %q", nack.errMsg)
		}
		if !slices.ContainsFunc(rec.all(), func(r *Resources) bool { return hostOf(r.Endpoints[a]) == "10.0.0.9" }) {
			t.Fatal("the update never reached the Applier")
		}
		acc := cl.Accepted()
		if acc != rec.lastAccepted() || acc.Endpoints[a] != v1.Endpoints[a] || acc.Endpoints[b] != v1.Endpoints[b] || acc.Versions[EndpointType] != "v1" {
			t.Errorf("accepted %s after a plain error (a at %s), want v1's assignments", describe(acc), hostOf(acc.Endpoints[a]))
		}
		if err := cl.LastError(); err == nil || err.Error() != "endpoint table full" {
			t.Errorf("LastError() = %v", err)
		}
	})
}
