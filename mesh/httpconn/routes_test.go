package httpconn

import (
	"net/http"
	"strings"
	"testing"
	"time"

	xdstype "github.com/cncf/xds/go/xds/type/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	commonfaultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/common/fault/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

func request(host, target string, headers ...string) *http.Request {
	r, err := http.NewRequest("GET", "http://x"+target, nil)
	if err != nil {
		panic(err)
	}
	r.Host, r.RequestURI = host, target
	for i := 0; i+1 < len(headers); i += 2 {
		r.Header.Add(headers[i], headers[i+1])
	}
	return r
}

// TestDomainPrecedence: Envoy's order — exact, longest suffix wildcard,
// longest prefix wildcard, then "*"; the port is part of the value unless
// ignore_port_in_host_matching.
func TestDomainPrecedence(t *testing.T) {
	rc := routeConfig(
		vhost("exact", []string{"foo.example.com", "foo.example.com:8080"}),
		vhost("suffix-long", []string{"*.example.com"}),
		vhost("suffix-short", []string{"*.com"}),
		vhost("prefix-long", []string{"foo.example.*"}),
		vhost("prefix-short", []string{"foo.*"}),
		vhost("default", []string{"*"}),
	)
	rt, err := CompileRoutes(rc)
	if err != nil {
		t.Fatal(err)
	}
	rc.IgnorePortInHostMatching = true
	noPort, err := CompileRoutes(rc)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		host, want, wantNoPort string
	}{
		{"foo.example.com", "exact", "exact"},
		{"FOO.Example.COM", "exact", "exact"},
		{"foo.example.com:8080", "exact", "exact"},
		{"foo.example.com:9090", "prefix-long", "exact"},
		{"bar.example.com", "suffix-long", "suffix-long"},
		{"example.com", "suffix-short", "suffix-short"},   // "*.example.com" needs at least one char before
		{"bar.other.com", "suffix-short", "suffix-short"}, // suffix beats prefix
		{"foo.example.org", "prefix-long", "prefix-long"}, // longest prefix
		{"foo.bar", "prefix-short", "prefix-short"},
		{"foo.", "default", "default"}, // a wildcard matches at least one char
		{"other", "default", "default"},
		{"bar.example.com:80", "default", "suffix-long"}, // ":80" is part of the value
	} {
		for _, x := range []struct {
			rt   *Routes
			want string
		}{{rt, tc.want}, {noPort, tc.wantNoPort}} {
			vh := x.rt.findVHost(request(tc.host, "/"))
			if vh == nil || vh.Name != x.want {
				got := "<nil>"
				if vh != nil {
					got = vh.Name
				}
				t.Errorf("%q (ignore_port=%v): %s, want %s", tc.host, x.rt == noPort, got, x.want)
			}
		}
	}
	// Without "*" an unknown host has no virtual host.
	rt2, _ := CompileRoutes(routeConfig(vhost("only", []string{"a"})))
	if vh := rt2.findVHost(request("b", "/")); vh != nil {
		t.Errorf("unknown host matched %s", vh.Name)
	}
}

func sm(exact string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: exact}}
}

