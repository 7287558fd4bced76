package rbac

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	uritemplatev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/path/match/uri_template/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func allowIf(perm *rbacv3.Permission, id *rbacv3.Principal) *rbacv3.RBAC {
	if perm == nil {
		perm = &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}
	}
	if id == nil {
		id = &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}
	}
	return &rbacv3.RBAC{Policies: map[string]*rbacv3.Policy{"p": {
		Permissions: []*rbacv3.Permission{perm}, Principals: []*rbacv3.Principal{id}}}}
}

func hdr(name string, hm *routev3.HeaderMatcher) *rbacv3.Permission {
	hm.Name = name
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: hm}}
}

func sm(s *matcherv3.StringMatcher) *routev3.HeaderMatcher {
	return &routev3.HeaderMatcher{HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: s}}
}

func uriTemplate(t string) *rbacv3.Permission {
	a, _ := anypb.New(&uritemplatev3.UriTemplateMatchConfig{PathTemplate: t})
	return &rbacv3.Permission{Rule: &rbacv3.Permission_UriTemplate{UriTemplate: &corev3.TypedExtensionConfig{Name: "t", TypedConfig: a}}}
}

func cidr(a string, n uint32) *corev3.CidrRange {
	return &corev3.CidrRange{AddressPrefix: a, PrefixLen: wrapperspb.UInt32(n)}
}

// TestMatchers: each matcher kind on inputs that match and inputs that
// do not.
func TestMatchers(t *testing.T) {
	req := func(mod func(*Input)) *Input {
		in := httpIn("GET", "Example.COM", "/api/v1/items/42?x=/admin", nil)
		in.Header = http.Header{"X-Tag": {"a", "b"}, "X-One": {"Value-1"}}
		if mod != nil {
			mod(in)
		}
		return in
	}
	tests := []struct {
		name string
		perm *rbacv3.Permission
		id   *rbacv3.Principal
		in   *Input
		want bool
	}{
		{"authority ignore_case", hdr(":authority", sm(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "example.com"}, IgnoreCase: true})), nil, req(nil), true},
		{"authority case-sensitive", hdr(":authority", sm(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "example.com"}})), nil, req(nil), false},
		{"contains ignore_case", hdr("x-one", sm(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Contains{Contains: "UE-"}, IgnoreCase: true})), nil, req(nil), true},
		{"suffix ignore_case", hdr(":authority", sm(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: ".com"}, IgnoreCase: true})), nil, req(nil), true},
		{"multi-value joined", hdr("x-tag", &routev3.HeaderMatcher{HeaderMatchSpecifier: &routev3.HeaderMatcher_ExactMatch{ExactMatch: "a,b"}}), nil, req(nil), true},
		{"missing header", hdr("x-none", &routev3.HeaderMatcher{HeaderMatchSpecifier: &routev3.HeaderMatcher_PrefixMatch{PrefixMatch: ""}}), nil, req(nil), false},
		{"present false", hdr("x-none", &routev3.HeaderMatcher{HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: false}}), nil, req(nil), true},
		{"invert", hdr(":method", &routev3.HeaderMatcher{HeaderMatchSpecifier: &routev3.HeaderMatcher_ExactMatch{ExactMatch: "POST"}, InvertMatch: true}), nil, req(nil), true},
		{"range", hdr("x-n", &routev3.HeaderMatcher{HeaderMatchSpecifier: &routev3.HeaderMatcher_RangeMatch{RangeMatch: &typev3.Int64Range{Start: 10, End: 20}}}), nil, req(func(in *Input) { in.Header.Set("X-N", "19") }), true},
		{"regex is a full match", &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "/api"}}}}}}}, nil, req(nil), false},
		{"url_path ignores the query", &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: "/admin"}}}}}}, nil, req(nil), false},
		{":path keeps the query", hdr(":path", &routev3.HeaderMatcher{HeaderMatchSpecifier: &routev3.HeaderMatcher_SuffixMatch{SuffixMatch: "/admin"}}), nil, req(nil), true},
		{"uri_template *", uriTemplate("/api/*/items/{id}"), nil, req(nil), true},
		{"uri_template ** ", uriTemplate("/api/**"), nil, req(nil), true},
		{"uri_template miss", uriTemplate("/api/*/users/*"), nil, req(nil), false},
		{"destination_port_range", &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPortRange{DestinationPortRange: &typev3.Int32Range{Start: 80, End: 81}}}, nil, req(nil), true},
		{"destination_port_range end exclusive", &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPortRange{DestinationPortRange: &typev3.Int32Range{Start: 70, End: 80}}}, nil, req(nil), false},
		{"sni", &rbacv3.Permission{Rule: &rbacv3.Permission_RequestedServerName{RequestedServerName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "x.local"}}}}, nil, req(func(in *Input) { in.SNI = "x.local" }), true},
		{"direct_remote_ip", nil, &rbacv3.Principal{Identifier: &rbacv3.Principal_DirectRemoteIp{DirectRemoteIp: cidr("10.0.0.0", 24)}}, req(nil), true},
		{"remote_ip uses x-forwarded-for's", nil, &rbacv3.Principal{Identifier: &rbacv3.Principal_RemoteIp{RemoteIp: cidr("10.0.0.0", 24)}}, req(func(in *Input) { in.Remote = netip.MustParseAddr("192.0.2.1") }), false},
		{"source_ip v4-mapped", nil, &rbacv3.Principal{Identifier: &rbacv3.Principal_SourceIp{SourceIp: cidr("10.0.0.7", 32)}}, req(func(in *Input) { in.DirectRemote = netip.MustParseAddr("::ffff:10.0.0.7") }), true},
		{"authenticated without matcher needs TLS", nil, &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{}}}, req(nil), false},
		{"authenticated without matcher, TLS", nil, &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{}}}, req(func(in *Input) { in.Peer = &Peer{} }), true},
	}
	for _, tt := range tests {
		e, err := Compile(allowIf(tt.perm, tt.id), "rules")
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if _, got := e.Match(tt.in); got != tt.want {
			t.Errorf("%s: match = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestCompileErrors: what meshtun cannot evaluate is refused, naming the
// field.
func TestCompileErrors(t *testing.T) {
	tests := []struct {
		rbac *rbacv3.RBAC
		want string
	}{
		{allowIf(&rbacv3.Permission{Rule: &rbacv3.Permission_Metadata{Metadata: &matcherv3.MetadataMatcher{Filter: "envoy.filters.http.jwt_authn"}}}, nil),
			`rules.policies["p"].permissions[0].metadata (filter "envoy.filters.http.jwt_authn")`},
		{allowIf(nil, &rbacv3.Principal{Identifier: &rbacv3.Principal_FilterState{FilterState: &matcherv3.FilterStateMatcher{Key: "io.istio.peer_principal"}}}),
			`rules.policies["p"].principals[0].filter_state`},
		{allowIf(&rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "("}}}}}}}, nil),
			`rules.policies["p"].permissions[0].url_path.path.safe_regex.regex`},
		{allowIf(hdr(":status", &routev3.HeaderMatcher{}), nil), `permissions[0].header.name: pseudo-header ":status"`},
	}
	for _, tt := range tests {
		_, err := Compile(tt.rbac, "rules")
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("error %v, want it to contain %q", err, tt.want)
		}
	}
}

