package controlplane

import (
	"net/http"
	"slices"
	"strconv"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"

	"github.com/meshtun/meshtun/mesh/httpconn"
)

// httpRegistry: two HTTP services on port 80 in the node's namespace, one
// in another namespace, two external hosts sharing an address, and a TCP
// service on port 80 of its own VIP.
const httpRegistry = `
services:
- {name: web, namespace: default, vip: 10.96.1.1, ports: [{port: 80, protocol: HTTP}], endpoints: [{address: 10.1.0.1}]}
- {name: api, namespace: default, vip: 10.96.1.2, ports: [{port: 80, protocol: HTTP}], endpoints: [{address: 10.1.0.2}]}
- {name: web, namespace: other, vip: "fd00:96::3", ports: [{port: 80, protocol: HTTP}], endpoints: [{address: "fd00:1::3"}]}
- {name: db, namespace: default, vip: 10.96.1.4, ports: [{port: 80, protocol: TCP}], endpoints: [{address: 10.1.0.4}]}
externalHosts:
- {hosts: [x.example.com, y.example.com], addresses: [240.240.0.9], ports: [{port: 80, protocol: HTTP}]}
`

func hcmOf(t *testing.T, l *listenerv3.Listener) *hcmv3.HttpConnectionManager {
	t.Helper()
	if l == nil || len(l.GetFilterChains()) != 1 || len(l.GetFilterChains()[0].GetFilters()) != 1 {
		t.Fatalf("want one chain with one filter: %v", l)
	}
	f := l.GetFilterChains()[0].GetFilters()[0]
	var hcm hcmv3.HttpConnectionManager
	if f.GetName() != hcmName || f.GetTypedConfig().UnmarshalTo(&hcm) != nil {
		t.Fatalf("filter %s is not an http_connection_manager", f.GetName())
	}
	return &hcm
}

func findRoutes(r *resources, name string) *routev3.RouteConfiguration {
	if r == nil {
		return nil
	}
	for _, rc := range r.Routes {
		if rc.GetName() == name {
			return rc
		}
	}
	return nil
}

func vhostDomains(rc *routev3.RouteConfiguration, name string) []string {
	for _, vh := range rc.GetVirtualHosts() {
		if vh.GetName() == name {
			return vh.GetDomains()
		}
	}
	return nil
}