// TestRouteMatch: path specifiers, case sensitivity, header and query
// parameter matchers, first match wins.
func TestRouteMatch(t *testing.T) {
	named := func(name string, m *routev3.RouteMatch) *routev3.Route {
		r := prefixRoute("/", "c")
		r.Name, r.Match = name, m
		return r
	}
	hm := func(h *routev3.HeaderMatcher) *routev3.RouteMatch {
		return &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/h"}, Headers: []*routev3.HeaderMatcher{h}}
	}
	routes := []*routev3.Route{
		named("exact", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Path{Path: "/exact"}}),
		named("nocase", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/NoCase"}, CaseSensitive: wrapperspb.Bool(false)}),
		named("regex", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "/items/[0-9]+"}}}),
		named("sep", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{PathSeparatedPrefix: "/sep"}}),
		named("h-exact", hm(&routev3.HeaderMatcher{Name: "x-v", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: sm("1")}})),
		named("h-regex", hm(&routev3.HeaderMatcher{Name: "x-v", HeaderMatchSpecifier: &routev3.HeaderMatcher_SafeRegexMatch{SafeRegexMatch: &matcherv3.RegexMatcher{Regex: "2.*"}}})),
		named("h-range", hm(&routev3.HeaderMatcher{Name: "x-n", HeaderMatchSpecifier: &routev3.HeaderMatcher_RangeMatch{RangeMatch: &typev3.Int64Range{Start: 10, End: 20}}})),
		named("h-absent-inverted", hm(&routev3.HeaderMatcher{Name: "x-absent", HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}, InvertMatch: true})),
		named("q", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/q"}, QueryParameters: []*routev3.QueryParameterMatcher{
			{Name: "debug", QueryParameterMatchSpecifier: &routev3.QueryParameterMatcher_StringMatch{StringMatch: sm("on")}},
			{Name: "user", QueryParameterMatchSpecifier: &routev3.QueryParameterMatcher_PresentMatch{PresentMatch: true}},
		}}),
		named("authority", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/auth"}, Headers: []*routev3.HeaderMatcher{
			{Name: ":authority", HeaderMatchSpecifier: &routev3.HeaderMatcher_PrefixMatch{PrefixMatch: "api."}}}}),
		named("grpc", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/svc."}, Grpc: &routev3.RouteMatch_GrpcRouteMatchOptions{}}),
		named("catchall", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}),
	}
	rt, err := CompileRoutes(routeConfig(vhost("v", []string{"*"}, routes...)))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		host, target string
		headers      []string
		want         string
	}{
		{"h", "/exact", nil, "exact"},
		{"h", "/exact?x=1", nil, "exact"}, // query removed for path match
		{"h", "/exact/more", nil, "catchall"},
		{"h", "/nocase/x", nil, "nocase"},
		{"h", "/NOCASE", nil, "nocase"},
		{"h", "/items/42", nil, "regex"},
		{"h", "/items/42/x", nil, "catchall"}, // regex must match the whole path
		{"h", "/sep", nil, "sep"},
		{"h", "/sep/a", nil, "sep"},
		{"h", "/separate", nil, "catchall"},
		{"h", "/h", []string{"X-V", "1"}, "h-exact"},
		{"h", "/h", []string{"X-V", "22"}, "h-regex"},
		{"h", "/h", []string{"X-N", "15"}, "h-range"},
		{"h", "/h", []string{"X-N", "20"}, "h-absent-inverted"},
		{"h", "/h", []string{"X-Absent", "y"}, "catchall"},
		{"h", "/q?debug=on&user=bob", nil, "q"},
		{"h", "/q?user=&debug=%6Fn", nil, "q"}, // percent-decoded value
		{"h", "/q?debug=off&user=bob", nil, "catchall"},
		{"h", "/q?debug=on", nil, "catchall"},
		{"api.example", "/auth", nil, "authority"},
		{"www.example", "/auth", nil, "catchall"},
		{"h", "/svc.Echo/Call", []string{"Content-Type", "application/grpc"}, "grpc"},
		{"h", "/svc.Echo/Call", nil, "catchall"},
	} {
		_, r := rt.Match(request(tc.host, tc.target, tc.headers...))
		if r == nil || r.Name != tc.want {
			got := "<nil>"
			if r != nil {
				got = r.Name
			}
			t.Errorf("%s%s %v: %s, want %s", tc.host, tc.target, tc.headers, got, tc.want)
		}
	}
}

