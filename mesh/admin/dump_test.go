package admin

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	xdstype "github.com/cncf/xds/go/xds/type/v3"
	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	istiostats "istio.io/api/envoy/extensions/stats"

	"github.com/meshtun/meshtun/internal/logging"
	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/bootstrap"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/xdsclient"
)

const unknownURL = "type.googleapis.com/acme.telemetry.v1.Config"

// xdsFixture is a proxy configured as over ADS: the sample bootstrap's
// static resources plus one dynamic EDS cluster and one dynamic listener
// carrying Istio's telemetry filters (one of a type meshtun does not link).
type xdsFixture struct {
	ts      *httptest.Server
	a       *mesh.XDSApplier
	d       *mesh.Dispatcher
	srv     *Server
	drained []string
	quit    int
}

func dynListener(t *testing.T, port uint32, cluster string) *listenerv3.Listener {
	return &listenerv3.Listener{
		Name:       "10.96.0.30_7000", // fixed: a push that changes the port changes the listener
		Address:    xdstest.SocketAddress("10.96.0.30", port),
		BindToPort: wrapperspb.Bool(false),
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{
			{Name: "istio.metadata_exchange", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: &anypb.Any{TypeUrl: unknownURL, Value: []byte{0x0a, 0x03, 'a', 'b', 'c'}}}},
			{Name: "istio.stats", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: xdstest.MustAny(t, &istiostats.PluginConfig{DisableHostHeaderFallback: true})}},
			{Name: mesh.TCPProxyFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: xdstest.MustAny(t, &tcpproxyv3.TcpProxy{
				StatPrefix: cluster, ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster}})}},
		}}},
	}
}

