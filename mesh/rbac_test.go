package mesh

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/netstack"
)

// denyFrom is istiod's shape of a DENY policy on source IP blocks.
func denyFrom(name, cidr string, plen uint32) *rbacv3.RBAC {
	return &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: map[string]*rbacv3.Policy{name: {
		Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
		Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_DirectRemoteIp{DirectRemoteIp: &corev3.CidrRange{
			AddressPrefix: cidr, PrefixLen: wrapperspb.UInt32(plen)}}}},
	}}}
}

func rbacStat(t *testing.T, s *Snapshot, name string) uint64 {
	t.Helper()
	st, sh := s.RBACStats()
	for _, b := range st {
		for _, c := range b.List() {
			if c.Name == name {
				return c.Value
			}
		}
	}
	for _, b := range sh {
		for _, c := range b.List() {
			if c.Name == name {
				return c.Value
			}
		}
	}
	t.Fatalf("no stat %s", name)
	return 0
}

// TestNetworkRBACClosesBeforeUpstream: a connection a network RBAC
// filter denies is closed without an upstream connection; an allowed
// one is proxied; the counters and termination details are Envoy's.
func TestNetworkRBACClosesBeforeUpstream(t *testing.T) {
	up, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var upAccepts atomic.Int32
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := up.Accept()
			if err != nil {
				return
			}
			upAccepts.Add(1)
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	defer func() { up.Close(); wg.Wait() }()

	l := xdstest.TCPListener(t, "l", "0.0.0.0", 9000, "echo", false)
	fs := l.FilterChains[0].Filters
	l.FilterChains[0].Filters = append([]*listenerv3.Filter{{Name: "envoy.filters.network.rbac",
		ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: anyOf(t, &netrbacv3.RBAC{StatPrefix: "tcp.",
			Rules: denyFrom("ns[foo]-policy[deny-ip]-rule[0]", "10.0.0.2", 32)})}}}, fs...)
	s, err := Build("1", []*listenerv3.Listener{l},
		[]*clusterv3.Cluster{xdstest.StaticCluster("echo", netip.MustParseAddrPort(up.Addr().String()))}, nil, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Retire(nil)
	d := &Dispatcher{}
	d.Swap(s)

	flow := func(src string) (string, accesslog.Entry) {
		client, down := net.Pipe()
		defer client.Close()
		fid := netstack.FlowID{Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort("10.96.0.1:9000")}
		var e accesslog.Entry
		done := make(chan struct{})
		go func() { serveFlow(s, s.Listener("l"), &accepted{conn: down, fid: fid}, &e, d); close(done) }()
		client.SetDeadline(time.Now().Add(5 * time.Second))
		var got string
		if _, err := client.Write([]byte("ping")); err == nil {
			b := make([]byte, 4)
			n, _ := io.ReadFull(client, b)
			got = string(b[:n])
		}
		client.Close()
		<-done
		return got, e
	}

	got, e := flow("10.0.0.2:40000")
	if got != "" || e.Details != "rbac_access_denied_matched_policy[ns[foo]-policy[deny-ip]-rule[0]]" {
		t.Fatalf("denied flow: read %q, details %q", got, e.Details)
	}
	if n := upAccepts.Load(); n != 0 {
		t.Fatalf("denied flow reached the upstream (%d connections)", n)
	}
	if got, e := flow("10.0.0.3:40000"); got != "ping" {
		t.Fatalf("allowed flow: read %q (details %q)", got, e.Details)
	}
	xdstest.Eventually(t, 5*time.Second, "one upstream connection", func() bool { return upAccepts.Load() == 1 })
	if a, dn := rbacStat(t, s, "tcp.rbac.allowed"), rbacStat(t, s, "tcp.rbac.denied"); a != 1 || dn != 1 {
		t.Fatalf("tcp.rbac.allowed=%d denied=%d, want 1 and 1", a, dn)
	}
}

