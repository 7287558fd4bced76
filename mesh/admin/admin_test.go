package admin

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"

	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/bootstrap"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
)

// newServer serves the repository's sample sidecar bootstrap.
func newServer(t *testing.T) *httptest.Server {
	t.Helper()
	b, err := bootstrap.Load("../../examples/sidecar-bootstrap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	snap := build(t, b)
	d := &mesh.Dispatcher{}
	d.Swap(snap)
	ts := httptest.NewServer((&Server{D: d, Start: time.Now()}).Handler())
	t.Cleanup(ts.Close)
	return ts
}

func build(t *testing.T, b *bootstrapv3.Bootstrap) *mesh.Snapshot {
	snap, err := mesh.Build("1", b.GetStaticResources().GetListeners(), b.GetStaticResources().GetClusters(), nil,
		mesh.BuildOptions{Roles: mesh.IstioRoles, Cluster: cluster.Options{Dialer: &upstream.Dialer{}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { snap.Retire(nil) })
	return snap
}

func get(t *testing.T, ts *httptest.Server, path string) (int, string) {
	t.Helper()
	resp, err := http.Get(ts.URL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestListeners(t *testing.T) {
	ts := newServer(t)
	code, body := get(t, ts, "/listeners")
	want := "virtualOutbound::0.0.0.0:15001\nvirtualInbound::0.0.0.0:15006\n10.96.0.20_9080::10.96.0.20:9080\n"
	if code != 200 || body != want {
		t.Fatalf("/listeners = %d %q, want %q", code, body, want)
	}
}

func TestClusters(t *testing.T) {
	ts := newServer(t)
	_, body := get(t, ts, "/clusters")
	c := "outbound|9080||reviews.default.svc.cluster.local"
	for _, line := range []string{
		c + "::observability_name::" + c,
		c + "::default_priority::max_connections::1024",
		c + "::high_priority::max_retries::3",
		c + "::added_via_api::false",
		c + "::10.250.1.10:9080::cx_active::0",
		c + "::10.250.1.10:9080::rq_total::0",
		c + "::10.250.1.11:9080::health_flags::healthy",
		c + "::10.250.1.11:9080::weight::1",
		c + "::10.250.1.11:9080::success_rate::-1",
		"PassthroughCluster::observability_name::PassthroughCluster;",
	} {
		if !strings.Contains(body, line+"\n") {
			t.Errorf("/clusters lacks %q", line)
		}
	}
	// Per-host counters come sorted by name, as Envoy prints them.
	var names []string
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, c+"::10.250.1.10:9080::") {
			names = append(names, strings.Split(l, "::")[2])
		}
	}
	wantOrder := "cx_active cx_connect_fail cx_total rq_active rq_error rq_success rq_timeout rq_total hostname health_flags"
	if got := strings.Join(names[:10], " "); got != wantOrder {
		t.Errorf("host lines in order %q, want %q", got, wantOrder)
	}
	_, filtered := get(t, ts, "/clusters?filter=^Pass")
	if strings.Contains(filtered, "BlackHole") || !strings.Contains(filtered, "PassthroughCluster::") {
		t.Errorf("filter not applied:\n%s", filtered)
	}
}

func TestStats(t *testing.T) {
	ts := newServer(t)
	_, body := get(t, ts, "/stats")
	for _, line := range []string{
		"server.state: 0", "server.live: 1", "listener_manager.workers_started: 1",
		"cluster_manager.active_clusters: 4", "listener_manager.total_listeners_active: 3",
		"listener.0.0.0.0_15001.downstream_cx_total: 0",
		"cluster.PassthroughCluster.upstream_cx_total: 0",
		"cluster.outbound|9080||reviews.default.svc.cluster.local.upstream_cx_overflow: 0",
	} {
		if !strings.Contains(body, line+"\n") {
			t.Errorf("/stats lacks %q", line)
		}
	}
	// pilot-agent's readiness query.
	_, ready := get(t, ts, "/stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started)")
	if ready != "listener_manager.workers_started: 1\nserver.state: 0\n" {
		t.Errorf("readiness stats %q", ready)
	}
	if code, body := get(t, ts, "/stats?filter=(("); code != 400 || !strings.Contains(body, "Invalid re2 regex") {
		t.Errorf("bad regex: %d %q", code, body)
	}
}

func TestUnknownPathAndReady(t *testing.T) {
	ts := newServer(t)
	if code, body := get(t, ts, "/nope"); code != 404 || !strings.Contains(body, "admin commands are:") || !strings.Contains(body, "/listeners") {
		t.Errorf("/nope = %d %q, want 404 with the help", code, body)
	}
	if code, body := get(t, ts, "/ready"); code != 200 || body != "LIVE\n" {
		t.Errorf("/ready = %d %q", code, body)
	}
	empty := httptest.NewServer((&Server{D: &mesh.Dispatcher{}, Start: time.Now()}).Handler())
	defer empty.Close()
	if code, body := get(t, empty, "/ready"); code != 503 || body != "PRE_INITIALIZING\n" {
		t.Errorf("/ready before any config = %d %q, want 503 PRE_INITIALIZING", code, body)
	}

	// With static resources in force but the first xDS response still to
	// come, Envoy is INITIALIZING: /ready 503, server.state 3.
	b, err := bootstrap.Load("../../examples/sidecar-bootstrap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	d := &mesh.Dispatcher{}
	d.Swap(build(t, b))
	var initialized atomic.Bool
	var why atomic.Value
	why.Store("")
	waiting := httptest.NewServer((&Server{D: d, Start: time.Now(), Initialized: initialized.Load,
		Waiting: func() string { return why.Load().(string) }}).Handler())
	defer waiting.Close()
	if code, body := get(t, waiting, "/ready"); code != 503 || body != "INITIALIZING\n" {
		t.Errorf("/ready before the first xDS config = %d %q, want 503 INITIALIZING", code, body)
	}
	// Warming on a secret: the state, then what it waits for.
	why.Store("waiting for secret ROOTCA from sds-grpc")
	if code, body := get(t, waiting, "/ready"); code != 503 || body != "INITIALIZING\nwaiting for secret ROOTCA from sds-grpc\n" {
		t.Errorf("/ready warming on a secret = %d %q", code, body)
	}
	if _, body := get(t, waiting, "/stats?filter=^server\\.(state|live)$"); body != "server.live: 1\nserver.state: 3\n" {
		t.Errorf("stats before the first xDS config: %q", body)
	}
	initialized.Store(true)
	if code, body := get(t, waiting, "/ready"); code != 200 || body != "LIVE\n" {
		t.Errorf("/ready once initialized = %d %q, want 200 LIVE", code, body)
	}
}

func TestExtraStatsForReadiness(t *testing.T) {
	b, err := bootstrap.Load("../../examples/sidecar-bootstrap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	d := &mesh.Dispatcher{}
	d.Swap(build(t, b))
	ts := httptest.NewServer((&Server{D: d, Start: time.Now(), Extra: func() map[string]uint64 {
		return map[string]uint64{"cluster_manager.cds.update_success": 2, "listener_manager.lds.update_success": 1, "listener_manager.lds.update_rejected": 0}
	}}).Handler())
	defer ts.Close()
	// pilot-agent's first readiness query.
	_, body := get(t, ts, "/stats?usedonly&filter=^(cluster_manager\\.cds|listener_manager\\.lds)\\.(update_success|update_rejected)$")
	if body != "cluster_manager.cds.update_success: 2\nlistener_manager.lds.update_success: 1\n" {
		t.Fatalf("readiness stats %q", body)
	}
}

// TestExtraGauges: the stats of other components whose names end in
// _active (the capture stack's half-open flows) or connected_state are
// gauges in /stats/prometheus; the others are counters.
func TestExtraGauges(t *testing.T) {
	d := &mesh.Dispatcher{}
	ts := httptest.NewServer((&Server{D: d, Start: time.Now(), Extra: func() map[string]uint64 {
		return map[string]uint64{"netstack.tcp.half_open_inbound_active": 3, "netstack.tcp.syncookies_sent": 7}
	}}).Handler())
	defer ts.Close()
	_, body := get(t, ts, "/stats/prometheus")
	for _, want := range []string{
		"# TYPE envoy_netstack_tcp_half_open_inbound_active gauge\nenvoy_netstack_tcp_half_open_inbound_active{} 3\n",
		"# TYPE envoy_netstack_tcp_syncookies_sent counter\nenvoy_netstack_tcp_syncookies_sent{} 7\n",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/stats/prometheus lacks %q:\n%s", want, body)
		}
	}
}
