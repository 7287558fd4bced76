package xdsclient

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/rs/zerolog"
	"google.golang.org/grpc/codes"

	"github.com/meshtun/meshtun/internal/xdstest"
)

const wait = 5 * time.Second

var allTypes = []string{ClusterType, EndpointType, ListenerType, RouteType}

// CDS (an EDS cluster and a STATIC one), EDS, LDS and RDS delivered: Apply sees the
// EDS cluster only together with its endpoints and the listener only with its
// route, every type is ACKed with the version it was sent, CDS is requested first
// and LDS only after EDS, and the node goes out once per stream.
func TestDeliversConsistentConfig(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		srv := startXDS(t, "127.0.0.1:0", newCache())
		srv.set(t, snapshot(t, "v1",
			xdstest.EDSCluster("outbound|80||a.default.svc.cluster.local"),
			xdstest.StaticCluster("BlackHoleCluster", netip.MustParseAddrPort("127.0.0.1:9")),
			xdstest.Assignment("outbound|80||a.default.svc.cluster.local", netip.MustParseAddrPort("10.1.0.9:8080")),
			xdstest.HTTPListener(t, "0.0.0.0_80", "0.0.0.0", 80, "80", true),
			xdstest.RouteConfig("80", "outbound|80||a.default.svc.cluster.local"),
		))
		rec := &recorder{t: t}
		c := startClient(t, srv.addr, delta, 0, rec)

		got := rec.waitApply(t, wait, "clusters, endpoints, listener and route", func(r *Resources) bool {
			return len(r.Clusters) == 2 && len(r.Listeners) == 1 && r.Routes["80"] != nil
		})
		for _, call := range rec.all() {
			if call.Clusters["outbound|80||a.default.svc.cluster.local"] != nil &&
				lbEndpoints(call.Endpoints["outbound|80||a.default.svc.cluster.local"]) != 1 {
				t.Errorf("Apply got the EDS cluster without its endpoints: %s", describe(call))
			}
		}
		for _, typ := range allTypes {
			if got.Versions[typ] != "v1" {
				t.Errorf("Versions[%s] = %q, want v1", typ, got.Versions[typ])
			}
		}
		for _, typ := range allTypes {
			xdstest.Eventually(t, wait, "ACK of "+typ, func() bool { return srv.acked(typ, "v1", delta) })
		}
		// The cluster update warmed until its endpoints arrived: CDS was ACKed only
		// after the EDS response had been sent.
		cdsAck, _ := srv.ack(ClusterType, "v1", delta)
		firstEDS := slices.IndexFunc(srv.responses(), func(r resp) bool { return r.typeURL == EndpointType })
		if firstEDS < 0 || cdsAck.seq < srv.responses()[firstEDS].seq {
			t.Errorf("CDS ACKed (seq %d) before any EDS response was sent", cdsAck.seq)
		}
		if c.Accepted() != rec.all()[len(rec.all())-1] {
			t.Errorf("Accepted() is not the last applied Resources")
		}

		reqs := srv.requests()
		if reqs[0].typeURL != ClusterType {
			t.Errorf("first request is for %s, want CDS", reqs[0].typeURL)
		}
		firstOf := func(typ string) int {
			return slices.IndexFunc(reqs, func(r req) bool { return r.typeURL == typ })
		}
		if e, l := firstOf(EndpointType), firstOf(ListenerType); e < 0 || l < e {
			t.Errorf("LDS requested at %d, before EDS at %d", l, e)
		}
		for id, nodes := range srv.nodesOnWire() {
			if len(nodes) == 0 || !nodes[0] || slices.Contains(nodes[1:], true) {
				t.Errorf("stream %d: node on requests %v, want on the first only", id, nodes)
			}
		}
		// An endpoint-only change reaches Apply with the clusters untouched.
		srv.set(t, snapshot(t, "v2",
			xdstest.EDSCluster("outbound|80||a.default.svc.cluster.local"),
			xdstest.StaticCluster("BlackHoleCluster", netip.MustParseAddrPort("127.0.0.1:9")),
			xdstest.Assignment("outbound|80||a.default.svc.cluster.local", netip.MustParseAddrPort("10.1.0.10:8080")),
			xdstest.HTTPListener(t, "0.0.0.0_80", "0.0.0.0", 80, "80", true),
			xdstest.RouteConfig("80", "outbound|80||a.default.svc.cluster.local"),
		))
		moved := rec.waitApply(t, wait, "new endpoint", func(r *Resources) bool {
			a := r.Endpoints["outbound|80||a.default.svc.cluster.local"]
			return a.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetAddress() == "10.1.0.10"
		})
		for name, cl := range got.Clusters {
			if moved.Clusters[name] != cl {
				t.Errorf("cluster %q got a new pointer though it did not change", name)
			}
		}
		if moved.Listeners["0.0.0.0_80"] != got.Listeners["0.0.0.0_80"] {
			t.Errorf("listener got a new pointer though it did not change")
		}

		st := c.Stats()
		if st[StatCDSUpdateSuccess] == 0 || st[StatLDSUpdateSuccess] == 0 || st[StatConnectedState] != 1 ||
			st[StatCDSUpdateRejected]+st[StatLDSUpdateRejected] != 0 || st[StatUpdateAttempt] < 4 {
			t.Errorf("stats = %v", st)
		}
	})
}

