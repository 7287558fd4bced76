package xdsclient

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"strings"
	"testing"
	"time"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// newTestSession is a session on a fakeWire, driven by the test through handle.
func newTestSession(t *testing.T, delta bool, ift time.Duration, a Applier) (*Client, *session, *fakeWire) {
	t.Helper()
	c := New(Config{Server: "unused:1", Delta: delta, InitialFetchTimeout: ift, Log: zerolog.New(zerolog.NewTestWriter(t))}, a)
	s := newSession(c, context.Background())
	fw := &fakeWire{}
	s.w = fw
	t.Cleanup(s.stop)
	s.start()
	return c, s, fw
}

// raw is one resource of a test response, named and versioned as delta sends it.
func raw(t *testing.T, name, version string, m proto.Message) rawResource {
	return rawResource{name: name, version: version, any: xdstest.MustAny(t, m)}
}

// verdictOf returns the last request of k and fails unless it answers nonce.
func verdictOf(t *testing.T, fw *fakeWire, k kind, nonce string) sent {
	t.Helper()
	got, _ := fw.last(k)
	if !answered(fw, k, nonce) {
		t.Fatalf("%s: no ACK or NACK of nonce %s; last request %+v", kinds[k].noun, nonce, got)
	}
	return got
}

func answered(fw *fakeWire, k kind, nonce string) bool {
	got, ok := fw.last(k)
	return ok && len(got.acks) > 0 && got.acks[len(got.acks)-1].nonce == nonce
}

// After a partial NACK, the rejected assignment is forgotten: the next EDS update
// of another assignment is ACKed instead of failing on it again, and the per-
// resource versions a reconnect would send (initial_resource_versions) are the
// accepted ones: a's new version, b's old one.
func TestPartialNACKForgetsTheRejected(t *testing.T) {
	const a, b, c = "a", "b", "c"
	rec := &recorder{t: t, reject: validate}
	cl, s, fw := newTestSession(t, true, 0, rec)
	s.handle(&response{kind: kindCluster, nonce: "1", version: "c1", delta: true, resources: []rawResource{
		raw(t, a, "a-c1", xdstest.EDSCluster(a)), raw(t, b, "b-c1", xdstest.EDSCluster(b)),
	}})
	s.handle(&response{kind: kindEndpoint, nonce: "2", version: "e1", delta: true, resources: []rawResource{
		raw(t, a, "a1", xdstest.Assignment(a, netip.MustParseAddrPort("10.0.0.1:80"))), raw(t, b, "b1", xdstest.Assignment(b, netip.MustParseAddrPort("10.0.0.2:80"))),
	}})
	if v := verdictOf(t, fw, kindEndpoint, "2"); v.nack != nil {
		t.Fatalf("EDS e1 NACKed: %v", v.nack)
	}
	v1 := cl.Accepted()

	s.handle(&response{kind: kindEndpoint, nonce: "3", version: "e2", delta: true, resources: []rawResource{
		raw(t, a, "a2", xdstest.Assignment(a, netip.MustParseAddrPort("10.0.0.9:80"))), raw(t, b, "b2", xdstest.AssignmentOf(b, xdstest.HostPort("not-an-ip", 80))),
	}})
	v := verdictOf(t, fw, kindEndpoint, "3")
	if v.nack == nil || v.nack.Error() != `cluster_load_assignment "b": endpoints[0].lb_endpoints[0]: address "not-an-ip" is not an IP` {
		t.Fatalf("EDS e2 verdict: %v, want a NACK naming b", v.nack)
	}
	acc := cl.Accepted()
	if hostOf(acc.Endpoints[a]) != "10.0.0.9" || acc.Endpoints[b] != v1.Endpoints[b] || acc.Versions[EndpointType] != "e1" {
		t.Errorf("accepted after the partial NACK: a=%s b=%s versions=%v", hostOf(acc.Endpoints[a]), hostOf(acc.Endpoints[b]), acc.Versions)
	}
	if got, want := s.knownVersions(kindEndpoint), map[string]string{a: "a2", b: "b1"}; !maps.Equal(got, want) {
		t.Errorf("initial_resource_versions = %v, want %v", got, want)
	}
	if s.recv[kindEndpoint][b].msg != v1.Endpoints[b] {
		t.Errorf("the rejected assignment stays in the server's view")
	}

	s.handle(&response{kind: kindEndpoint, nonce: "4", version: "e3", delta: true, resources: []rawResource{
		raw(t, a, "a3", xdstest.Assignment(a, netip.MustParseAddrPort("10.0.0.10:80"))),
	}})
	if v := verdictOf(t, fw, kindEndpoint, "4"); v.nack != nil {
		t.Fatalf("EDS e3 (a only) NACKed: %v", v.nack)
	}
	acc = cl.Accepted()
	if hostOf(acc.Endpoints[a]) != "10.0.0.10" || acc.Endpoints[b] != v1.Endpoints[b] || acc.Versions[EndpointType] != "e3" {
		t.Errorf("accepted after e3: a=%s versions=%v", hostOf(acc.Endpoints[a]), acc.Versions)
	}

	// A new cluster and its assignment: ACKed, applied next to b's good one.
	s.handle(&response{kind: kindCluster, nonce: "5", version: "c2", delta: true, resources: []rawResource{
		raw(t, c, "c-c2", xdstest.EDSCluster(c)),
	}})
	s.handle(&response{kind: kindEndpoint, nonce: "6", version: "e4", delta: true, resources: []rawResource{
		raw(t, c, "c1", xdstest.Assignment(c, netip.MustParseAddrPort("10.0.0.3:80"))),
	}})
	if v := verdictOf(t, fw, kindCluster, "5"); v.nack != nil {
		t.Fatalf("CDS c2 NACKed: %v", v.nack)
	}
	if acc := cl.Accepted(); acc.Clusters[c] == nil || hostOf(acc.Endpoints[c]) != "10.0.0.3" || acc.Endpoints[b] != v1.Endpoints[b] {
		t.Errorf("accepted after c2: %s", describe(acc))
	}
	if cl.Accepted() != rec.lastAccepted() {
		t.Errorf("Accepted() is not the last Resources the Applier took")
	}
}