// fiftyPolicies is an HTTP filter as istiod generates it for 50 ALLOW
// policies (principal exact, namespace regex, methods, paths, port), of
// which only the last matches the benchmark's request.
func fiftyPolicies() *rbacv3.RBAC {
	r := &rbacv3.RBAC{Policies: map[string]*rbacv3.Policy{}}
	for i := range 50 {
		exact := func(s string) *matcherv3.StringMatcher {
			return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}}
		}
		perm := &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: []*rbacv3.Permission{
			{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: []*rbacv3.Permission{
				hdr(":method", sm(exact("GET"))), hdr(":method", sm(exact("POST")))}}}},
			{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: []*rbacv3.Permission{
				{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: fmt.Sprintf("/svc%d/", i)}}}}}}}}}},
			{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: []*rbacv3.Permission{{Rule: &rbacv3.Permission_DestinationPort{DestinationPort: 80}}}}}},
		}}}}
		id := &rbacv3.Principal{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: []*rbacv3.Principal{
			{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: []*rbacv3.Principal{
				{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: exact(fmt.Sprintf("spiffe://cluster.local/ns/ns%d/sa/client", i))}}},
				{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: fmt.Sprintf(".*/ns/team%d/.*", i)}}}}}},
			}}}},
		}}}}
		r.Policies[fmt.Sprintf("ns[foo]-policy[p%02d]-rule[0]", i)] = &rbacv3.Policy{Permissions: []*rbacv3.Permission{perm}, Principals: []*rbacv3.Principal{id}}
	}
	return r
}

func TestFiftyPolicies(t *testing.T) {
	f, err := NewFilter(fiftyPolicies(), nil, "http.x.rbac.", "")
	if err != nil {
		t.Fatal(err)
	}
	in := httpIn("GET", "svc", "/svc49/items?q=1", peer("spiffe://cluster.local/ns/ns49/sa/client"))
	if d := f.Evaluate(in); !d.Allowed || d.Policy != "ns[foo]-policy[p49]-rule[0]" {
		t.Fatalf("got %+v", d)
	}
	in.Peer = peer("spiffe://cluster.local/ns/ns48/sa/client")
	if d := f.Evaluate(in); d.Allowed {
		t.Fatalf("ns48 on /svc49: got %+v, want denied", d)
	}
	// Without -race only (raceEnabled says why): `make test` runs the
	// unit tests with it, and this package once more without.
	if n := testing.AllocsPerRun(100, func() { f.Evaluate(in) }); n != 0 && !raceEnabled {
		t.Fatalf("Evaluate allocates %v times per run", n)
	}
}

// BenchmarkEvaluate50: one request through a 50-policy HTTP filter,
// the matching policy last (the benchmark; 0 allocs/op).
func BenchmarkEvaluate50(b *testing.B) {
	f, err := NewFilter(fiftyPolicies(), nil, "http.x.rbac.", "")
	if err != nil {
		b.Fatal(err)
	}
	in := httpIn("GET", "svc", "/svc49/items?q=1", peer("spiffe://cluster.local/ns/ns49/sa/client"))
	b.ReportAllocs()
	for b.Loop() {
		if !f.Evaluate(in).Allowed {
			b.Fatal("denied")
		}
	}
}