// An update the Applier rejects is NACKed with its error and changes nothing; the
// corrected update that follows is applied.
func TestRejectedUpdateKeepsPreviousState(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		srv := startXDS(t, "127.0.0.1:0", newCache())
		cluster := xdstest.StaticCluster("outbound|9080||reviews.default.svc.cluster.local", netip.MustParseAddrPort("10.1.0.3:9080"))
		good := xdstest.TCPListener(t, "10.1.0.7_9080", "0.0.0.0", 9080, cluster.GetName(), true)
		bad := xdstest.TCPListener(t, "bad", "0.0.0.0", 9, cluster.GetName(), true)
		srv.set(t, snapshot(t, "v1", cluster, good))
		rec := &recorder{t: t, reject: func(r *Resources) error {
			if r.Listeners["bad"] != nil {
				return fmt.Errorf("listener %q: port 9 is reserved", "bad")
			}
			return nil
		}}
		c := startClient(t, srv.addr, delta, 0, rec)
		v1 := rec.waitApply(t, wait, "v1", func(r *Resources) bool { return r.Versions[ListenerType] == "v1" })

		srv.set(t, snapshot(t, "v2", cluster, good, bad))
		var nack req
		xdstest.Eventually(t, wait, "LDS NACK", func() (ok bool) { nack, ok = srv.nack(ListenerType); return ok })
		if !strings.Contains(nack.errMsg, `listener "bad": port 9 is reserved`) || nack.errCode != int32(codes.InvalidArgument) {
			t.Errorf("NACK error_detail = %d %q", nack.errCode, nack.errMsg)
		}
		if !delta && nack.version != "v1" {
			t.Errorf("NACK version_info = %q, want the accepted v1", nack.version)
		}
		// go-control-plane's SotW server answers each NACK with the rejected version
		// again; the client spaces its identical NACKs instead of spinning.
		time.Sleep(300 * time.Millisecond)
		nacks := 0
		for _, r := range srv.requests() {
			if r.typeURL == ListenerType && r.hasError {
				nacks++
			}
		}
		if (delta && nacks != 1) || nacks > 10 {
			t.Errorf("%d NACKs in 300ms", nacks)
		}
		acc := c.Accepted()
		if acc.Listeners["bad"] != nil || acc.Versions[ListenerType] != "v1" || acc.Listeners[good.GetName()] != v1.Listeners[good.GetName()] ||
			reflect.ValueOf(acc.Listeners).UnsafePointer() != reflect.ValueOf(v1.Listeners).UnsafePointer() {
			t.Errorf("accepted after the NACK: %s; want v1's listeners unchanged", describe(acc))
		}
		if err := c.LastError(); err == nil || !strings.Contains(err.Error(), `"bad"`) {
			t.Errorf("LastError() = %v", err)
		}
		if c.Stats()[StatLDSUpdateRejected] == 0 {
			t.Errorf("stats = %v, want an LDS rejection", c.Stats())
		}

		fixed := xdstest.TCPListener(t, "10.1.0.7_9443", "0.0.0.0", 9443, cluster.GetName(), true)
		srv.set(t, snapshot(t, "v3", cluster, good, fixed))
		v3 := rec.waitApply(t, wait, "v3", func(r *Resources) bool { return r.Listeners[fixed.GetName()] != nil })
		if v3.Listeners["bad"] != nil || v3.Versions[ListenerType] != "v3" {
			t.Errorf("v3 applied as %s", describe(v3))
		}
		xdstest.Eventually(t, wait, "LDS v3 ACK", func() bool { return srv.acked(ListenerType, "v3", delta) })
		if c.Accepted() != v3 && c.Accepted().Versions[ListenerType] != "v3" {
			t.Errorf("accepted = %s, want v3", describe(c.Accepted()))
		}
	})
}