// firstOnly names only the first invalid resource per call: a careless Applier.
// The client repairs one resource per round, up to maxApplyRounds calls.
func firstOnly(r *Resources) error {
	if es, ok := AsResourceErrors(validate(r)); ok {
		return es[:1]
	}
	return nil
}

func TestRepairRoundsAreBounded(t *testing.T) {
	for _, delta := range []bool{false, true} {
		for _, bad := range []int{maxApplyRounds - 1, maxApplyRounds} {
			t.Run(fmt.Sprintf("delta=%v/bad=%d", delta, bad), func(t *testing.T) {
				rec := &recorder{t: t, reject: firstOnly}
				cl, s, fw := newTestSession(t, delta, 0, rec)
				rs := []rawResource{raw(t, "good", "1", xdstest.StaticCluster("good", netip.MustParseAddrPort("10.0.0.1:80")))}
				var want []string
				for i := range bad {
					name := fmt.Sprintf("bad%d", i)
					rs = append(rs, raw(t, name, "1", xdstest.Cluster(name, xdstest.WithEndpoints(xdstest.HostPort("not-an-ip", 80)))))
					want = append(want, fmt.Sprintf(`cluster %q`, name))
				}
				s.handle(&response{kind: kindCluster, nonce: "1", version: "v1", delta: delta, resources: rs})
				v := verdictOf(t, fw, kindCluster, "1")
				if len(rec.all()) != maxApplyRounds {
					t.Errorf("Apply called %d times, want %d", len(rec.all()), maxApplyRounds)
				}
				for _, w := range want[:min(bad, maxApplyRounds-1)] {
					if v.nack == nil || !strings.Contains(v.nack.Error(), w) {
						t.Errorf("NACK %v does not name %s", v.nack, w)
					}
				}
				acc := cl.Accepted()
				if bad < maxApplyRounds {
					if acc == nil || len(acc.Clusters) != 1 || acc.Clusters["good"] == nil || acc.Versions[ClusterType] != "" {
						t.Errorf("accepted %s, want the good cluster alone and no CDS version", describe(acc))
					}
				} else if acc != nil {
					t.Errorf("accepted %s after the rounds ran out, want nothing", describe(acc))
				}
			})
		}
	}
}

