package cluster

import (
	"context"
	"errors"
	"math"
	"net/netip"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
)

func TestRoundRobinExactRotation(t *testing.T) {
	srv := []*server{
		startServer(t, "127.0.0.1", 0, false),
		startServer(t, "127.0.0.1", 0, false),
		startServer(t, "127.0.0.1", 0, false),
	}
	c := newTestCluster(t, xdstest.Cluster("rr", xdstest.WithEndpoints(hostsOf(srv...)...)))
	pos := map[netip.AddrPort]int{}
	for i, s := range srv {
		pos[s.addr] = i
	}
	const n = 30
	prev := -1
	for i := 0; i < n; i++ {
		u := mustConnect(t, c)
		p := pos[u.Host().Address()]
		if prev >= 0 && p != (prev+1)%3 {
			t.Fatalf("connect %d went to host %d after host %d: not a rotation", i, p, prev)
		}
		prev = p
		u.Close()
	}
	xdstest.Eventually(t, 5*time.Second, "accepts", func() bool {
		return srv[0].accepts.Load()+srv[1].accepts.Load()+srv[2].accepts.Load() == n
	})
	for i, s := range srv {
		if got := s.accepts.Load(); got != n/3 {
			t.Errorf("server %d accepted %d, want %d", i, got, n/3)
		}
		if got := hostStat(c.Hosts()[i], "cx_total"); got != n/3 {
			t.Errorf("host %d cx_total %d, want %d", i, got, n/3)
		}
	}
	if got := stat(t, c, "upstream_cx_total"); got != n {
		t.Errorf("upstream_cx_total = %d", got)
	}
	if got := stat(t, c, "upstream_cx_destroy"); got != n {
		t.Errorf("upstream_cx_destroy = %d", got)
	}
	if got := stat(t, c, "upstream_cx_active"); got != 0 {
		t.Errorf("upstream_cx_active = %d", got)
	}
}

func TestWeightedRoundRobin(t *testing.T) {
	a := startServer(t, "127.0.0.1", 0, false)
	b := startServer(t, "127.0.0.1", 0, false)
	c := newTestCluster(t, xdstest.Cluster("wrr", xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: a.addr, Weight: 1}, xdstest.Endpoint{Addr: b.addr, Weight: 3})))
	const n = 400
	for i := 0; i < n; i++ {
		mustConnect(t, c).Close()
	}
	xdstest.Eventually(t, 5*time.Second, "accepts", func() bool { return a.accepts.Load()+b.accepts.Load() == n })
	within := func(got int64, want float64) bool { return math.Abs(float64(got)-want) <= 0.05*want }
	if !within(a.accepts.Load(), 100) || !within(b.accepts.Load(), 300) {
		t.Fatalf("split %d:%d, want 100:300 ±5%%", a.accepts.Load(), b.accepts.Load())
	}
}

func TestLeastRequestPrefersIdleHost(t *testing.T) {
	a := startServer(t, "127.0.0.1", 0, false)
	b := startServer(t, "127.0.0.1", 0, false)
	c := newTestCluster(t, xdstest.Cluster("lr", xdstest.WithLB(clusterv3.Cluster_LEAST_REQUEST), xdstest.WithEndpoints(hostsOf(a, b)...)))
	// Load the cluster, then free one host entirely.
	var held []*UpstreamConn
	for i := 0; i < 10; i++ {
		held = append(held, mustConnect(t, c))
	}
	busy := held[0].Host()
	var keep []*UpstreamConn
	for _, u := range held {
		if u.Host() == busy {
			keep = append(keep, u)
		} else {
			u.Close()
		}
	}
	if len(keep) < 3 {
		t.Fatalf("least request spread 10 connections unevenly: %d on one host", len(keep))
	}
	// Every new connection goes to the idle host while it has fewer.
	for i := 0; i < len(keep)-1; i++ {
		u := mustConnect(t, c)
		if u.Host() == busy {
			t.Fatalf("connect %d went to the busy host (%d active) instead of the idle one", i, busy.ActiveConnections())
		}
		defer u.Close()
	}
	for _, u := range keep {
		u.Close()
	}
}

func TestPriorityFailover(t *testing.T) {
	p0a := startServer(t, "127.0.0.1", 0, false)
	p0b := startServer(t, "127.0.0.1", 0, false)
	p1 := startServer(t, "127.0.0.1", 0, false)
	c := newTestCluster(t, xdstest.Cluster("prio", xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: p0a.addr, Health: corev3.HealthStatus_UNHEALTHY},
		xdstest.Endpoint{Addr: p0b.addr, Health: corev3.HealthStatus_DRAINING},
		xdstest.Endpoint{Addr: p1.addr, Priority: 1, Health: corev3.HealthStatus_HEALTHY})))
	for i := 0; i < 5; i++ {
		u := mustConnect(t, c)
		if u.Host().Address() != p1.addr {
			t.Fatalf("picked %s, want the priority 1 host", u.Host().Address())
		}
		u.Close()
	}
	hosts := c.Hosts()
	if got := hosts[0].HealthFlags(); got != "/failed_eds_health" {
		t.Errorf("unhealthy flags %q", got)
	}
	if got := hosts[1].HealthFlags(); got != "/eds_status_draining" {
		t.Errorf("draining flags %q", got)
	}
	if got := hosts[2].HealthFlags(); got != "healthy" || hosts[2].Priority() != 1 {
		t.Errorf("p1 host flags %q priority %d", got, hosts[2].Priority())
	}
	if got := stat(t, c, "membership_healthy"); got != 1 {
		t.Errorf("membership_healthy = %d", got)
	}
	if got := stat(t, c, "membership_total"); got != 3 {
		t.Errorf("membership_total = %d", got)
	}

	all := newTestCluster(t, xdstest.Cluster("down", xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: p0a.addr, Health: corev3.HealthStatus_UNHEALTHY},
		xdstest.Endpoint{Addr: p1.addr, Priority: 1, Health: corev3.HealthStatus_TIMEOUT})))
	_, err := all.Connect(context.Background(), netip.AddrPort{}, nil)
	if !errors.Is(err, ErrNoHealthyUpstream) {
		t.Fatalf("err = %v, want ErrNoHealthyUpstream", err)
	}
	if got := stat(t, all, "upstream_cx_none_healthy"); got != 1 {
		t.Errorf("upstream_cx_none_healthy = %d", got)
	}
	if p0a.accepts.Load() != 0 || p0b.accepts.Load() != 0 {
		t.Errorf("unhealthy hosts received connections")
	}
}