// The control plane goes away and comes back on the same address: the client keeps
// its configuration meanwhile, reconnects, tells the new server what it has
// (version_info, or initial_resource_versions in delta) and applies what is new.
func TestReconnectsAndResumes(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		cluster := xdstest.StaticCluster("outbound|80||a.default.svc.cluster.local", netip.MustParseAddrPort("10.1.0.9:80"))
		l1 := xdstest.TCPListener(t, "l1", "0.0.0.0", 8001, cluster.GetName(), true)
		srv := startXDS(t, "127.0.0.1:0", newCache())
		srv.set(t, snapshot(t, "v1", cluster, l1))
		rec := &recorder{t: t}
		c := startClient(t, srv.addr, delta, 0, rec)
		rec.waitApply(t, wait, "v1", func(r *Resources) bool { return r.Listeners["l1"] != nil })
		xdstest.Eventually(t, wait, "LDS v1 ACK", func() bool { return srv.acked(ListenerType, "v1", delta) })

		srv.shutdown()
		xdstest.Eventually(t, wait, "disconnect", func() bool { return c.Stats()[StatConnectedState] == 0 })
		if acc := c.Accepted(); acc == nil || acc.Listeners["l1"] == nil {
			t.Fatalf("accepted state dropped while disconnected: %s", describe(acc))
		}

		l2 := xdstest.TCPListener(t, "l2", "0.0.0.0", 8002, cluster.GetName(), true)
		srv2 := startXDS(t, srv.addr, newCache())
		srv2.set(t, snapshot(t, "v2", cluster, l1, l2))
		rec.waitApply(t, 10*time.Second, "v2 after reconnect", func(r *Resources) bool { return r.Listeners["l2"] != nil })

		reqs := srv2.requests()
		first := map[string]req{}
		for _, r := range reqs {
			if _, ok := first[r.typeURL]; !ok {
				first[r.typeURL] = r
			}
		}
		for _, typ := range []string{ClusterType, ListenerType} {
			r := first[typ]
			switch {
			case delta && len(r.initial) == 0:
				t.Errorf("first %s request after reconnect has no initial_resource_versions", typ)
			case !delta && r.version != "v1":
				t.Errorf("first %s request after reconnect has version_info %q, want v1", typ, r.version)
			}
		}
		if delta && first[ListenerType].initial["l1"] == "" {
			t.Errorf("initial_resource_versions for LDS = %v, want l1", first[ListenerType].initial)
		}
		for id, nodes := range srv2.nodesOnWire() {
			if len(nodes) == 0 || !nodes[0] || slices.Contains(nodes[1:], true) {
				t.Errorf("stream %d: node on requests %v, want on the first only", id, nodes)
			}
		}
		if c.Stats()[StatConnectedState] != 1 {
			t.Errorf("connected_state = %d", c.Stats()[StatConnectedState])
		}
	})
}

