package admin

import (
	"flag"
	"net/http/httptest"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/bootstrap"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata")

// golden compares got with testdata/name line by line (-update rewrites it).
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := "testdata/" + name
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want, have := strings.Split(string(b), "\n"), strings.Split(got, "\n")
	for i := 0; i < max(len(want), len(have)); i++ {
		var w, h string
		if i < len(want) {
			w = want[i]
		}
		if i < len(have) {
			h = have[i]
		}
		if w != h {
			t.Errorf("%s line %d:\n got %q\nwant %q", path, i+1, h, w)
		}
	}
}

func clustersServer(t *testing.T) *httptest.Server {
	t.Helper()
	b, err := bootstrap.Load("testdata/clusters-bootstrap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	d := &mesh.Dispatcher{}
	d.Swap(build(t, b))
	ts := httptest.NewServer((&Server{D: d, Start: time.Now()}).Handler())
	t.Cleanup(ts.Close)
	return ts
}

// clusterLine is the shape of every /clusters text line, as Envoy's
// ClustersHandler writes them: cluster::observability_name::…,
// cluster::{default,high}_priority::max_…::N, cluster::added_via_api::…,
// cluster::eds_service_name::…, and per host cluster::ip:port::attr::value.
var clusterLine = regexp.MustCompile(`^(?P<c>[^:]+)::(?:` +
	`observability_name::.+|` +
	`(?:default|high)_priority::max_(?:connections|pending_requests|requests|retries)::\d+|` +
	`added_via_api::(?:true|false)|` +
	`eds_service_name::.+|` +
	`(?P<host>[0-9.]+:\d+|\[[0-9a-f:]+\]:\d+)::(?P<attr>cx_active|cx_connect_fail|cx_total|rq_active|rq_error|rq_success|rq_timeout|rq_total|` +
	`hostname|health_flags|weight|region|zone|sub_zone|canary|priority|success_rate|local_origin_success_rate)::.*)$`)

// hostAttrs are Envoy's per-host lines, in its order: the stats sorted by
// name, then the host's attributes.
var hostAttrs = []string{"cx_active", "cx_connect_fail", "cx_total", "rq_active", "rq_error", "rq_success", "rq_timeout", "rq_total",
	"hostname", "health_flags", "weight", "region", "zone", "sub_zone", "canary", "priority", "success_rate", "local_origin_success_rate"}

// TestClustersGolden: /clusters on a fixed bootstrap, the whole text
// compared line by line with testdata/clusters.txt, every line of Envoy's
// a::b::… shape, every cluster with all eight breaker lines and every host
// with all its lines in Envoy's order; and ?format=json parsed with
// protojson as istioctl does, locality always set (Envoy always sets it),
// hosts by priority, stats counters then gauges.
func TestClustersGolden(t *testing.T) {
	ts := clustersServer(t)
	code, body := get(t, ts, "/clusters")
	if code != 200 {
		t.Fatalf("/clusters = %d %s", code, body)
	}
	golden(t, "clusters.txt", body)

	if !strings.HasSuffix(body, "\n") {
		t.Error("/clusters does not end with a newline")
	}
	type hostKey struct{ c, h string }
	hostLines := map[hostKey][]string{}
	breakers := map[string]int{}
	for _, l := range strings.Split(strings.TrimSuffix(body, "\n"), "\n") {
		m := clusterLine.FindStringSubmatch(l)
		if m == nil {
			t.Errorf("line not of Envoy's shape: %q", l)
			continue
		}
		c, h, attr := m[1], m[2], m[3]
		switch {
		case h != "":
			hostLines[hostKey{c, h}] = append(hostLines[hostKey{c, h}], attr)
		case strings.Contains(l, "_priority::"):
			breakers[c]++
		}
	}
	for _, c := range []string{"outbound|9080||reviews.default.svc.cluster.local", "BlackHoleCluster", "local"} {
		if breakers[c] != 8 {
			t.Errorf("%s: %d circuit breaker lines, want 8 (4 default_priority, 4 high_priority)", c, breakers[c])
		}
	}
	if len(hostLines) != 4 {
		t.Errorf("%d hosts, want 4: %v", len(hostLines), hostLines)
	}
	for k, attrs := range hostLines {
		if strings.Join(attrs, " ") != strings.Join(hostAttrs, " ") {
			t.Errorf("%s::%s lines %v, want %v", k.c, k.h, attrs, hostAttrs)
		}
	}

	var cs adminv3.Clusters
	if err := protojson.Unmarshal([]byte(bodyOfTS(t, ts, "/clusters?format=json")), &cs); err != nil {
		t.Fatal(err)
	}
	var rev *adminv3.ClusterStatus
	for _, c := range cs.GetClusterStatuses() {
		if len(c.GetCircuitBreakers().GetThresholds()) != 2 {
			t.Errorf("%s: circuit_breakers %v", c.GetName(), c.GetCircuitBreakers())
		}
		for _, h := range c.GetHostStatuses() {
			if h.GetLocality() == nil {
				t.Errorf("%s: host %v has no locality (Envoy always sets it)", c.GetName(), h.GetAddress())
			}
			var names []string
			for _, st := range h.GetStats() {
				names = append(names, st.GetName()+":"+st.GetType().String())
			}
			if got := strings.Join(names, " "); got != "cx_connect_fail:COUNTER cx_total:COUNTER rq_error:COUNTER rq_success:COUNTER rq_timeout:COUNTER rq_total:COUNTER cx_active:GAUGE rq_active:GAUGE" {
				t.Errorf("%s: host stats %s, want Envoy's counters then gauges", c.GetName(), got)
			}
		}
		if c.GetName() == "outbound|9080||reviews.default.svc.cluster.local" {
			rev = c
		}
	}
	if rev == nil {
		t.Fatal("reviews cluster missing from json")
	}
	th := rev.GetCircuitBreakers().GetThresholds()
	if th[0].GetPriority() != corev3.RoutingPriority_DEFAULT || th[0].GetMaxConnections().GetValue() != 4294967295 ||
		th[1].GetPriority() != corev3.RoutingPriority_HIGH || th[1].GetMaxConnections().GetValue() != 100000 || th[1].GetMaxRetries().GetValue() != 3 {
		t.Errorf("thresholds %v", th)
	}
	var hosts []string
	for _, h := range rev.GetHostStatuses() {
		sa := h.GetAddress().GetSocketAddress()
		l := h.GetLocality()
		hosts = append(hosts, strings.Join([]string{sa.GetAddress(), h.GetHostname(), l.GetRegion(), l.GetZone(), l.GetSubZone(),
			h.GetHealthStatus().GetEdsHealthStatus().String(), string(rune('0' + h.GetWeight())), string(rune('0' + h.GetPriority()))}, "/"))
	}
	want := "10.250.1.10/reviews-v1.default/us-east1/us-east1-b//HEALTHY/3/0 fd00::10//us-east1/us-east1-b//UNHEALTHY/1/0 10.250.1.30/reviews-v3.default/us-east1/us-east1-c/rack7/DEGRADED/1/1"
	if got := strings.Join(hosts, " "); got != want {
		t.Errorf("hosts\n got %s\nwant %s", got, want)
	}
}

func bodyOfTS(t *testing.T, ts *httptest.Server, path string) string {
	t.Helper()
	code, body := get(t, ts, path)
	if code != 200 {
		t.Fatalf("%s = %d %s", path, code, body)
	}
	return body
}