// TestHTTPShape: HTTP ports get Istio's shape. One listener 0.0.0.0_80
// for every HTTP service on port 80 (none on their VIPs; the TCP service
// keeps its own), not bound, outbound, with an http_connection_manager
// taking route configuration "80" over ADS and only the typed router;
// ::_80 as well for a dual-stack node, sharing the route configuration.
// The route configuration has a virtual host per host named <fqdn>:80
// with Istio's domains (short names only for the node's namespace, VIPs,
// IPv6 in brackets, a shared address given to the first host only), a
// "default" route with Istio's retries and no timeout, and the catch-all
// allow_any (PassthroughCluster) or block_all (502) by the outbound
// policy. The proxy compiles it and routes by Host accordingly.
func TestHTTPShape(t *testing.T) {
	reg, err := parseRegistry("reg.yaml", []byte(httpRegistry))
	if err != nil {
		t.Fatal(err)
	}
	def := defaultMeshPtr()
	r := generate(reg, &def.Spec, node(t, "sidecar~10.1.0.5~app.default~default.svc.cluster.local", ""))

	var names []string
	for _, l := range r.Listeners {
		names = append(names, l.GetName())
	}
	for _, n := range []string{"10.96.1.1_80", "10.96.1.2_80", "fd00:96::3_80", "240.240.0.9_80", "::_80"} {
		if slices.Contains(names, n) {
			t.Errorf("listener %s: HTTP ports must share 0.0.0.0_80 (listeners %v)", n, names)
		}
	}
	if !slices.Contains(names, "10.96.1.4_80") {
		t.Errorf("the TCP service lost its listener: %v", names)
	}
	l := findListener(r, "0.0.0.0_80")
	if l == nil {
		t.Fatalf("no 0.0.0.0_80 listener: %v", names)
	}
	if l.GetBindToPort().GetValue() || l.GetBindToPort() == nil || l.GetTrafficDirection() != corev3.TrafficDirection_OUTBOUND ||
		l.GetAddress().GetSocketAddress().GetAddress() != "0.0.0.0" || l.GetAddress().GetSocketAddress().GetPortValue() != 80 {
		t.Errorf("0.0.0.0_80: bind_to_port %v, direction %v, address %v", l.GetBindToPort(), l.GetTrafficDirection(), l.GetAddress())
	}
	hcm := hcmOf(t, l)
	if hcm.GetStatPrefix() != "outbound_0.0.0.0_80" || hcm.GetRds().GetRouteConfigName() != "80" ||
		hcm.GetRds().GetConfigSource().GetAds() == nil || hcm.GetUseRemoteAddress() == nil || hcm.GetUseRemoteAddress().GetValue() ||
		!hcm.GetNormalizePath().GetValue() {
		t.Errorf("http_connection_manager: %v", hcm)
	}
	if fs := hcm.GetHttpFilters(); len(fs) != 1 || fs[0].GetName() != routerFilterName ||
		!fs[0].GetTypedConfig().MessageIs(&routerv3.Router{}) {
		t.Errorf("http_filters %v, want the typed router only", fs)
	}

	if len(r.Routes) != 1 {
		t.Fatalf("route configurations %v, want one (\"80\")", r.Routes)
	}
	rc := findRoutes(r, "80")
	if rc == nil || rc.GetValidateClusters() == nil || rc.GetValidateClusters().GetValue() {
		t.Fatalf("route configuration 80: %v", rc)
	}
	var vhosts []string
	for _, vh := range rc.GetVirtualHosts() {
		vhosts = append(vhosts, vh.GetName())
	}
	want := []string{"api.default.svc.cluster.local:80", "web.default.svc.cluster.local:80", "web.other.svc.cluster.local:80",
		"x.example.com:80", "y.example.com:80", allowAnyVirtualHost}
	if !slices.Equal(vhosts, want) {
		t.Errorf("virtual hosts %v, want %v", vhosts, want)
	}
	for _, tc := range []struct {
		vhost   string
		domains []string
	}{
		{"web.default.svc.cluster.local:80", []string{"web.default.svc.cluster.local", "web.default.svc.cluster.local:80", "web", "web:80",
			"web.default.svc", "web.default.svc:80", "web.default", "web.default:80", "10.96.1.1", "10.96.1.1:80"}},
		// Another namespace: no short name ("web" is web.default here).
		{"web.other.svc.cluster.local:80", []string{"web.other.svc.cluster.local", "web.other.svc.cluster.local:80",
			"web.other.svc", "web.other.svc:80", "web.other", "web.other:80", "[fd00:96::3]", "[fd00:96::3]:80"}},
		// The shared address goes to the first host only.
		{"x.example.com:80", []string{"x.example.com", "x.example.com:80", "240.240.0.9", "240.240.0.9:80"}},
		{"y.example.com:80", []string{"y.example.com", "y.example.com:80"}},
		{allowAnyVirtualHost, []string{"*"}},
	} {
		if got := vhostDomains(rc, tc.vhost); !slices.Equal(got, tc.domains) {
			t.Errorf("%s: domains\n  %v\nwant\n  %v", tc.vhost, got, tc.domains)
		}
	}
	dr := rc.GetVirtualHosts()[1].GetRoutes()
	if len(dr) != 1 || dr[0].GetName() != defaultRouteName || dr[0].GetMatch().GetPrefix() != "/" {
		t.Fatalf("web's routes: %v", dr)
	}
	ra := dr[0].GetRoute()
	rp := ra.GetRetryPolicy()
	if ra.GetCluster() != "outbound|80||web.default.svc.cluster.local" || ra.GetTimeout() == nil || ra.GetTimeout().AsDuration() != 0 ||
		rp.GetRetryOn() != "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes" || rp.GetNumRetries().GetValue() != 2 ||
		len(rp.GetRetryHostPredicate()) != 1 || rp.GetRetryHostPredicate()[0].GetName() != "envoy.retry_host_predicates.previous_hosts" ||
		rp.GetHostSelectionRetryMaxAttempts() != 5 || !slices.Equal(rp.GetRetriableStatusCodes(), []uint32{503}) {
		t.Errorf("web's default route: %v", ra)
	}
	if got := routeTarget(t, rc, "unknown.example.com"); got != passthroughCluster {
		t.Errorf("ALLOW_ANY: an unknown Host goes to %q, want %s", got, passthroughCluster)
	}

	// What the proxy makes of it: Host routing, with and without the port.
	for host, want := range map[string]string{
		"web": "outbound|80||web.default.svc.cluster.local", "web:80": "outbound|80||web.default.svc.cluster.local",
		"api.default": "outbound|80||api.default.svc.cluster.local", "10.96.1.2": "outbound|80||api.default.svc.cluster.local",
		"web.other": "outbound|80||web.other.svc.cluster.local", "[fd00:96::3]:80": "outbound|80||web.other.svc.cluster.local",
		"240.240.0.9": "outbound|80||x.example.com", "Y.Example.com": "outbound|80||y.example.com",
		"other": passthroughCluster,
	} {
		if got := routeTarget(t, rc, host); got != want {
			t.Errorf("Host %q → %q, want %q", host, got, want)
		}
	}

	// REGISTRY_ONLY: block_all, a 502; the hosts' virtual hosts unchanged.
	strict := defaultMeshPtr()
	strict.Spec.OutboundTrafficPolicy.Mode = RegistryOnly
	rs := generate(reg, &strict.Spec, node(t, "sidecar~10.1.0.5~app.default~default.svc.cluster.local", ""))
	rcs := findRoutes(rs, "80")
	last := rcs.GetVirtualHosts()[len(rcs.GetVirtualHosts())-1]
	if last.GetName() != blockAllVirtualHost || !slices.Equal(last.GetDomains(), []string{"*"}) || len(last.GetRoutes()) != 1 ||
		last.GetRoutes()[0].GetName() != blockAllVirtualHost || last.GetRoutes()[0].GetDirectResponse().GetStatus() != 502 {
		t.Errorf("REGISTRY_ONLY catch-all: %v", last)
	}
	if got := routeTarget(t, rcs, "unknown.example.com"); got != "502" {
		t.Errorf("REGISTRY_ONLY: an unknown Host gets %q, want 502", got)
	}
	if got := routeTarget(t, rcs, "web"); got != "outbound|80||web.default.svc.cluster.local" {
		t.Errorf("REGISTRY_ONLY: web → %q", got)
	}

	// A node in another namespace: "web" is web.other's short name.
	ro := generate(reg, &def.Spec, node(t, "sidecar~10.1.0.6~app.other~other.svc.cluster.local", ""))
	if got := routeTarget(t, findRoutes(ro, "80"), "web"); got != "outbound|80||web.other.svc.cluster.local" {
		t.Errorf("from namespace other, Host web → %q", got)
	}
	if got := vhostDomains(findRoutes(ro, "80"), "api.default.svc.cluster.local:80"); slices.Contains(got, "api") {
		t.Errorf("from namespace other, api.default has the short name: %v", got)
	}

	// Dual stack: 0.0.0.0_80 and ::_80, one route configuration.
	rd := generate(reg, &def.Spec, node(t, "sidecar~10.1.0.5~app.default~default.svc.cluster.local", "10.1.0.5,fd00:1::5"))
	v6 := findListener(rd, "::_80")
	if findListener(rd, "0.0.0.0_80") == nil || v6 == nil || len(rd.Routes) != 1 {
		t.Fatalf("dual stack: listeners 0.0.0.0_80 %v, ::_80 %v, %d route configurations", findListener(rd, "0.0.0.0_80") != nil, v6 != nil, len(rd.Routes))
	}
	if h := hcmOf(t, v6); h.GetStatPrefix() != "outbound_::_80" || h.GetRds().GetRouteConfigName() != "80" {
		t.Errorf("::_80: stat_prefix %q, rds %q", h.GetStatPrefix(), h.GetRds().GetRouteConfigName())
	}
	for _, res := range []*resources{r, rs, ro, rd} {
		if err := buildInProxy(res); err != nil {
			t.Errorf("the proxy rejects it: %v", err)
		}
	}
}