// A listener removed from the snapshot disappears from the next Resources, and so
// does the route configuration only it used (the RDS subscription drops it).
func TestRemovedListenerDisappears(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		cluster := xdstest.StaticCluster("outbound|80||a.default.svc.cluster.local", netip.MustParseAddrPort("10.1.0.9:80"))
		l1, l2 := xdstest.HTTPListener(t, "l1", "0.0.0.0", 8001, "r1", true), xdstest.HTTPListener(t, "l2", "0.0.0.0", 8002, "r2", true)
		r1, r2 := xdstest.RouteConfig("r1", cluster.GetName()), xdstest.RouteConfig("r2", cluster.GetName())
		srv := startXDS(t, "127.0.0.1:0", newCache())
		srv.set(t, snapshot(t, "v1", cluster, l1, l2, r1, r2))
		rec := &recorder{t: t}
		c := startClient(t, srv.addr, delta, 0, rec)
		v1 := rec.waitApply(t, wait, "both listeners", func(r *Resources) bool { return len(r.Listeners) == 2 && len(r.Routes) == 2 })

		srv.set(t, snapshot(t, "v2", cluster, l1, r1))
		v2 := rec.waitApply(t, wait, "l2 removed", func(r *Resources) bool { return r.Listeners["l2"] == nil && len(r.Listeners) == 1 })
		if v2.Routes["r2"] != nil || v2.Routes["r1"] == nil {
			t.Errorf("routes after removal: %s", describe(v2))
		}
		if v2.Listeners["l1"] != v1.Listeners["l1"] {
			t.Errorf("unchanged listener l1 got a new pointer")
		}
		xdstest.Eventually(t, wait, "RDS unsubscribe of r2", func() bool {
			return slices.ContainsFunc(srv.requests(), func(r req) bool {
				if r.typeURL != RouteType {
					return false
				}
				if delta {
					return slices.Contains(r.unsubscribe, "r2")
				}
				return slices.Equal(r.names, []string{"r1"})
			})
		})
		if c.Accepted().Listeners["l2"] != nil {
			t.Errorf("accepted still has l2")
		}
	})
}

// An EDS cluster whose endpoints never come is applied with an empty assignment once
// the initial fetch timeout passes, and listeners follow.
func TestInitialFetchTimeout(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		const ift = 300 * time.Millisecond
		srv := startXDS(t, "127.0.0.1:0", newCache())
		missing := xdstest.EDSCluster("outbound|80||gone.default.svc.cluster.local")
		srv.set(t, snapshot(t, "v1", missing, xdstest.TCPListener(t, "l1", "0.0.0.0", 8001, missing.GetName(), true)))
		rec := &recorder{t: t}
		start := time.Now()
		startClient(t, srv.addr, delta, ift, rec)

		got := rec.waitApply(t, wait, "cluster applied", func(r *Resources) bool { return r.Clusters[missing.GetName()] != nil })
		if el := time.Since(start); el < ift {
			t.Errorf("applied after %v, before the %v timeout", el, ift)
		}
		if a := got.Endpoints[missing.GetName()]; a == nil || lbEndpoints(a) != 0 {
			t.Errorf("endpoints = %v, want an empty assignment", a)
		}
		rec.waitApply(t, wait, "listener after the clusters", func(r *Resources) bool { return r.Listeners["l1"] != nil })
		xdstest.Eventually(t, wait, "CDS ACK", func() bool { return srv.acked(ClusterType, "v1", delta) })
	})
}