// A repair that cannot change anything (the Applier names a resource the update
// does not carry, or one at its accepted version) and a plain error after a repair
// reject the whole update.
func TestRepairThatCannotHelpRejectsTheWholeUpdate(t *testing.T) {
	t.Run("unchanged resource", func(t *testing.T) {
		rec := &recorder{t: t, reject: func(r *Resources) error {
			if len(r.Listeners) > 0 {
				return ResourceErrors{{TypeURL: ClusterType, Name: "x", Err: errors.New("no room for a listener")}}
			}
			return nil
		}}
		cl, s, fw := newTestSession(t, true, 0, rec)
		s.handle(&response{kind: kindCluster, nonce: "1", delta: true, resources: []rawResource{raw(t, "x", "1", xdstest.StaticCluster("x", netip.MustParseAddrPort("10.0.0.1:80")))}})
		v1 := cl.Accepted()
		s.handle(&response{kind: kindListener, nonce: "2", delta: true, resources: []rawResource{raw(t, "l1", "1", localListener(t, "l1", 0, "x"))}})
		v := verdictOf(t, fw, kindListener, "2")
		if v.nack == nil || v.nack.Error() != `cluster "x": no room for a listener` || len(rec.all()) != 2 {
			t.Errorf("LDS verdict %v after %d Apply calls, want one NACK naming x", v.nack, len(rec.all()))
		}
		if cl.Accepted() != v1 {
			t.Errorf("accepted %s, want the clusters alone", describe(cl.Accepted()))
		}
	})
	t.Run("plain error after a repair", func(t *testing.T) {
		calls := 0
		rec := &recorder{t: t, reject: func(r *Resources) error {
			if calls++; calls > 2 {
				return errors.New("endpoint table full")
			}
			return validate(r)
		}}
		cl, s, fw := newTestSession(t, true, 0, rec)
		s.handle(&response{kind: kindCluster, nonce: "1", delta: true, resources: []rawResource{
			raw(t, "a", "1", xdstest.EDSCluster("a")), raw(t, "b", "1", xdstest.EDSCluster("b"))}})
		s.handle(&response{kind: kindEndpoint, nonce: "2", delta: true, resources: []rawResource{
			raw(t, "a", "1", xdstest.Assignment("a", netip.MustParseAddrPort("10.0.0.1:80"))), raw(t, "b", "1", xdstest.Assignment("b", netip.MustParseAddrPort("10.0.0.2:80")))}})
		v1 := cl.Accepted()
		s.handle(&response{kind: kindEndpoint, nonce: "3", delta: true, resources: []rawResource{
			raw(t, "a", "2", xdstest.Assignment("a", netip.MustParseAddrPort("10.0.0.9:80"))), raw(t, "b", "2", xdstest.AssignmentOf("b", xdstest.HostPort("not-an-ip", 80)))}})
		v := verdictOf(t, fw, kindEndpoint, "3")
		want := `cluster_load_assignment "b": endpoints[0].lb_endpoints[0]: address "not-an-ip" is not an IP` + "\nendpoint table full"
		if v.nack == nil || v.nack.Error() != want {
			t.Errorf("EDS verdict %q, want %q", v.nack, want)
		}
		if cl.Accepted() != v1 || cl.LastError() == nil || cl.LastError().Error() != want {
			t.Errorf("accepted %s, LastError %v: want v1 and the NACK", describe(cl.Accepted()), cl.LastError())
		}
		// b was not forgotten: a whole rejection leaves the server's view as it is.
		if hostOf(s.recv[kindEndpoint]["b"].msg.(*endpointv3.ClusterLoadAssignment)) != "not-an-ip" {
			t.Errorf("the server's view lost b after a whole rejection")
		}
	})
}

