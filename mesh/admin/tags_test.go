package admin

import (
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
)

// tcpListener is a bind_to_port false listener with one tcp_proxy chain
// to cl; statPrefix, when set, is the listener's own stat_prefix.
func tcpListener(t *testing.T, name, ip string, port uint32, statPrefix, cl string) *listenerv3.Listener {
	return &listenerv3.Listener{Name: name, Address: xdstest.SocketAddress(ip, port), BindToPort: wrapperspb.Bool(false), StatPrefix: statPrefix,
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{Name: mesh.TCPProxyFilter,
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: xdstest.MustAny(t, &tcpproxyv3.TcpProxy{
				StatPrefix: cl, ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cl}})}}}}}}
}

// inlineRoute sends everything to cl.
func inlineRoute(name, cl string) *routev3.RouteConfiguration {
	return &routev3.RouteConfiguration{Name: name, VirtualHosts: []*routev3.VirtualHost{{Name: "all", Domains: []string{"*"},
		Routes: []*routev3.Route{{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cl}}}}}}}}
}

// hcmListener is a bind_to_port false listener whose chain is an
// http_connection_manager with stat_prefix hcmPrefix and an inline
// route_config.
func hcmListener(t *testing.T, name, ip string, port uint32, hcmPrefix string, rc *routev3.RouteConfiguration) *listenerv3.Listener {
	hcm := &hcmv3.HttpConnectionManager{StatPrefix: hcmPrefix,
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: rc},
		HttpFilters: []*hcmv3.HttpFilter{{Name: "envoy.filters.http.router",
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: xdstest.MustAny(t, &routerv3.Router{})}}}}
	return &listenerv3.Listener{Name: name, Address: xdstest.SocketAddress(ip, port), BindToPort: wrapperspb.Bool(false),
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{Name: mesh.HCMFilter,
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: xdstest.MustAny(t, hcm)}}}}}}
}

const reviews = "outbound|9080||reviews.default.svc.cluster.local"