// routeTarget compiles rc as the proxy does and says where a request for
// host goes: the cluster, or the direct response's status.
func routeTarget(t *testing.T, rc *routev3.RouteConfiguration, host string) string {
	t.Helper()
	rt, err := httpconn.CompileRoutes(rc)
	if err != nil {
		t.Fatalf("the proxy refuses route configuration %s: %v", rc.GetName(), err)
	}
	req, _ := http.NewRequest("GET", "http://x/some/path", nil)
	req.Host, req.RequestURI = host, "/some/path"
	vh, route := rt.Match(req)
	if vh == nil || route == nil {
		return ""
	}
	for _, v := range rc.GetVirtualHosts() {
		if v.GetName() != vh.Name {
			continue
		}
		for _, r := range v.GetRoutes() {
			if r.GetName() == route.Name {
				if d := r.GetDirectResponse(); d != nil {
					return strconv.Itoa(int(d.GetStatus()))
				}
				return r.GetRoute().GetCluster()
			}
		}
	}
	return ""
}

func catchAllVHost(r *resources, route string) string {
	rc := findRoutes(r, route)
	if rc == nil || len(rc.GetVirtualHosts()) == 0 {
		return ""
	}
	return rc.GetVirtualHosts()[len(rc.GetVirtualHosts())-1].GetName()
}