func newXDSFixture(t *testing.T) *xdsFixture {
	t.Helper()
	b, err := bootstrap.Load("../../examples/sidecar-bootstrap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	loaded := time.Now()
	f := &xdsFixture{d: &mesh.Dispatcher{}}
	sr := b.GetStaticResources()
	f.a = &mesh.XDSApplier{
		Server:          &mesh.Server{D: f.d, Log: zerolog.Nop()},
		StaticListeners: sr.GetListeners(), StaticClusters: sr.GetClusters(),
		StaticDump:    mesh.StaticDump(sr.GetListeners(), sr.GetClusters(), loaded),
		Options:       mesh.BuildOptions{Roles: mesh.IstioRoles, Cluster: cluster.Options{Dialer: &upstream.Dialer{}}},
		DrainDuration: time.Minute,
	}
	t.Cleanup(func() {
		f.a.Server.Close()
		if s := f.d.Snapshot(); s != nil {
			s.Retire(nil)
		}
	})
	f.srv = &Server{D: f.d, Start: time.Now(), Concurrency: 2,
		Bootstrap: func() (*bootstrapv3.Bootstrap, time.Time) { return b, loaded },
		Drain: func(in, graceful bool) {
			f.drained = append(f.drained, map[bool]string{true: "in", false: "all"}[in]+map[bool]string{true: "+graceful", false: ""}[graceful])
		},
		Quit: func() { f.quit++ },
	}
	f.ts = httptest.NewServer(f.srv.Handler())
	t.Cleanup(f.ts.Close)
	return f
}

func (f *xdsFixture) push(t *testing.T, version string, port uint32) {
	t.Helper()
	const cname = "outbound|7000||ratings.default.svc.cluster.local"
	res := &xdsclient.Resources{
		Clusters:  map[string]*clusterv3.Cluster{cname: xdstest.EDSCluster(cname, xdstest.WithConnectTimeout(time.Second))},
		Endpoints: map[string]*endpointv3.ClusterLoadAssignment{cname: xdstest.Assignment(cname, netip.MustParseAddrPort("10.250.2.10:7000"))},
		Listeners: map[string]*listenerv3.Listener{},
		Versions:  map[string]string{xdsclient.ClusterType: version, xdsclient.ListenerType: version, xdsclient.EndpointType: version},
	}
	l := dynListener(t, port, cname)
	res.Listeners[l.Name] = l
	if err := f.a.Apply(context.Background(), res); err != nil {
		t.Fatal(err)
	}
}

// unmarshalDump parses a config dump as istioctl does: protojson into
// go-control-plane's admin types, every Any resolved.
func unmarshalDump(t *testing.T, body string) *adminv3.ConfigDump {
	t.Helper()
	cd := &adminv3.ConfigDump{}
	if err := protojson.Unmarshal([]byte(body), cd); err != nil {
		t.Fatalf("config dump does not parse with protojson: %v\n%s", err, body)
	}
	return cd
}

func TestConfigDump(t *testing.T) {
	f := newXDSFixture(t)
	f.push(t, "v1", 7000)
	code, body := get(t, f.ts, "/config_dump")
	if code != 200 {
		t.Fatalf("/config_dump = %d %s", code, body)
	}
	cd := unmarshalDump(t, body)
	var types []string
	for _, c := range cd.GetConfigs() {
		types = append(types, strings.TrimPrefix(c.GetTypeUrl(), "type.googleapis.com/envoy.admin.v3."))
	}
	if got := strings.Join(types, ","); got != "BootstrapConfigDump,ClustersConfigDump,ListenersConfigDump,ScopedRoutesConfigDump,RoutesConfigDump,SecretsConfigDump" {
		t.Fatalf("sections = %s", got)
	}
	// Re-marshal and compare: a lossless round trip.
	again, err := dumpJSON.Marshal(cd)
	if err != nil || strings.TrimSpace(string(again)) != strings.TrimSpace(body) {
		t.Fatalf("round trip differs (err %v)", err)
	}

	var bd adminv3.BootstrapConfigDump
	cd.Configs[0].UnmarshalTo(&bd)
	if bd.GetBootstrap().GetNode().GetId() == "" && bd.GetBootstrap().GetStaticResources() == nil {
		t.Errorf("bootstrap dump empty: %v", &bd)
	}
	var cld adminv3.ClustersConfigDump
	cd.Configs[1].UnmarshalTo(&cld)
	if cld.GetVersionInfo() != "v1" || len(cld.GetStaticClusters()) == 0 || len(cld.GetDynamicActiveClusters()) != 1 {
		t.Fatalf("clusters dump: %v", &cld)
	}
	dc := cld.GetDynamicActiveClusters()[0]
	if dc.GetVersionInfo() != "v1" || dc.GetLastUpdated() == nil {
		t.Errorf("dynamic cluster: version %q last_updated %v", dc.GetVersionInfo(), dc.GetLastUpdated())
	}
	var ld adminv3.ListenersConfigDump
	cd.Configs[2].UnmarshalTo(&ld)
	if len(ld.GetStaticListeners()) != 3 || len(ld.GetDynamicListeners()) != 1 {
		t.Fatalf("listeners dump: %d static, %d dynamic", len(ld.GetStaticListeners()), len(ld.GetDynamicListeners()))
	}
	dl := ld.GetDynamicListeners()[0]
	var lis listenerv3.Listener
	if err := dl.GetActiveState().GetListener().UnmarshalTo(&lis); err != nil {
		t.Fatal(err)
	}
	filters := lis.GetFilterChains()[0].GetFilters()
	// Istio's stats filter, a type meshtun skips, is dumped decoded.
	var ps istiostats.PluginConfig
	if err := filters[1].GetTypedConfig().UnmarshalTo(&ps); err != nil || !ps.GetDisableHostHeaderFallback() {
		t.Errorf("istio.stats config not dumped as received: %v %v", err, &ps)
	}
	// A type not linked at all is kept byte for byte inside a TypedStruct.
	var tsx xdstype.TypedStruct
	if err := filters[0].GetTypedConfig().UnmarshalTo(&tsx); err != nil || tsx.GetTypeUrl() != unknownURL ||
		tsx.GetValue().GetFields()[undecodedField].GetStringValue() != "CgNhYmM=" {
		t.Errorf("unknown type not dumped as received: %v %v", err, &tsx)
	}

	// An unchanged resource keeps its version; a changed one moves, and
	// the replaced listener is shown draining.
	time.Sleep(10 * time.Millisecond)
	f.push(t, "v2", 7001)
	cd = unmarshalDump(t, bodyOf(t, f, "/config_dump?resource=dynamic_active_clusters"))
	if len(cd.GetConfigs()) != 1 {
		t.Fatalf("resource=dynamic_active_clusters: %d configs", len(cd.GetConfigs()))
	}
	var dc2 adminv3.ClustersConfigDump_DynamicCluster
	cd.Configs[0].UnmarshalTo(&dc2)
	if dc2.GetVersionInfo() != "v1" || !dc2.GetLastUpdated().AsTime().Equal(dc.GetLastUpdated().AsTime()) {
		t.Errorf("unchanged cluster: version %q (want v1), last_updated moved", dc2.GetVersionInfo())
	}
	cd = unmarshalDump(t, bodyOf(t, f, "/config_dump?resource=dynamic_listeners"))
	var dl2 adminv3.ListenersConfigDump_DynamicListener
	cd.Configs[0].UnmarshalTo(&dl2)
	if dl2.GetActiveState().GetVersionInfo() != "v2" || dl2.GetDrainingState().GetVersionInfo() != "v1" {
		t.Errorf("changed listener: active %q draining %q, want v2 and v1", dl2.GetActiveState().GetVersionInfo(), dl2.GetDrainingState().GetVersionInfo())
	}

	// include_eds adds the endpoints; name_regex narrows every section.
	cd = unmarshalDump(t, bodyOf(t, f, "/config_dump?include_eds&name_regex="+url.QueryEscape("ratings")))
	var ed adminv3.EndpointsConfigDump
	if err := cd.Configs[2].UnmarshalTo(&ed); err != nil || len(ed.GetDynamicEndpointConfigs()) != 1 || len(ed.GetStaticEndpointConfigs()) != 0 {
		t.Errorf("include_eds with name_regex: %v %v", err, &ed)
	}
	cd.Configs[1].UnmarshalTo(&cld)
	if len(cld.GetStaticClusters()) != 0 || len(cld.GetDynamicActiveClusters()) != 1 {
		t.Errorf("name_regex did not filter clusters: %v", &cld)
	}

	for path, want := range map[string]string{
		"/config_dump?resource=dynamic_bogus": "dynamic_active_clusters",
		"/config_dump?name_regex=(":           "name_regex",
		"/config_dump?mask=foo":               "mask",
	} {
		code, body := get(t, f.ts, path)
		if code != http.StatusBadRequest || !strings.Contains(body, want) {
			t.Errorf("%s = %d %q, want 400 naming %s", path, code, body, want)
		}
	}
}

func bodyOf(t *testing.T, f *xdsFixture, path string) string {
	t.Helper()
	code, body := get(t, f.ts, path)
	if code != 200 {
		t.Fatalf("%s = %d %s", path, code, body)
	}
	return body
}

func TestJSONFormats(t *testing.T) {
	f := newXDSFixture(t)
	f.push(t, "v1", 7000)
	var ls adminv3.Listeners
	if err := protojson.Unmarshal([]byte(bodyOf(t, f, "/listeners?format=json")), &ls); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range ls.GetListenerStatuses() {
		names = append(names, s.GetName()+"@"+s.GetLocalAddress().GetSocketAddress().GetAddress())
	}
	if got := strings.Join(names, " "); got != "virtualOutbound@0.0.0.0 virtualInbound@0.0.0.0 10.96.0.20_9080@10.96.0.20 10.96.0.30_7000@10.96.0.30" {
		t.Errorf("listeners json: %s", got)
	}
	var cs adminv3.Clusters
	if err := protojson.Unmarshal([]byte(bodyOf(t, f, "/clusters?format=json")), &cs); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, c := range cs.GetClusterStatuses() {
		if c.GetName() != "outbound|7000||ratings.default.svc.cluster.local" {
			continue
		}
		found = true
		if !c.GetAddedViaApi() || len(c.GetHostStatuses()) != 1 || c.GetCircuitBreakers().GetThresholds()[0].GetMaxConnections().GetValue() != 1024 {
			t.Errorf("cluster status: %v", c)
		}
		h := c.GetHostStatuses()[0]
		if h.GetAddress().GetSocketAddress().GetPortValue() != 7000 || len(h.GetStats()) == 0 || h.GetHealthStatus() == nil {
			t.Errorf("host status: %v", h)
		}
	}
	if !found {
		t.Error("dynamic cluster missing from /clusters?format=json")
	}
	var js struct {
		Stats []struct {
			Name  string `json:"name"`
			Value uint64 `json:"value"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(bodyOf(t, f, "/stats?format=json&filter=^server\\.")), &js); err != nil || len(js.Stats) < 3 {
		t.Fatalf("stats json: %v %v", err, js)
	}
	for _, st := range js.Stats {
		if !strings.HasPrefix(st.Name, "server.") {
			t.Errorf("filter not applied: %s", st.Name)
		}
	}
	for _, p := range []string{"/stats?format=xml", "/listeners?format=yaml", "/clusters?format=prometheus"} {
		if code, body := get(t, f.ts, p); code != 400 || !strings.Contains(body, "format=") {
			t.Errorf("%s = %d %q, want 400", p, code, body)
		}
	}
	var mem adminv3.Memory
	if err := protojson.Unmarshal([]byte(bodyOf(t, f, "/memory")), &mem); err != nil || mem.GetAllocated() == 0 || mem.GetHeapSize() < mem.GetAllocated() {
		t.Errorf("/memory: %v %v", err, &mem)
	}
	var si adminv3.ServerInfo
	if err := protojson.Unmarshal([]byte(bodyOf(t, f, "/server_info")), &si); err != nil || si.GetState() != adminv3.ServerInfo_LIVE || si.GetCommandLineOptions().GetConcurrency() != 2 {
		t.Errorf("/server_info: %v %v", err, &si)
	}
}

func TestPrometheus(t *testing.T) {
	f := newXDSFixture(t)
	f.push(t, "v1", 7000)
	for _, path := range []string{"/stats/prometheus", "/stats?format=prometheus"} {
		body := bodyOf(t, f, path)
		p := expfmt.NewTextParser(model.LegacyValidation)
		fams, err := p.TextToMetricFamilies(strings.NewReader(body))
		if err != nil {
			t.Fatalf("%s: not valid Prometheus text: %v\n%s", path, err, body)
		}
		cx := fams["envoy_cluster_upstream_cx_total"]
		if cx == nil || cx.GetType().String() != "COUNTER" {
			t.Fatalf("envoy_cluster_upstream_cx_total missing or not a counter")
		}
		clusters := map[string]bool{}
		for _, m := range cx.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "cluster_name" {
					clusters[l.GetValue()] = true
				}
			}
		}
		if !clusters["outbound|7000||ratings.default.svc.cluster.local"] || !clusters["PassthroughCluster"] {
			t.Errorf("cluster_name tags: %v", clusters)
		}
		lx := fams["envoy_listener_downstream_cx_total"]
		if lx == nil || len(lx.GetMetric()) != 4 || lx.GetMetric()[0].GetLabel()[0].GetName() != "listener_address" {
			t.Errorf("envoy_listener_downstream_cx_total: %v", lx)
		}
		if g := fams["envoy_server_live"]; g == nil || g.GetType().String() != "GAUGE" || g.GetMetric()[0].GetGauge().GetValue() != 1 {
			t.Errorf("envoy_server_live: %v", g)
		}
		if tp := fams["envoy_tcp_downstream_cx_total"]; tp == nil || tp.GetMetric()[0].GetLabel()[0].GetName() != "tcp_prefix" {
			t.Errorf("envoy_tcp_downstream_cx_total: %v", tp)
		}
	}
}

func TestMutatingEndpointsNeedPOST(t *testing.T) {
	f := newXDSFixture(t)
	for _, p := range []string{"/quitquitquit", "/healthcheck/fail", "/healthcheck/ok", "/drain_listeners", "/reset_counters", "/logging"} {
		code, _ := get(t, f.ts, p)
		if code != http.StatusMethodNotAllowed {
			t.Errorf("GET %s = %d, want 405", p, code)
		}
	}
	if f.quit != 0 || len(f.drained) != 0 {
		t.Fatal("a GET changed state")
	}
}

func post(t *testing.T, f *xdsFixture, path string) (int, string) {
	t.Helper()
	resp, err := http.Post(f.ts.URL+path, "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b := new(strings.Builder)
	_, _ = ioCopy(b, resp)
	return resp.StatusCode, b.String()
}

func TestHealthcheckDrainQuit(t *testing.T) {
	f := newXDSFixture(t)
	f.push(t, "v1", 7000)
	if code, body := get(t, f.ts, "/ready"); code != 200 || body != "LIVE\n" {
		t.Fatalf("/ready = %d %q", code, body)
	}
	post(t, f, "/healthcheck/fail")
	if code, body := get(t, f.ts, "/ready"); code != 503 || body != "DRAINING\n" {
		t.Errorf("after fail: /ready = %d %q", code, body)
	}
	if !strings.Contains(bodyOf(t, f, "/stats?filter=^server\\.(live|state)$"), "server.live: 0\nserver.state: 1\n") {
		t.Error("server.live/state not DRAINING after /healthcheck/fail")
	}
	post(t, f, "/healthcheck/ok")
	if code, _ := get(t, f.ts, "/ready"); code != 200 {
		t.Errorf("after ok: /ready = %d", code)
	}
	post(t, f, "/drain_listeners?inboundonly&graceful")
	post(t, f, "/drain_listeners")
	if code, body := post(t, f, "/drain_listeners?force"); code != 400 || !strings.Contains(body, "force") {
		t.Errorf("unknown drain parameter: %d %q", code, body)
	}
	if strings.Join(f.drained, ",") != "in+graceful,all" {
		t.Errorf("drains = %v", f.drained)
	}
	if code, body := post(t, f, "/quitquitquit"); code != 200 || body != "OK\n" || f.quit != 1 {
		t.Errorf("quitquitquit = %d %q, quit calls %d", code, body, f.quit)
	}
}

func TestResetCounters(t *testing.T) {
	f := newXDSFixture(t)
	f.push(t, "v1", 7000)
	// Counters moved by real flows are checked live in the integration
	// tests; here the listener's counter and gauge are moved directly.
	l := f.d.Snapshot().Listeners[0]
	l.Stats.DownstreamCxTotal.Add(5)
	l.Stats.DownstreamCxActive.Add(2)
	before := bodyOf(t, f, "/stats?filter=^listener\\.0\\.0\\.0\\.0_15001\\.downstream_cx_(total|active)$")
	if before != "listener.0.0.0.0_15001.downstream_cx_active: 2\nlistener.0.0.0.0_15001.downstream_cx_total: 5\n" {
		t.Fatalf("before reset: %q", before)
	}
	post(t, f, "/reset_counters")
	l.Stats.DownstreamCxTotal.Add(1)
	after := bodyOf(t, f, "/stats?filter=^listener\\.0\\.0\\.0\\.0_15001\\.downstream_cx_(total|active)$")
	if after != "listener.0.0.0.0_15001.downstream_cx_active: 2\nlistener.0.0.0.0_15001.downstream_cx_total: 1\n" {
		t.Fatalf("after reset: counters restart from 0, gauges keep: %q", after)
	}
	l.Stats.DownstreamCxActive.Add(-2)
}

func TestLoggingLevels(t *testing.T) {
	f := newXDSFixture(t)
	l, err := logging.New(logging.Options{Level: "info", Format: logging.FormatJSON, Out: new(strings.Builder)})
	if err != nil {
		t.Fatal(err)
	}
	logging.Component(l, "upstream")
	logging.Component(l, "xds")
	if code, body := post(t, f, "/logging"); code != 200 || !strings.Contains(body, "active loggers:\n") || !strings.Contains(body, "  upstream: info\n") {
		t.Fatalf("/logging = %d %q", code, body)
	}
	if code, body := post(t, f, "/logging?upstream=debug"); code != 200 || !strings.Contains(body, "  upstream: debug\n") || !strings.Contains(body, "  xds: info\n") {
		t.Errorf("/logging?upstream=debug = %d %q", code, body)
	}
	if code, body := post(t, f, "/logging?paths=xds:warning,upstream:error"); code != 200 || !strings.Contains(body, "  xds: warning\n") || !strings.Contains(body, "  upstream: error\n") {
		t.Errorf("/logging?paths = %d %q", code, body)
	}
	if code, body := post(t, f, "/logging?level=trace"); code != 200 || !strings.Contains(body, "  xds: trace\n") {
		t.Errorf("/logging?level=trace = %d %q", code, body)
	}
	for p, want := range map[string]string{"/logging?level=loud": "loud", "/logging?nosuch=debug": "nosuch", "/logging?paths=xds": "logger:level"} {
		if code, body := post(t, f, p); code != 400 || !strings.Contains(body, want) {
			t.Errorf("%s = %d %q, want 400 naming %s", p, code, body, want)
		}
	}
	if logging.Loggers()["xds"] != zerolog.TraceLevel {
		t.Error("a rejected request changed a level")
	}
	logging.SetLevel("", zerolog.InfoLevel)
}

func ioCopy(w *strings.Builder, resp *http.Response) (int64, error) {
	buf := make([]byte, 4096)
	var n int64
	for {
		k, err := resp.Body.Read(buf)
		w.Write(buf[:k])
		n += int64(k)
		if err != nil {
			return n, nil
		}
	}
}

// applyWith pushes the fixture's resources at version, the ratings
// cluster with connect_timeout ct, plus extra listeners.
func (f *xdsFixture) applyWith(t *testing.T, version string, ct time.Duration, extra ...*listenerv3.Listener) {
	t.Helper()
	const cname = "outbound|7000||ratings.default.svc.cluster.local"
	res := &xdsclient.Resources{
		Clusters:  map[string]*clusterv3.Cluster{cname: xdstest.EDSCluster(cname, xdstest.WithConnectTimeout(ct))},
		Endpoints: map[string]*endpointv3.ClusterLoadAssignment{cname: {ClusterName: cname}},
		Listeners: map[string]*listenerv3.Listener{},
		Versions:  map[string]string{xdsclient.ClusterType: version, xdsclient.ListenerType: version, xdsclient.EndpointType: version},
	}
	for _, l := range append([]*listenerv3.Listener{dynListener(t, 7000, cname)}, extra...) {
		res.Listeners[l.Name] = l
	}
	if err := f.a.Apply(context.Background(), res); err != nil {
		t.Fatal(err)
	}
}

// TestConfigDumpScopedAndStaticRoutes: the dump has Envoy's sections in
// Envoy's order (ScopedRoutesConfigDump, empty, between Listeners and
// Routes; Endpoints only with include_eds), an HCM's inline route_config
// is in RoutesConfigDump.static_route_configs as sent, stamped with its
// listener's time; resource= takes the new fields; the dump round-trips
// through protojson.
func TestConfigDumpScopedAndStaticRoutes(t *testing.T) {
	f := newXDSFixture(t)
	rc := inlineRoute("inline-8080", "outbound|7000||ratings.default.svc.cluster.local")
	f.applyWith(t, "v1", time.Second, hcmListener(t, "10.96.0.40_8080", "10.96.0.40", 8080, "10.96.0.40_8080", rc))

	sections := func(cd *adminv3.ConfigDump) string {
		var types []string
		for _, c := range cd.GetConfigs() {
			types = append(types, strings.TrimPrefix(c.GetTypeUrl(), "type.googleapis.com/envoy.admin.v3."))
		}
		return strings.Join(types, ",")
	}
	body := bodyOf(t, f, "/config_dump")
	cd := unmarshalDump(t, body)
	if got := sections(cd); got != "BootstrapConfigDump,ClustersConfigDump,ListenersConfigDump,ScopedRoutesConfigDump,RoutesConfigDump,SecretsConfigDump" {
		t.Fatalf("sections = %s", got)
	}
	if again, err := dumpJSON.Marshal(cd); err != nil || strings.TrimSpace(string(again)) != strings.TrimSpace(body) {
		t.Fatalf("round trip differs (err %v)", err)
	}
	var sd adminv3.ScopedRoutesConfigDump
	if err := cd.Configs[3].UnmarshalTo(&sd); err != nil || len(sd.GetInlineScopedRouteConfigs())+len(sd.GetDynamicScopedRouteConfigs()) != 0 {
		t.Errorf("scoped routes: %v %v", err, &sd)
	}
	var ld adminv3.ListenersConfigDump
	cd.Configs[2].UnmarshalTo(&ld)
	var listenerUpdated time.Time
	for _, dl := range ld.GetDynamicListeners() {
		if dl.GetName() == "10.96.0.40_8080" {
			listenerUpdated = dl.GetActiveState().GetLastUpdated().AsTime()
		}
	}
	var rd adminv3.RoutesConfigDump
	if err := cd.Configs[4].UnmarshalTo(&rd); err != nil || len(rd.GetStaticRouteConfigs()) != 1 {
		t.Fatalf("routes dump: %v %v", err, &rd)
	}
	src := rd.GetStaticRouteConfigs()[0]
	var got routev3.RouteConfiguration
	if err := src.GetRouteConfig().UnmarshalTo(&got); err != nil || !proto.Equal(&got, rc) {
		t.Errorf("static route config %v (err %v), want %v", &got, err, rc)
	}
	if listenerUpdated.IsZero() || !src.GetLastUpdated().AsTime().Equal(listenerUpdated) {
		t.Errorf("static route config last_updated %v, want its listener's %v", src.GetLastUpdated().AsTime(), listenerUpdated)
	}

	cd = unmarshalDump(t, bodyOf(t, f, "/config_dump?include_eds"))
	if got := sections(cd); got != "BootstrapConfigDump,ClustersConfigDump,EndpointsConfigDump,ListenersConfigDump,ScopedRoutesConfigDump,RoutesConfigDump,SecretsConfigDump" {
		t.Errorf("sections with include_eds = %s", got)
	}

	cd = unmarshalDump(t, bodyOf(t, f, "/config_dump?resource=static_route_configs"))
	var one adminv3.RoutesConfigDump_StaticRouteConfig
	if len(cd.GetConfigs()) != 1 || cd.Configs[0].UnmarshalTo(&one) != nil || one.GetRouteConfig() == nil {
		t.Errorf("resource=static_route_configs: %v", cd)
	}
	for _, res := range []string{"inline_scoped_route_configs", "dynamic_scoped_route_configs"} {
		if cd := unmarshalDump(t, bodyOf(t, f, "/config_dump?resource="+res)); len(cd.GetConfigs()) != 0 {
			t.Errorf("resource=%s: %v", res, cd)
		}
	}
	if code, body := get(t, f.ts, "/config_dump?resource=nope"); code != 400 || !strings.Contains(body, "static_route_configs") || !strings.Contains(body, "inline_scoped_route_configs") {
		t.Errorf("resource=nope: %d %q, want 400 listing the new fields", code, body)
	}
	if cd := unmarshalDump(t, bodyOf(t, f, "/config_dump?resource=static_route_configs&name_regex=^other")); len(cd.GetConfigs()) != 0 {
		t.Errorf("name_regex did not filter static route configs: %v", cd)
	}
}

// TestResetCountersFollowCounters: the /reset_counters baseline belongs to
// the counter it was read from: the HTTP request counters of a cluster
// re-created by an update carry on (kept by name, as in Envoy), and so
// does their baseline, so the re-created cluster shows only the requests
// since the reset.
func TestResetCountersFollowCounters(t *testing.T) {
	f := newXDSFixture(t)
	const cname = "outbound|7000||ratings.default.svc.cluster.local"
	f.applyWith(t, "v1", time.Second)
	old := f.d.Snapshot().Clusters[cname]
	for range 5 {
		old.HTTPStats().CountResponse(200)
	}
	const q = "/stats?filter=^cluster\\.outbound\\|7000.*\\.upstream_rq_(completed|200)$"
	if got := bodyOf(t, f, q); got != "cluster."+cname+".upstream_rq_200: 5\ncluster."+cname+".upstream_rq_completed: 5\n" {
		t.Fatalf("before reset: %q", got)
	}
	post(t, f, "/reset_counters")
	if got := bodyOf(t, f, q); got != "cluster."+cname+".upstream_rq_200: 0\ncluster."+cname+".upstream_rq_completed: 0\n" {
		t.Fatalf("after reset: %q", got)
	}
	// A changed cluster is a new cluster; its HTTP counters go on.
	f.applyWith(t, "v2", 2*time.Second)
	c := f.d.Snapshot().Clusters[cname]
	if c == old {
		t.Fatal("the changed cluster was not re-created")
	}
	for range 7 {
		c.HTTPStats().CountResponse(200)
	}
	if got := bodyOf(t, f, q); got != "cluster."+cname+".upstream_rq_200: 7\ncluster."+cname+".upstream_rq_completed: 7\n" {
		t.Errorf("re-created cluster after a reset: %q, want the 7 requests since the reset", got)
	}
	if v := c.HTTPStats().RqCompleted.Load(); v != 12 {
		t.Errorf("raw upstream_rq_completed %d after the update, want 12 (5 before it, 7 after)", v)
	}
}

// TestResetCountersAtomic: a /stats served while /reset_counters runs
// sees the old or the new baseline, never the raw counters.
func TestResetCountersAtomic(t *testing.T) {
	f := newXDSFixture(t)
	f.push(t, "v1", 7000)
	f.d.Snapshot().Listeners[0].Stats.DownstreamCxTotal.Add(1000)
	h := f.srv.Handler()
	do := func(method, path string) string {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(method, path, nil))
		return w.Body.String()
	}
	do(http.MethodPost, "/reset_counters")
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 200 {
			do(http.MethodPost, "/reset_counters")
		}
	}()
	const want = "listener.0.0.0.0_15001.downstream_cx_total: 0\n"
	for i := 0; ; i++ {
		select {
		case <-done:
			return
		default:
		}
		if got := do(http.MethodGet, "/stats?filter=^listener\\.0\\.0\\.0\\.0_15001\\.downstream_cx_total$"); got != want {
			t.Fatalf("read %d during resets: %q, want %q", i, got, want)
		}
	}
}

// TestConfigDumpWarming: what the xDS client holds back while it warms is
// dumped as Envoy does: a listener's warming_state next to its active
// state, and dynamic_warming_clusters; name_regex applies to both.
func TestConfigDumpWarming(t *testing.T) {
	f := newXDSFixture(t)
	f.push(t, "v1", 7000)
	since := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	next := dynListener(t, 7001, "outbound|7001||warm.default.svc.cluster.local")
	warmCluster := &clusterv3.Cluster{Name: "outbound|7001||warm.default.svc.cluster.local",
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}}
	f.srv.Warming = func() *xdsclient.Warming {
		return &xdsclient.Warming{
			Listeners: map[string]xdsclient.WarmingResource{next.GetName(): {Msg: next, Version: "v2", Since: since}},
			Clusters:  map[string]xdsclient.WarmingResource{warmCluster.GetName(): {Msg: warmCluster, Version: "v2", Since: since}},
		}
	}
	cd := unmarshalDump(t, bodyOf(t, f, "/config_dump"))
	var cld adminv3.ClustersConfigDump
	var ld adminv3.ListenersConfigDump
	for _, c := range cd.GetConfigs() {
		switch {
		case c.MessageIs(&cld):
			c.UnmarshalTo(&cld)
		case c.MessageIs(&ld):
			c.UnmarshalTo(&ld)
		}
	}
	if w := cld.GetDynamicWarmingClusters(); len(w) != 1 || w[0].GetVersionInfo() != "v2" || !w[0].GetLastUpdated().AsTime().Equal(since) {
		t.Fatalf("dynamic_warming_clusters = %v", w)
	}
	var got *adminv3.ListenersConfigDump_DynamicListener
	for _, dl := range ld.GetDynamicListeners() {
		if dl.GetName() == next.GetName() {
			got = dl
		}
	}
	if got == nil || got.GetActiveState().GetVersionInfo() != "v1" || got.GetWarmingState().GetVersionInfo() != "v2" {
		t.Fatalf("listener %s: %v, want active v1 and warming v2", next.GetName(), got)
	}
	var wl listenerv3.Listener
	// As received (the unknown telemetry config kept in a TypedStruct):
	// compare what the proxy knows.
	if err := got.GetWarmingState().GetListener().UnmarshalTo(&wl); err != nil || wl.GetAddress().GetSocketAddress().GetPortValue() != 7001 {
		t.Fatalf("warming listener %v (%v), want the one received (port 7001)", &wl, err)
	}
	cd = unmarshalDump(t, bodyOf(t, f, "/config_dump?resource=dynamic_warming_clusters&name_regex=nomatch"))
	if len(cd.GetConfigs()) != 0 {
		t.Errorf("name_regex not applied to warming clusters: %v", cd)
	}
	cd = unmarshalDump(t, bodyOf(t, f, "/config_dump?resource=dynamic_warming_clusters"))
	if len(cd.GetConfigs()) != 1 {
		t.Errorf("resource=dynamic_warming_clusters: %v", cd)
	}
}