// tagsFixture is a proxy with an IPv6 virtual listener, a listener with a
// custom stat_prefix, HCMs with an address-shaped and an Istio-shaped
// stat_prefix, and clusters named as Istio names them.
func tagsFixture(t *testing.T) (*httptest.Server, *mesh.Snapshot) {
	t.Helper()
	ls := []*listenerv3.Listener{
		tcpListener(t, "virtualOutbound", "::", 15001, "", "PassthroughCluster"),
		tcpListener(t, "custom", "10.96.0.50", 80, "inbound_http", "PassthroughCluster"),
		hcmListener(t, "10.96.0.40_8080", "10.96.0.40", 8080, "10.96.0.40_8080", inlineRoute("inline-8080", reviews)),
		hcmListener(t, "0.0.0.0_8081", "0.0.0.0", 8081, "outbound_0.0.0.0_8081", inlineRoute("inline-8081", reviews)),
	}
	cs := []*clusterv3.Cluster{
		{Name: "PassthroughCluster", ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
			LbPolicy: clusterv3.Cluster_CLUSTER_PROVIDED, AltStatName: "PassthroughCluster;"},
		xdstest.StaticCluster(reviews, netip.MustParseAddrPort("10.250.1.10:9080")),
		xdstest.StaticCluster("outbound|443||www.google.com", netip.MustParseAddrPort("142.250.1.1:443")),
	}
	snap, err := mesh.Build("1", ls, cs, nil, mesh.BuildOptions{Roles: mesh.IstioRoles, Cluster: cluster.Options{Dialer: &upstream.Dialer{}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { snap.Retire(nil) })
	d := &mesh.Dispatcher{}
	d.Swap(snap)
	ts := httptest.NewServer((&Server{D: d, Start: time.Now()}).Handler())
	t.Cleanup(ts.Close)
	return ts, snap
}

// TestExtractTags: Istio's stats_tags applied as Envoy applies them: the
// first group is cut from the name, the second is the value; tags without
// a ^token prefix come first.
func TestExtractTags(t *testing.T) {
	for _, tc := range []struct{ in, name, tags string }{
		{"cluster.X.upstream_rq_2xx", "cluster.upstream_rq", "response_code_class=2xx cluster_name=X"},
		{"cluster.X.upstream_rq_200", "cluster.upstream_rq", "response_code=200 cluster_name=X"},
		{"cluster.X.upstream_rq_total", "cluster.upstream_rq_total", "cluster_name=X"},
		{"cluster." + reviews + ".upstream_cx_total", "cluster.upstream_cx_total", "cluster_name=" + reviews},
		// Istio's regex stops a name that is not *.svc.cluster.local at its first dot.
		{"cluster.outbound|443||www.google.com.upstream_cx_total", "cluster.google.com.upstream_cx_total", "cluster_name=outbound|443||www"},
		{"http.10.96.0.40_8080.downstream_rq_2xx", "http.downstream_rq", "response_code_class=2xx http_conn_manager_prefix=10.96.0.40_8080"},
		{"http.outbound_0.0.0.0_8081.downstream_rq_2xx", "http.outbound_0.0.0.0_8081.downstream_rq", "response_code_class=2xx"},
		{"listener.0.0.0.0_15001.downstream_cx_total", "listener.downstream_cx_total", "listener_address=0.0.0.0_15001"},
		{"listener.[__]_15001.downstream_cx_total", "listener.downstream_cx_total", "listener_address=[__]_15001"},
		{"listener.[fd00__1]_80.no_filter_chain_match", "listener.no_filter_chain_match", "listener_address=[fd00__1]_80"},
		{"listener.inbound_http.downstream_cx_total", "listener.inbound_http.downstream_cx_total", ""},
		{"tcp." + reviews + ".downstream_cx_total", "tcp.downstream_cx_total", "tcp_prefix=" + reviews},
		{"listener_manager.workers_started", "listener_manager.workers_started", ""},
		{"server.live", "server.live", ""},
	} {
		name, tags := extractTags(tc.in)
		var ts []string
		for _, tg := range tags {
			ts = append(ts, tg.name+"="+tg.value)
		}
		if name != tc.name || strings.Join(ts, " ") != tc.tags {
			t.Errorf("%s → %s {%s}, want %s {%s}", tc.in, name, strings.Join(ts, " "), tc.name, tc.tags)
		}
	}
}

// TestPrometheusIstioTags: /stats/prometheus carries Istio's response
// code, cluster, HCM and listener tags, parses with Prometheus's own
// parser, and an IPv6 listener is listener.[__]_15001 in /stats and
// listener_address="[__]_15001" in Prometheus; a custom listener
// stat_prefix that Istio's listener_address regex does not match keeps its
// name and gets no tag.
func TestPrometheusIstioTags(t *testing.T) {
	ts, snap := tagsFixture(t)
	hs := snap.Clusters[reviews].HTTPStats()
	for range 3 {
		hs.CountResponse(200)
	}
	hs.CountResponse(503)
	snap.HTTPStats()["10.96.0.40_8080"].DownstreamRq2xx.Add(2)
	snap.HTTPStats()["outbound_0.0.0.0_8081"].DownstreamRq2xx.Add(4)
	snap.Listener("virtualOutbound").Stats.DownstreamCxTotal.Add(7)
	snap.Listener("custom").Stats.DownstreamCxTotal.Add(5)

	if _, body := get(t, ts, "/stats?filter=downstream_cx_total$"); !strings.Contains(body, "listener.[__]_15001.downstream_cx_total: 7\n") ||
		!strings.Contains(body, "listener.inbound_http.downstream_cx_total: 5\n") {
		t.Errorf("/stats listener names:\n%s", body)
	}

	_, body := get(t, ts, "/stats/prometheus")
	// A second scrape reuses the first's names: the same output, but for
	// the gauges of the Go runtime's memory and the uptime.
	steady := func(b string) string {
		var keep []string
		for _, l := range strings.Split(b, "\n") {
			if !strings.Contains(l, "server_memory") && !strings.Contains(l, "uptime") {
				keep = append(keep, l)
			}
		}
		return strings.Join(keep, "\n")
	}
	if _, again := get(t, ts, "/stats/prometheus"); steady(again) != steady(body) {
		t.Errorf("second scrape differs from the first:\n%s\n---\n%s", body, again)
	}
	for _, line := range []string{
		`envoy_cluster_upstream_rq{response_code_class="2xx",cluster_name="` + reviews + `"} 3`,
		`envoy_cluster_upstream_rq{response_code="200",cluster_name="` + reviews + `"} 3`,
		`envoy_cluster_upstream_rq{response_code="503",cluster_name="` + reviews + `"} 1`,
		`envoy_cluster_upstream_rq{response_code_class="5xx",cluster_name="` + reviews + `"} 1`,
		`envoy_cluster_upstream_rq_total{cluster_name="` + reviews + `"} 0`,
		`envoy_cluster_google_com_upstream_cx_total{cluster_name="outbound|443||www"} 0`,
		`envoy_cluster_upstream_cx_total{cluster_name="PassthroughCluster"} 0`,
		`envoy_http_downstream_rq{response_code_class="2xx",http_conn_manager_prefix="10.96.0.40_8080"} 2`,
		`envoy_http_outbound_0_0_0_0_8081_downstream_rq{response_code_class="2xx"} 4`,
		`envoy_listener_downstream_cx_total{listener_address="[__]_15001"} 7`,
		`envoy_listener_downstream_cx_total{listener_address="10.96.0.40_8080"} 0`,
		`envoy_listener_inbound_http_downstream_cx_total{} 5`,
		`envoy_tcp_downstream_cx_total{tcp_prefix="PassthroughCluster"} 0`,
		`envoy_server_live{} 1`,
	} {
		if !strings.Contains(body, "\n"+line+"\n") {
			t.Errorf("/stats/prometheus lacks %s", line)
		}
	}

	parser := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("not valid Prometheus text: %v\n%s", err, body)
	}
	labels := func(fam string) map[string]float64 {
		out := map[string]float64{}
		for _, m := range fams[fam].GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
			out[strings.Join(ls, ",")] = m.GetCounter().GetValue()
		}
		return out
	}
	rq := labels("envoy_cluster_upstream_rq")
	if rq["cluster_name="+reviews+",response_code_class=2xx"]+rq["response_code_class=2xx,cluster_name="+reviews] != 3 ||
		rq["cluster_name="+reviews+",response_code=200"]+rq["response_code=200,cluster_name="+reviews] != 3 {
		t.Errorf("envoy_cluster_upstream_rq: %v", rq)
	}
	if fams["envoy_cluster_upstream_rq_xx"] != nil || fams["envoy_cluster_upstream_rq_2xx"] != nil || fams["envoy_cluster_upstream_rq_200"] != nil {
		t.Error("a response code left in a metric name")
	}
	if fams["envoy_cluster_upstream_rq"].GetType().String() != "COUNTER" {
		t.Errorf("envoy_cluster_upstream_rq type %v", fams["envoy_cluster_upstream_rq"].GetType())
	}
	lx := labels("envoy_listener_downstream_cx_total")
	if lx["listener_address=[__]_15001"] != 7 || len(lx) != 3 {
		t.Errorf("envoy_listener_downstream_cx_total: %v, want [__]_15001=7 and the two HCM listeners", lx)
	}
	for _, m := range fams["envoy_listener_inbound_http_downstream_cx_total"].GetMetric() {
		if len(m.GetLabel()) != 0 || m.GetCounter().GetValue() != 5 {
			t.Errorf("custom stat_prefix listener: labels %v value %v, want none and 5", m.GetLabel(), m.GetCounter().GetValue())
		}
	}
	if h := labels("envoy_http_downstream_rq"); h["response_code_class=2xx,http_conn_manager_prefix=10.96.0.40_8080"] != 2 {
		t.Errorf("envoy_http_downstream_rq: %v", h)
	}
}