// TestADSRemovedHTTPServiceNoWait: removing one of two HTTP services of a
// port changes only the route configuration (the 0.0.0.0_80 listener is
// the same), so a delta node gets no new listeners to ACK; its unused
// cluster is still dropped as soon as it has ACKed the routes, not after
// the step wait. Over state of the world too.
func TestADSRemovedHTTPServiceNoWait(t *testing.T) {
	def := defaultMeshPtr()
	two, err := parseRegistry("two", []byte(`
services:
- {name: a, vip: 10.96.2.1, ports: [{port: 80, protocol: HTTP}], endpoints: [{address: 10.1.0.1}]}
- {name: b, vip: 10.96.2.2, ports: [{port: 80, protocol: HTTP}], endpoints: [{address: 10.1.0.2}]}
`))
	if err != nil {
		t.Fatal(err)
	}
	one, err := parseRegistry("one", []byte("services:\n- {name: a, vip: 10.96.2.1, ports: [{port: 80, protocol: HTTP}], endpoints: [{address: 10.1.0.1}]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	srv, addr := startServer(t, two, def)
	srv.mu.Lock()
	srv.stepWait = time.Minute
	srv.mu.Unlock()
	const id = "sidecar~10.1.0.5~app.default~default.svc.cluster.local"
	delta := startProxyStub(t, addr, true, id)
	sotw := startProxyStub(t, addr, false, "sidecar~10.1.0.6~app2.default~default.svc.cluster.local")
	want := names(generate(two, &def.Spec, node(t, id, "")))
	for _, px := range []*proxyStub{delta, sotw} {
		if !waitFor(5*time.Second, func() bool { return names(px.accepted()) == want }) {
			t.Fatalf("initial configuration not accepted: %v\n%s", px.client.LastError(), names(px.accepted()))
		}
	}
	start := time.Now()
	srv.setRegistry(one)
	want = names(generate(one, &def.Spec, node(t, id, "")))
	for _, px := range []*proxyStub{delta, sotw} {
		if !waitFor(5*time.Second, func() bool { return names(px.accepted()) == want }) {
			t.Fatalf("b's cluster was not dropped (pending: %s):\n%s", srv.status().Pending, names(px.accepted()))
		}
	}
	if !waitFor(time.Second, func() bool { return srv.status().Pending == "" }) {
		t.Fatalf("still pending: %s", srv.status().Pending)
	}
	t.Logf("removal done in %v", time.Since(start))
	if rc := findRoutes(delta.accepted(), "80"); len(rc.GetVirtualHosts()) != 2 {
		t.Errorf("route configuration 80 at the proxy: %v", rc)
	}
	for _, n := range srv.status().Nodes {
		if n.NACKs != 0 || n.Routes == 0 {
			t.Errorf("node %+v", n)
		}
	}
}