// TestHTTPRBAC: the HTTP filter answers 403 before the route's action,
// an ALLOW filter denies what no policy matches, and RBACPerRoute
// replaces the filter's rules on its route, or without rbac disables it.
func TestHTTPRBAC(t *testing.T) {
	prefix := func(p string) *routev3.RouteMatch {
		return &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: p}}
	}
	ok := &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 204}}
	rc := &routev3.RouteConfiguration{Name: "inline", VirtualHosts: []*routev3.VirtualHost{{Name: "all", Domains: []string{"*"},
		Routes: []*routev3.Route{
			{Match: prefix("/public"), Action: ok, TypedPerFilterConfig: map[string]*anypb.Any{
				"envoy.filters.http.rbac": anyOf(t, &httprbacv3.RBACPerRoute{})}},
			{Match: prefix("/strict"), Action: ok, TypedPerFilterConfig: map[string]*anypb.Any{
				"envoy.filters.http.rbac": anyOf(t, &httprbacv3.RBACPerRoute{Rbac: &httprbacv3.RBAC{Rules: &rbacv3.RBAC{}}})}},
			{Match: prefix("/"), Action: ok},
		}}}}
	exact := func(s string) *matcherv3.StringMatcher {
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}}
	}
	denyAdmin := &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: map[string]*rbacv3.Policy{"ns[foo]-policy[no-admin]-rule[0]": {
		Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{
			Rule: &matcherv3.PathMatcher_Path{Path: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "/admin"}}}}}}},
		Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}},
	}}}
	allowGet := &rbacv3.RBAC{Policies: map[string]*rbacv3.Policy{"ns[foo]-policy[get]-rule[0]": {
		Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{Name: ":method",
			HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: exact("GET")}}}}},
		Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}},
	}}}
	hf := func(name string, pb *httprbacv3.RBAC) *hcmv3.HttpFilter {
		return &hcmv3.HttpFilter{Name: name, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: anyOf(t, pb)}}
	}
	hcm := anyOf(t, &hcmv3.HttpConnectionManager{
		StatPrefix:     "inbound_0.0.0.0_80",
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: rc},
		HttpFilters: []*hcmv3.HttpFilter{
			hf("envoy.filters.http.rbac.deny", &httprbacv3.RBAC{Rules: denyAdmin}),
			hf("envoy.filters.http.rbac", &httprbacv3.RBAC{Rules: allowGet, ShadowRules: denyAdmin, ShadowRulesStatPrefix: "istio_dry_run_deny_"}),
			{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: anyOf(t, &routerv3.Router{})}},
		},
	})
	chain := &listenerv3.FilterChain{Filters: []*listenerv3.Filter{{Name: HCMFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: hcm}}}}
	snap, err := Build("1", []*listenerv3.Listener{listener(t, "0.0.0.0_80", "0.0.0.0", 80, false, &no, chain)}, passthroughClusters(), nil, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Retire(nil)
	l := snap.Listener("0.0.0.0_80")
	d := NewDispatcher(DispatcherOptions{})
	d.Swap(snap)

	do := func(method, path string) (int, string) {
		cli, srv := net.Pipe()
		fid := netstack.FlowID{Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.MustParseAddrPort("10.96.0.1:80")}
		var e accesslog.Entry
		done := make(chan struct{})
		go func() { defer close(done); serveHTTP(d, snap, l, l.Chains[0], srv, fid, "", &e) }()
		cli.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(cli, method+" "+path+" HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(cli), nil)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		cli.Close()
		<-done
		return resp.StatusCode, string(body)
	}
	for _, tc := range []struct {
		method, path string
		code         int
	}{
		{"GET", "/", 204},
		{"GET", "/admin/users", 403}, // DENY filter
		{"POST", "/", 403},           // ALLOW filter: no policy matches
		{"POST", "/public/x", 204},   // ALLOW filter disabled on the route
		{"GET", "/strict", 403},      // ALLOW filter overridden: rules {} deny all
	} {
		code, body := do(tc.method, tc.path)
		if code != tc.code {
			t.Errorf("%s %s: %d, want %d", tc.method, tc.path, code, tc.code)
		}
		if code == 403 && body != "RBAC: access denied" {
			t.Errorf("%s %s: body %q", tc.method, tc.path, body)
		}
	}
	p := "http.inbound_0.0.0.0_80.rbac."
	if a, dn := rbacStat(t, snap, p+"allowed"), rbacStat(t, snap, p+"denied"); a != 4+1 || dn != 1+2 {
		// The DENY filter allows 4 and denies /admin; the ALLOW filter
		// allows GET / and denies POST / and, by its override, /strict;
		// the request on the route that disables it counts nowhere.
		t.Errorf("%sallowed=%d denied=%d", p, a, dn)
	}
	if n := rbacStat(t, snap, p+"istio_dry_run_deny_shadow_denied"); n != 0 {
		t.Errorf("shadow denied %d, want 0 (the shadow filter only sees what the DENY filter let through)", n)
	}
}

// TestRBACConfigNACK: a filter needing JWT metadata is refused naming
// the field, so the xDS client NACKs the listener.
func TestRBACConfigNACK(t *testing.T) {
	jwt := &rbacv3.RBAC{Policies: map[string]*rbacv3.Policy{"ns[foo]-policy[jwt]-rule[0]": {
		Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
		Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Metadata{Metadata: &matcherv3.MetadataMatcher{
			Filter: "envoy.filters.http.jwt_authn", Path: []*matcherv3.MetadataMatcher_PathSegment{{Segment: &matcherv3.MetadataMatcher_PathSegment_Key{Key: "payload"}}},
			Value: &matcherv3.ValueMatcher{MatchPattern: &matcherv3.ValueMatcher_PresentMatch{PresentMatch: true}}}}}},
	}}}
	l := xdstest.TCPListener(t, "l", "0.0.0.0", 9000, "PassthroughCluster", false)
	l.FilterChains[0].Filters = append([]*listenerv3.Filter{{Name: "envoy.filters.network.rbac",
		ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: anyOf(t, &netrbacv3.RBAC{StatPrefix: "tcp.", Rules: jwt})}}}, l.FilterChains[0].Filters...)
	_, err := Build("1", []*listenerv3.Listener{l}, passthroughClusters(), nil, buildOpts())
	if err == nil {
		t.Fatal("built a listener whose RBAC needs JWT metadata")
	}
	want := `filters[0] (envoy.filters.network.rbac): rules.policies["ns[foo]-policy[jwt]-rule[0]"].principals[0].metadata (filter "envoy.filters.http.jwt_authn")`
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q\nwant it to contain %q", err, want)
	}
}