// A route configuration ACKed on arrival (nothing in force used it) and rejected
// when the listener that needs it is applied: the listener is applied with an
// empty route configuration in its place, as after the initial fetch timeout, and
// the LDS response that brought it into use is NACKed naming the route.
func TestRejectedRouteOfAWarmingListener(t *testing.T) {
	rec := &recorder{t: t, reject: validate}
	cl, s, fw := newTestSession(t, true, 50*time.Millisecond, rec)
	s.handle(&response{kind: kindCluster, nonce: "c", delta: true, resources: []rawResource{raw(t, "x", "1", xdstest.StaticCluster("x", netip.MustParseAddrPort("10.0.0.1:80")))}})
	var l1, l2, l3 *listenerv3.Listener
	for i, l := range []**listenerv3.Listener{&l1, &l2, &l3} {
		*l = xdstest.HTTPListener(t, fmt.Sprintf("l%d", i+1), "127.0.0.1", 0, fmt.Sprintf("r%d", i+1), true)
	}
	s.handle(&response{kind: kindListener, nonce: "l1", version: "1", delta: true, resources: []rawResource{raw(t, "l1", "1", l1)}})
	s.handle(&response{kind: kindRoute, nonce: "r1", version: "1", delta: true, resources: []rawResource{raw(t, "r1", "1", xdstest.RouteConfig("r1", "x"))}})
	if v := verdictOf(t, fw, kindListener, "l1"); v.nack != nil || cl.Accepted().Listeners["l1"] == nil {
		t.Fatalf("l1 not applied: %v", v.nack)
	}

	s.handle(&response{kind: kindListener, nonce: "l2", version: "2", delta: true, resources: []rawResource{
		raw(t, "l1", "1", l1), raw(t, "l2", "2", l2), raw(t, "l3", "2", l3)}})
	bad := xdstest.RouteConfig("r2", "x")
	bad.VirtualHosts[0].Domains = []string{"not a domain"}
	s.handle(&response{kind: kindRoute, nonce: "r2", version: "2", delta: true, resources: []rawResource{raw(t, "r2", "2", bad)}})
	if v := verdictOf(t, fw, kindRoute, "r2"); v.nack != nil {
		t.Fatalf("r2 NACKed on arrival: %v", v.nack) // nothing in force uses it yet
	}
	// r3 never comes: its initial fetch timeout completes the listener update.
	deadline := time.After(wait)
	for !answered(fw, kindListener, "l2") {
		select {
		case f := <-s.events:
			f()
		case <-deadline:
			t.Fatal("the listener update was never applied")
		}
	}
	v := verdictOf(t, fw, kindListener, "l2")
	if v.nack == nil || v.nack.Error() != `route_configuration "r2": virtual_hosts[0].domains[0]: "not a domain" is not a domain` {
		t.Errorf("LDS verdict %v, want a NACK naming r2", v.nack)
	}
	acc := cl.Accepted()
	if r2 := acc.Routes["r2"]; r2 == nil || len(r2.GetVirtualHosts()) != 0 || acc.Listeners["l3"] == nil || acc.Versions[ListenerType] != "1" {
		t.Errorf("accepted %s, r2 = %v: want l2 with an empty r2 and LDS version 1", describe(acc), acc.Routes["r2"])
	}
	if s.recv[kindRoute]["r2"] == nil || s.recv[kindRoute]["r2"].msg != acc.Routes["r2"] {
		t.Errorf("the server's view of r2 is not the empty stand-in in force")
	}
	if st := cl.Stats(); st[StatLDSUpdateRejected] != 1 || st[StatLDSUpdateSuccess] != 1 {
		t.Errorf("stats = %v", st)
	}
}

// An assignment that arrives stops its initial fetch timer: the timer of
// one still awaited goes on, the others no longer hold memory until they
// would have fired (10,000 of them at 10,000 services).
func TestArrivalStopsFetchTimer(t *testing.T) {
	for _, delta := range []bool{false, true} {
		t.Run(fmt.Sprintf("delta=%v", delta), func(t *testing.T) {
			_, s, fw := newTestSession(t, delta, time.Hour, &recorder{t: t})
			s.handle(&response{kind: kindCluster, nonce: "1", version: "c1", delta: delta, resources: []rawResource{
				raw(t, "a", "a-c1", xdstest.EDSCluster("a")), raw(t, "b", "b-c1", xdstest.EDSCluster("b")),
			}})
			if n := len(s.fetchTimers[kindEndpoint]); n != 2 {
				t.Fatalf("%d fetch timers after CDS, want 2 (a, b)", n)
			}
			// Subscribed together: one timer for both.
			batch := s.fetchTimers[kindEndpoint]["a"]
			if batch == nil || s.fetchTimers[kindEndpoint]["b"] != batch || batch.left != 2 {
				t.Fatalf("a and b do not share one initial fetch timer: %v", s.fetchTimers[kindEndpoint])
			}
			s.handle(&response{kind: kindEndpoint, nonce: "2", version: "e1", delta: delta, resources: []rawResource{
				raw(t, "a", "a1", xdstest.Assignment("a", netip.MustParseAddrPort("10.0.0.1:80"))),
			}})
			if _, ok := s.fetchTimers[kindEndpoint]["b"]; !ok || len(s.fetchTimers[kindEndpoint]) != 1 {
				t.Fatalf("fetch timers after a arrived: %v, want b's only", s.fetchTimers[kindEndpoint])
			}
			s.handle(&response{kind: kindEndpoint, nonce: "3", version: "e2", delta: delta, resources: []rawResource{
				raw(t, "a", "a1", xdstest.Assignment("a", netip.MustParseAddrPort("10.0.0.1:80"))),
				raw(t, "b", "b1", xdstest.Assignment("b", netip.MustParseAddrPort("10.0.0.2:80"))),
			}})
			if n := len(s.fetchTimers[kindEndpoint]); n != 0 {
				t.Fatalf("%d fetch timers once both arrived, want 0", n)
			}
			if batch.t.Stop() {
				t.Fatal("the timer was still running once all its names arrived")
			}
			if v := verdictOf(t, fw, kindEndpoint, "3"); v.nack != nil {
				t.Fatalf("EDS NACKed: %v", v.nack)
			}
		})
	}
}