// TestParseErrors: errors name the field from http_connection_manager
// down.
func TestParseErrors(t *testing.T) {
	good := func() *hcmv3.HttpConnectionManager {
		return hcm(routeConfig(vhost("a", []string{"a"}, prefixRoute("/", "c")), vhost("b", []string{"b"}, prefixRoute("/", "c"))))
	}
	for _, tc := range []struct {
		name string
		edit func(*hcmv3.HttpConnectionManager)
		want string
	}{
		{"weighted total 0", func(h *hcmv3.HttpConnectionManager) {
			routeAction(h.GetRouteConfig().VirtualHosts[1].Routes[0]).ClusterSpecifier = &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{
				Clusters: []*routev3.WeightedCluster_ClusterWeight{{Name: "x", Weight: wrapperspb.UInt32(0)}}}}
		}, "http_connection_manager.route_config.virtual_hosts[1].routes[0].route.weighted_clusters: total weight is 0"},
		{"bad regex", func(h *hcmv3.HttpConnectionManager) {
			h.GetRouteConfig().VirtualHosts[0].Routes[0].Match.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "("}}
		}, "http_connection_manager.route_config.virtual_hosts[0].routes[0].match.safe_regex.regex: error parsing regexp"},
		{"duplicate domain", func(h *hcmv3.HttpConnectionManager) {
			h.GetRouteConfig().VirtualHosts[1].Domains = []string{"A"}
		}, "http_connection_manager.route_config.virtual_hosts[1].domains[0]: only unique values"},
		{"unknown retry_on", func(h *hcmv3.HttpConnectionManager) {
			routeAction(h.GetRouteConfig().VirtualHosts[0].Routes[0]).RetryPolicy = &routev3.RetryPolicy{RetryOn: "5xx,bogus"}
		}, `http_connection_manager.route_config.virtual_hosts[0].routes[0].route.retry_policy.retry_on: unknown condition "bogus"`},
		{"bad header format", func(h *hcmv3.HttpConnectionManager) {
			h.GetRouteConfig().VirtualHosts[0].RequestHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x", Value: "%NOPE%"}}}
		}, "http_connection_manager.route_config.virtual_hosts[0].request_headers_to_add[0].header.value"},
		{"unknown filter", func(h *hcmv3.HttpConnectionManager) {
			h.HttpFilters = append([]*hcmv3.HttpFilter{{Name: "acme.filter", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: xdstest.MustAny(t, &structpb.Struct{})}}}, h.HttpFilters...)
		}, "http_connection_manager.http_filters[0] (acme.filter): unknown HTTP filter"},
		{"router not last", func(h *hcmv3.HttpConnectionManager) {
			h.HttpFilters = append(h.HttpFilters, &hcmv3.HttpFilter{Name: "envoy.filters.http.cors"})
		}, "http_connection_manager.http_filters[0] (envoy.filters.http.router): the router is a terminal filter and must be last"},
		{"no router", func(h *hcmv3.HttpConnectionManager) {
			h.HttpFilters = []*hcmv3.HttpFilter{{Name: "envoy.filters.http.cors"}}
		}, "http_connection_manager.http_filters: the last filter must be envoy.filters.http.router"},
		{"http3", func(h *hcmv3.HttpConnectionManager) { h.CodecType = hcmv3.HttpConnectionManager_HTTP3 }, "http_connection_manager.codec_type: HTTP3 not supported"},
		{"no stat_prefix", func(h *hcmv3.HttpConnectionManager) { h.StatPrefix = "" }, "http_connection_manager: invalid HttpConnectionManager.StatPrefix"},
	} {
		h := good()
		tc.edit(h)
		_, err := ParseHCM(h)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v\n\twant %q", tc.name, err, tc.want)
		}
	}
	// Accepted: Istio's no-op filters, also TypedStruct-wrapped, optional
	// unknown ones.
	h := good()
	ts := xdstest.MustAny(t, &xdstype.TypedStruct{TypeUrl: "type.googleapis.com/io.istio.http.peer_metadata.Config", Value: &structpb.Struct{}})
	h.HttpFilters = append([]*hcmv3.HttpFilter{
		{Name: "istio.metadata_exchange", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: ts}},
		{Name: "istio.alpn"}, {Name: "envoy.filters.http.cors"}, {Name: "envoy.filters.http.grpc_stats"},
		{Name: "istio.stats"}, {Name: "envoy.filters.http.fault", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: xdstest.MustAny(t, &faultv3.HTTPFault{})}},
		{Name: "acme.optional", IsOptional: true},
	}, h.HttpFilters...)
	cfg, err := ParseHCM(h)
	if err != nil {
		t.Fatalf("Istio filter list: %v", err)
	}
	if got := cfg.SkippedFilters(); len(got) != 6 {
		t.Errorf("skipped %v", got)
	}
}

func faultFilter(f *faultv3.HTTPFault) *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: FaultFilter, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: xdstest.Pack(f)}}
}

func pct(n uint32) *typev3.FractionalPercent {
	return &typev3.FractionalPercent{Numerator: n, Denominator: typev3.FractionalPercent_HUNDRED}
}