// TestHTTPRBACFaultOrder: RBAC and fault run in http_filters order.
func TestHTTPRBACFaultOrder(t *testing.T) {
	denyAll := &hcmv3.HttpFilter{Name: "envoy.filters.http.rbac", ConfigType: &hcmv3.HttpFilter_TypedConfig{
		TypedConfig: anyOf(t, &httprbacv3.RBAC{Rules: &rbacv3.RBAC{}})}}
	abort := &hcmv3.HttpFilter{Name: "envoy.filters.http.fault", ConfigType: &hcmv3.HttpFilter_TypedConfig{
		TypedConfig: anyOf(t, &faultv3.HTTPFault{Abort: &faultv3.FaultAbort{
			ErrorType:  &faultv3.FaultAbort_HttpStatus{HttpStatus: 503},
			Percentage: &typev3.FractionalPercent{Numerator: 100, Denominator: typev3.FractionalPercent_HUNDRED}}})}}
	router := &hcmv3.HttpFilter{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: anyOf(t, &routerv3.Router{})}}
	for _, tc := range []struct {
		name    string
		filters []*hcmv3.HttpFilter
		want    int
	}{
		{"rbac first", []*hcmv3.HttpFilter{denyAll, abort, router}, 403},
		{"fault first", []*hcmv3.HttpFilter{abort, denyAll, router}, 503},
	} {
		rc := &routev3.RouteConfiguration{Name: "inline", VirtualHosts: []*routev3.VirtualHost{{Name: "all", Domains: []string{"*"},
			Routes: []*routev3.Route{{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 204}}}}}}}
		hcm := anyOf(t, &hcmv3.HttpConnectionManager{StatPrefix: "p", HttpFilters: tc.filters,
			RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: rc}})
		chain := &listenerv3.FilterChain{Filters: []*listenerv3.Filter{{Name: HCMFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: hcm}}}}
		snap, err := Build("1", []*listenerv3.Listener{listener(t, "0.0.0.0_80", "0.0.0.0", 80, false, &no, chain)}, passthroughClusters(), nil, buildOpts())
		if err != nil {
			t.Fatal(err)
		}
		l := snap.Listener("0.0.0.0_80")
		d := NewDispatcher(DispatcherOptions{})
		d.Swap(snap)
		cli, srv := net.Pipe()
		fid := netstack.FlowID{Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.MustParseAddrPort("10.96.0.1:80")}
		var e accesslog.Entry
		done := make(chan struct{})
		go func() { defer close(done); serveHTTP(d, snap, l, l.Chains[0], srv, fid, "", &e) }()
		cli.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(cli, "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(cli), nil)
		if err != nil {
			t.Fatal(err)
		}
		cli.Close()
		<-done
		snap.Retire(nil)
		if resp.StatusCode != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, resp.StatusCode, tc.want)
		}
	}
}
