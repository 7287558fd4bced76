package cluster

import (
	"net/netip"
	"testing"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/upstream"
)

func hostAddrList(hs []*Host) []netip.AddrPort {
	out := make([]netip.AddrPort, len(hs))
	for i, h := range hs {
		out[i] = h.Address()
	}
	return out
}

func sameAddrList(a, b []netip.AddrPort) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestStageChangesNothingUntilCommit: a staged assignment is invisible
// (hosts, gauges, counters, warming) until Commit, which keeps the *Host
// of an address that stays, with its new weight; the Staged goes on
// reporting the set it put in force after a later update.
func TestStageChangesNothingUntilCommit(t *testing.T) {
	a, b, c9 := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("10.0.0.9:80")
	c := newTestCluster(t, xdstest.EDSCluster("eds"))
	if err := c.UpdateEndpoints(xdstest.AssignmentOf("eds", xdstest.EndpointsAt(a, b)...)); err != nil {
		t.Fatal(err)
	}
	hostA := c.Hosts()[0]
	before := c.Stats()

	e, err := ParseEndpoints(xdstest.AssignmentOf("eds", xdstest.Endpoint{Addr: a, Weight: 5}, xdstest.Endpoint{Addr: c9}))
	if err != nil {
		t.Fatal(err)
	}
	st, err := c.Stage(e)
	if err != nil {
		t.Fatal(err)
	}
	if got := hostAddrList(c.Hosts()); !sameAddrList(got, []netip.AddrPort{a, b}) || hostA.Weight() != 1 {
		t.Fatalf("Stage changed the cluster: hosts %v, weight of A %d", got, hostA.Weight())
	}
	for i, s := range c.Stats() {
		if s != before[i] {
			t.Fatalf("Stage moved %s: %d -> %d", s.Name, before[i].Value, s.Value)
		}
	}
	if got := hostAddrList(st.Hosts()); !sameAddrList(got, []netip.AddrPort{a, c9}) {
		t.Fatalf("staged hosts %v", got)
	}

	st.Commit()
	st.Commit() // idempotent
	hosts := c.Hosts()
	if got := hostAddrList(hosts); !sameAddrList(got, []netip.AddrPort{a, c9}) || hosts[0] != hostA || hostA.Weight() != 5 {
		t.Fatalf("after Commit: hosts %v, same *Host for A %v, weight %d", got, hosts[0] == hostA, hostA.Weight())
	}
	if stat(t, c, "update_success") != 2 || stat(t, c, "membership_total") != 2 || stat(t, c, "membership_change") != 2 {
		t.Fatalf("after Commit: update_success %d membership_total %d membership_change %d",
			stat(t, c, "update_success"), stat(t, c, "membership_total"), stat(t, c, "membership_change"))
	}

	if err := c.UpdateEndpoints(xdstest.AssignmentOf("eds", xdstest.Endpoint{Addr: b})); err != nil {
		t.Fatal(err)
	}
	if got := hostAddrList(st.Hosts()); !sameAddrList(got, []netip.AddrPort{a, c9}) {
		t.Fatalf("a committed Staged changed with a later update: %v", got)
	}
}

// TestCommitAfterAnotherUpdate: a set staged against hosts that another
// update replaced meanwhile is rebuilt against the hosts in force, so a
// commit never resurrects a host set that is gone.
func TestCommitAfterAnotherUpdate(t *testing.T) {
	a, b := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80")
	c := newTestCluster(t, xdstest.EDSCluster("eds"))
	if err := c.UpdateEndpoints(xdstest.AssignmentOf("eds", xdstest.Endpoint{Addr: a})); err != nil {
		t.Fatal(err)
	}
	e, err := ParseEndpoints(xdstest.AssignmentOf("eds", xdstest.EndpointsAt(a, b)...))
	if err != nil {
		t.Fatal(err)
	}
	st, _ := c.Stage(e)
	if err := c.UpdateEndpoints(xdstest.AssignmentOf("eds", xdstest.Endpoint{Addr: b})); err != nil {
		t.Fatal(err)
	}
	hostB := c.Hosts()[0]
	st.Commit()
	hosts := c.Hosts()
	if got := hostAddrList(hosts); !sameAddrList(got, []netip.AddrPort{a, b}) || hosts[1] != hostB {
		t.Fatalf("commit over a moved base: %v (same *Host for B: %v)", got, hosts[1] == hostB)
	}
	if got := hostAddrList(st.Hosts()); !sameAddrList(got, []netip.AddrPort{a, b}) {
		t.Fatalf("Staged reports %v, not what it put in force", got)
	}
}

func TestParseEndpointsNamesTheField(t *testing.T) {
	_, err := ParseEndpoints(xdstest.AssignmentOf("eds", xdstest.HostPort("not-an-ip", 80)))
	if err == nil || err.Error() != `cluster_load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: "not-an-ip" is not an IP address` {
		t.Fatalf("ParseEndpoints: %v", err)
	}
	if _, err := newTestCluster(t, xdstest.Cluster("s")).Stage(&Endpoints{}); err == nil {
		t.Fatal("an assignment staged for a STATIC cluster")
	}
}

// TestScopeOutlivesTheCluster: a cluster given the Scope of the one it
// replaces counts on from its values, and its membership gauges are its
// own hosts', not the Scope's.
func TestScopeOutlivesTheCluster(t *testing.T) {
	srv := startServer(t, "127.0.0.1", 0, false)
	c1 := newTestCluster(t, xdstest.Cluster("s", xdstest.WithEndpoints(xdstest.Endpoint{Addr: srv.addr})))
	mustConnect(t, c1).Close()
	c2, err := New(xdstest.Cluster("s"), Options{Dialer: &upstream.Dialer{}, Log: zerolog.Nop(), Stats: c1.Scope()})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if stat(t, c2, "upstream_cx_total") != 1 || stat(t, c2, "upstream_cx_destroy") != 1 {
		t.Fatalf("replacing cluster: upstream_cx_total %d, upstream_cx_destroy %d, want 1 and 1",
			stat(t, c2, "upstream_cx_total"), stat(t, c2, "upstream_cx_destroy"))
	}
	if stat(t, c2, "membership_total") != 0 || stat(t, c1, "membership_total") != 1 {
		t.Fatalf("membership_total: replacing %d (no hosts), replaced %d", stat(t, c2, "membership_total"), stat(t, c1, "membership_total"))
	}
}