// TestFault: abort and delay, percentages, per-route override (Istio puts
// the fault config in typed_per_filter_config).
func TestFault(t *testing.T) {
	u := startUpstream(t, named("u"))
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	delayed := prefixRoute("/delay", "c")
	delayed.TypedPerFilterConfig = map[string]*anypb.Any{FaultFilter: xdstest.MustAny(t, &faultv3.HTTPFault{
		Delay: &commonfaultv3.FaultDelay{FaultDelaySecifier: &commonfaultv3.FaultDelay_FixedDelay{FixedDelay: durationpb.New(150 * time.Millisecond)}, Percentage: pct(100)},
	})}
	half := prefixRoute("/half", "c")
	half.TypedPerFilterConfig = map[string]*anypb.Any{FaultFilter: xdstest.MustAny(t, &faultv3.HTTPFault{
		Abort: &faultv3.FaultAbort{ErrorType: &faultv3.FaultAbort_HttpStatus{HttpStatus: 503}, Percentage: pct(50)},
	})}
	off := prefixRoute("/off", "c")
	off.TypedPerFilterConfig = map[string]*anypb.Any{FaultFilter: xdstest.MustAny(t, &routev3.FilterConfig{Disabled: true})}
	// The filter-level config aborts everything with 418.
	h := hcm(routeConfig(vhost("v", []string{"*"}, delayed, half, off, prefixRoute("/", "c"))), faultFilter(&faultv3.HTTPFault{
		Abort: &faultv3.FaultAbort{ErrorType: &faultv3.FaultAbort_HttpStatus{HttpStatus: 418}, Percentage: pct(100)},
	}))
	p := startProxy(t, mustParse(t, h), env)
	c := client(false)

	resp, body := get(t, c, p, "x", "/")
	if resp.StatusCode != 418 || body != "fault filter abort" {
		t.Errorf("abort: %d %q", resp.StatusCode, body)
	}
	if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagFI) {
		t.Errorf("abort flags %s", e.ResponseFlags)
	}
	start := time.Now()
	resp, body = get(t, c, p, "x", "/delay")
	if resp.StatusCode != 200 || body != "u" || time.Since(start) < 150*time.Millisecond {
		t.Errorf("delay: %d %q after %v", resp.StatusCode, body, time.Since(start))
	}
	if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagDI) {
		t.Errorf("delay flags %s", e.ResponseFlags)
	}
	if resp, _ := get(t, c, p, "x", "/off"); resp.StatusCode != 200 {
		t.Errorf("disabled per route: %d", resp.StatusCode)
	}
	aborted := 0
	for i := 0; i < 400; i++ {
		if resp, _ := get(t, c, p, "x", "/half"); resp.StatusCode == 503 {
			aborted++
		}
	}
	if aborted < 150 || aborted > 250 {
		t.Errorf("50%% abort: %d of 400", aborted)
	}
	if v := p.entries(); len(v) == 0 {
		t.Fatal("no entries")
	}
}

// BenchmarkRouteMatch: virtual host and route lookup on a 100-vhost
// Istio-like configuration (10 routes each, matching the 6th).
func BenchmarkRouteMatch(b *testing.B) {
	var vhs []*routev3.VirtualHost
	for i := 0; i < 100; i++ {
		name := "svc" + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + strings.Repeat("0", i/26) + ".ns.svc.cluster.local"
		var rs []*routev3.Route
		for j := 0; j < 10; j++ {
			r := prefixRoute("/api/v"+string(rune('0'+j)), "c")
			r.Match.Headers = []*routev3.HeaderMatcher{{Name: "x-version", HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}, InvertMatch: j%2 == 0}}
			rs = append(rs, r)
		}
		vhs = append(vhs, vhost(name, []string{name, name + ":8080"}, rs...))
	}
	vhs = append(vhs, vhost("allow_any", []string{"*"}, prefixRoute("/", "PassthroughCluster")))
	rt, err := CompileRoutes(routeConfig(vhs...))
	if err != nil {
		b.Fatal(err)
	}
	host := vhs[57].Domains[1]
	r := request(host, "/api/v5/items?id=7", "X-Version", "2")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, rr := rt.Match(r); rr == nil {
			b.Fatal("no route")
		}
	}
}