func TestDegradedUsedOnlyWithoutHealthy(t *testing.T) {
	c := newTestCluster(t, xdstest.Cluster("deg", xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:1"), Health: corev3.HealthStatus_DEGRADED},
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:2"), Priority: 1})))
	if h := c.pick(netip.AddrPort{}, nil); h.Address().Port() != 2 {
		t.Fatalf("picked %s, want the healthy priority 1 host over a degraded priority 0 one", h.Address())
	}
	c2 := newTestCluster(t, xdstest.Cluster("deg2", xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:1"), Health: corev3.HealthStatus_DEGRADED})))
	if h := c2.pick(netip.AddrPort{}, nil); h == nil || h.HealthFlags() != "/degraded_eds_health" {
		t.Fatalf("degraded host not used as last resort: %v", h)
	}
}

func TestExcludeFallsBackWhenAllExcluded(t *testing.T) {
	c := newTestCluster(t, xdstest.Cluster("one", xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:1")},
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:2"), Priority: 1})))
	h0 := c.Hosts()[0]
	if h := c.pick(netip.AddrPort{}, func(h *Host) bool { return h == h0 }); h.Priority() != 1 {
		t.Fatalf("excluding the only priority 0 host should spill to priority 1, got %s", h.Address())
	}
	if h := c.pick(netip.AddrPort{}, func(*Host) bool { return true }); h == nil {
		t.Fatal("with every host excluded a host must still be returned (Envoy retries the same host)")
	}
}

func TestLocalityWeighted(t *testing.T) {
	pb := xdstest.Cluster("loc", xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:1"), Zone: "a", LocalityWeight: 1},
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:2"), Zone: "b", LocalityWeight: 3},
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:3"), Zone: "b", LocalityWeight: 3},
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:4"), Zone: "c"})) // no weight: no traffic
	pb.CommonLbConfig = &clusterv3.Cluster_CommonLbConfig{
		LocalityConfigSpecifier: &clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig_{
			LocalityWeightedLbConfig: &clusterv3.Cluster_CommonLbConfig_LocalityWeightedLbConfig{}},
	}
	c := newTestCluster(t, pb)
	count := map[uint16]int{}
	for i := 0; i < 400; i++ {
		count[c.pick(netip.AddrPort{}, nil).Address().Port()]++
	}
	if count[1] != 100 || count[2]+count[3] != 300 || count[4] != 0 {
		t.Fatalf("locality split %v, want zone a 100, zone b 300, zone c 0", count)
	}
	if count[2] != 150 {
		t.Errorf("hosts within zone b split %d:%d", count[2], count[3])
	}
}

func TestWRRExactPerCycle(t *testing.T) {
	for _, weights := range [][]uint32{{1, 3}, {5, 1, 1}, {2, 3, 7, 11}, {1, 1, 1}, {100, 1}} {
		w := newWRR(weights)
		var total uint64
		for _, x := range weights {
			total += uint64(x)
		}
		got := make([]uint32, len(weights))
		start := uint64(12345)
		for k := start; k < start+total; k++ {
			got[w.at(k)]++
		}
		for i := range weights {
			if got[i] != weights[i] {
				t.Errorf("weights %v: one cycle gave %v", weights, got)
				break
			}
		}
	}
	// Interleaving: with 1:3 the light host never waits more than 4 picks.
	w := newWRR([]uint32{1, 3})
	last := -1
	for k := uint64(0); k < 40; k++ {
		if w.at(k) == 0 {
			if last >= 0 && k-uint64(last) > 4 {
				t.Fatalf("gap %d between picks of the light host", k-uint64(last))
			}
			last = int(k)
		}
	}
}

func TestRandomPolicy(t *testing.T) {
	c := newTestCluster(t, xdstest.Cluster("rnd", xdstest.WithLB(clusterv3.Cluster_RANDOM), xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:1")},
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:2"), Weight: 3})))
	count := map[uint16]int{}
	for i := 0; i < 4000; i++ {
		count[c.pick(netip.AddrPort{}, nil).Address().Port()]++
	}
	if count[1] < 800 || count[1] > 1200 {
		t.Fatalf("random 1:3 gave %v", count)
	}
}