// TestWarmingIsVisible: while a listener waits for its route configuration
// and a cluster for its endpoints, Warming reports them (the admin dumps
// them as warming states); once what they wait for arrives, nothing warms.
func TestWarmingIsVisible(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		srv := startXDS(t, "127.0.0.1:0", newCache())
		c1 := xdstest.EDSCluster("outbound|80||a.default.svc.cluster.local")
		l1 := xdstest.HTTPListener(t, "0.0.0.0_80", "0.0.0.0", 80, "80", true)
		// The listener names route "80" and the cluster its assignment;
		// neither is in the snapshot.
		srv.set(t, snapshot(t, "v1", c1))
		rec := &recorder{t: t}
		cl := startClient(t, srv.addr, delta, time.Minute, rec)
		xdstest.Eventually(t, wait, "cluster warming", func() bool {
			w := cl.Warming()
			return w != nil && w.Clusters[c1.GetName()].Msg != nil && len(w.Listeners) == 0
		})
		if r := cl.Warming().Clusters[c1.GetName()]; r.Since.IsZero() || (!delta && r.Version != "v1") {
			t.Errorf("warming cluster %+v, want its arrival time and version", r)
		}
		if cl.Accepted() != nil {
			t.Fatal("a configuration was applied while its only cluster warms")
		}
		srv.set(t, snapshot(t, "v2", c1, xdstest.Assignment(c1.GetName(), netip.MustParseAddrPort("10.0.0.1:80")), l1))
		xdstest.Eventually(t, wait, "listener warming", func() bool {
			w := cl.Warming()
			return w != nil && w.Listeners[l1.GetName()].Msg != nil && len(w.Clusters) == 0
		})
		rec.waitApply(t, wait, "cluster in force", func(r *Resources) bool { return r.Clusters[c1.GetName()] != nil })
		srv.set(t, snapshot(t, "v3", c1, xdstest.Assignment(c1.GetName(), netip.MustParseAddrPort("10.0.0.1:80")), l1, xdstest.RouteConfig("80", c1.GetName())))
		rec.waitApply(t, wait, "listener in force", func(r *Resources) bool { return r.Listeners[l1.GetName()] != nil })
		xdstest.Eventually(t, wait, "nothing warming", func() bool { return cl.Warming() == nil })
	})
}

// Config.Busy is called for a response of LargeResponse resources or more,
// not for a small one, and its done once the client is through with the
// response: the update applied and ACKed.
func TestBusyAroundLargeResponses(t *testing.T) {
	modes(t, func(t *testing.T, delta bool) {
		srv := startXDS(t, "127.0.0.1:0", newCache())
		srv.set(t, snapshot(t, "v1", xdstest.StaticCluster("small", netip.MustParseAddrPort("127.0.0.1:9"))))
		rec := &recorder{t: t}
		var mu sync.Mutex
		var busy, done, appliedAtDone int
		c := New(Config{
			Server: srv.addr, Delta: delta, Node: &corev3.Node{Id: testNodeID, Cluster: "app.default"},
			Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
			Busy: func() func() {
				mu.Lock()
				busy++
				mu.Unlock()
				return func() {
					mu.Lock()
					defer mu.Unlock()
					done++
					if a := rec.lastAccepted(); a != nil {
						appliedAtDone = len(a.Clusters)
					}
				}
			},
		}, rec)
		runClient(t, c)
		rec.waitApply(t, wait, "the small update", func(r *Resources) bool { return len(r.Clusters) == 1 })
		mu.Lock()
		if busy != 0 {
			t.Errorf("Busy called %d times for a one-cluster response", busy)
		}
		mu.Unlock()

		var rs []types.Resource
		for i := range LargeResponse {
			rs = append(rs, xdstest.StaticCluster(fmt.Sprintf("c%d", i), netip.MustParseAddrPort("127.0.0.1:9")))
		}
		srv.set(t, snapshot(t, "v2", rs...))
		xdstest.Eventually(t, wait, "ACK of the large update", func() bool { return srv.acked(ClusterType, "v2", delta) })
		xdstest.Eventually(t, wait, "done of the large response", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return done >= 1
		})
		mu.Lock()
		defer mu.Unlock()
		if busy != 1 || done != 1 {
			t.Errorf("Busy %d, done %d: want one each for the one large response", busy, done)
		}
		if appliedAtDone != LargeResponse {
			t.Errorf("at done, %d clusters applied, want the %d of the large response", appliedAtDone, LargeResponse)
		}
	})
}

// The receive pool hands out buffers of the length asked for, and a large
// one (a whole big response) is never kept for reuse; small ones go to
// gRPC's pool.
func TestRecvPoolDropsLargeBuffers(t *testing.T) {
	var p recvPool
	small := p.Get(100)
	if len(*small) != 100 {
		t.Fatalf("small buffer: len %d, want 100", len(*small))
	}
	p.Put(small)
	big := p.Get(pooledMax + 1)
	if len(*big) != pooledMax+1 {
		t.Fatalf("large buffer: len %d, want %d", len(*big), pooledMax+1)
	}
	first := &(*big)[0]
	p.Put(big)
	again := p.Get(pooledMax + 1)
	if &(*again)[0] == first {
		t.Fatal("a large buffer was kept and handed out again")
	}
}
