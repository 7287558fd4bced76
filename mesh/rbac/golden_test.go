package rbac

import (
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"sigs.k8s.io/yaml"
)

// loadGolden reads one of Istio's builder golden files (testdata/istio,
// copied from istio/istio) and compiles the filter it holds, as the
// mesh does with a filter from LDS.
func loadGolden(t *testing.T, name string) (*Filter, error) {
	t.Helper()
	dir := "istio"
	if strings.HasPrefix(name, "constructed/") {
		dir = "" // testdata/constructed: see its README
	}
	y, err := os.ReadFile(filepath.Join("testdata", dir, name))
	if err != nil {
		t.Fatal(err)
	}
	js, err := yaml.YAMLToJSON(y)
	if err != nil {
		t.Fatal(err)
	}
	var f listenerv3.Filter // name + typed_config, as the HTTP filter's shape too
	if err := protojson.Unmarshal(js, &f); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	switch f.GetTypedConfig().GetTypeUrl() {
	case NetworkTypeURL:
		var pb netrbacv3.RBAC
		if err := f.GetTypedConfig().UnmarshalTo(&pb); err != nil {
			t.Fatal(err)
		}
		return FromNetwork(&pb)
	case HTTPTypeURL:
		var pb httprbacv3.RBAC
		if err := f.GetTypedConfig().UnmarshalTo(&pb); err != nil {
			t.Fatal(err)
		}
		return FromHTTP(&pb, "inbound_0.0.0.0_80")
	}
	t.Fatalf("%s: unexpected type %s", name, f.GetTypedConfig().GetTypeUrl())
	return nil, nil
}

func peer(uri string) *Peer { return &Peer{URISANs: []string{uri}} }

func tcpIn(port uint16, p *Peer) *Input {
	src := netip.MustParseAddr("10.0.0.7")
	return &Input{DirectRemote: src, Remote: src, Local: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.9"), port), Peer: p}
}

func httpIn(method, host, path string, p *Peer) *Input {
	in := tcpIn(80, p)
	in.Method, in.Authority, in.Path, in.Scheme = method, host, path, "http"
	in.Header = http.Header{}
	return in
}

type goldenCase struct {
	name    string
	in      *Input
	allowed bool
	logged  bool
	policy  string
}

func TestIstioGolden(t *testing.T) {
	ns1 := peer("spiffe://cluster.local/ns/ns-1/sa/sleep")
	ns2 := peer("spiffe://cluster.local/ns/ns-2/sa/sleep")
	tests := []struct {
		file  string
		cases []goldenCase
	}{
		{"tcp/allow-both-http-tcp-out.yaml", []goldenCase{ // namespace regex, port
			{"ns-1 on 80", tcpIn(80, ns1), true, false, "ns[foo]-policy[httpbin-deny]-rule[3]"},
			{"ns-2 on 80", tcpIn(80, ns2), false, false, ""},
			{"ns-1 on 81", tcpIn(81, ns1), false, false, ""},
			{"no TLS", tcpIn(80, nil), false, false, ""},
			{"DNS SAN only", tcpIn(80, &Peer{DNSSANs: []string{"x/ns/ns-1/y"}}), true, false, "ns[foo]-policy[httpbin-deny]-rule[3]"},
			{"subject only", tcpIn(80, &Peer{Subject: "CN=a/ns/ns-1/b"}), true, false, "ns[foo]-policy[httpbin-deny]-rule[3]"},
		}},
		{"tcp/allow-only-http-out.yaml", []goldenCase{ // ALLOW with rules: {} denies all
			{"anything", tcpIn(80, ns1), false, false, ""},
		}},
		{"tcp/dry-run-mix-out.yaml", []goldenCase{
			{"enforced port", tcpIn(9000, nil), true, false, "ns[foo]-policy[httpbin-2]-rule[0]"},
			{"shadow-only port", tcpIn(80, nil), false, false, ""},
		}},
		{"http/allow-empty-rule-out.yaml", []goldenCase{
			{"any request", httpIn("GET", "a", "/", nil), true, false, "ns[foo]-policy[allow-all]-rule[0]"},
		}},
		{"http/allow-nil-rule-out.yaml", []goldenCase{
			{"any request", httpIn("GET", "a", "/", ns1), false, false, ""},
		}},
		{"http/deny-empty-rule-out.yaml", []goldenCase{
			{"any request", httpIn("GET", "a", "/", ns1), false, false, "ns[foo]-policy[deny-all]-rule[0]"},
		}},
		{"http/deny-and-allow-out1.yaml", []goldenCase{ // DENY principal exact
			{"deny principal", httpIn("GET", "a", "/", peer("spiffe://deny")), false, false, "ns[foo]-policy[httpbin-deny]-rule[0]"},
			{"other principal", httpIn("GET", "a", "/", peer("spiffe://allow")), true, false, ""},
			{"no TLS", httpIn("GET", "a", "/", nil), true, false, ""},
		}},
		{"http/deny-and-allow-out2.yaml", []goldenCase{
			{"allow principal", httpIn("GET", "a", "/", peer("spiffe://allow")), true, false, "ns[foo]-policy[httpbin-allow]-rule[0]"},
			{"exact is not prefix", httpIn("GET", "a", "/", peer("spiffe://allowed")), false, false, ""},
		}},
		{"http/audit-full-rule-out.yaml", []goldenCase{ // LOG
			{"logged, allowed", httpIn("GET", "a", "/", nil), true, true, "ns[foo]-policy[audit-all]-rule[0]"},
		}},
		{"http/simple-policy-principal-with-wildcard-out.yaml", []goldenCase{ // "*" is .+
			{"any principal", httpIn("GET", "a", "/", peer("spiffe://x/ns/y/sa/z")), true, false, "ns[foo]-policy[httpbin]-rule[0]"},
			{"no TLS", httpIn("GET", "a", "/", nil), false, false, ""},
		}},
		{"http/trust-domains-out.yaml", []goldenCase{ // prefix, not_id
			{"trusted domain", httpIn("GET", "a", "/", peer("spiffe://cluster.local/ns/a/sa/b")), true, false, "ns[foo]-policy[httpbin]-rule[0]"},
			{"untrusted domain", httpIn("GET", "a", "/", peer("spiffe://untrusted/ns/a/sa/b")), false, false, ""},
			{"bad* domain", httpIn("GET", "a", "/", peer("spiffe://badness/ns/a")), false, false, ""},
		}},
		{"http/allow-host-before-111-out.yaml", []goldenCase{ // present and not present: never
			{"host", httpIn("GET", "example.com", "/", nil), false, false, ""},
		}},
		{"http/td-aliases-source-principal-out.yaml", []goldenCase{ // namespace regex and "*"
			{"istio-system", httpIn("GET", "a", "/", peer("spiffe://cluster.local/ns/istio-system/sa/gw")), true, false, "ns[foo]-policy[httpbin]-rule[0]"},
			{"other namespace", httpIn("GET", "a", "/", peer("spiffe://cluster.local/ns/foo/sa/gw")), false, false, ""},
		}},
		{"constructed/allow-sources-ops-out.yaml", constructedCases()},
		{"http/allow-path-out.yaml", []goldenCase{ // url_path, uri_template, not_rule
			{"path regex .+ and not .+", httpIn("GET", "a", "/exact", nil), false, false, ""},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			f, err := loadGolden(t, tt.file)
			if err != nil {
				t.Fatalf("compile: %v", err)
			}
			for _, c := range tt.cases {
				d := f.Evaluate(c.in)
				if d.Allowed != c.allowed || d.Logged != c.logged || d.Policy != c.policy {
					t.Errorf("%s: got %+v, want allowed=%v logged=%v policy=%q", c.name, d, c.allowed, c.logged, c.policy)
				}
			}
		})
	}
}

// TestIstioGoldenStats checks the counters a dry-run filter keeps: the
// shadow rules decide nothing, they are counted under their prefix.
func TestIstioGoldenStats(t *testing.T) {
	f, err := loadGolden(t, "tcp/dry-run-mix-out.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f.Evaluate(tcpIn(9000, nil)) // enforced allow, shadow deny
	f.Evaluate(tcpIn(80, nil))   // enforced deny, shadow allow
	f.Evaluate(tcpIn(80, nil))
	got := map[string]uint64{}
	for _, s := range append(f.Stats.List(), f.ShadowStats.List()...) {
		got[s.Name] = s.Value
	}
	want := map[string]uint64{
		"tcp.rbac.allowed": 1, "tcp.rbac.denied": 2,
		"tcp.rbac.istio_dry_run_allow_shadow_allowed": 2, "tcp.rbac.istio_dry_run_allow_shadow_denied": 1,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %d, want %d (all: %v)", k, got[k], v, got)
		}
	}
}

// TestIstioGoldenNACK: the golden files with requestPrincipals (JWT
// metadata) or other dynamic metadata must not compile, and the error
// names the field.
func TestIstioGoldenNACK(t *testing.T) {
	for _, file := range []string{
		"http/single-policy-out.yaml",
		"http/allow-full-rule-out.yaml",
		"http/multiple-policies-out.yaml",
		"tcp/deny-both-http-tcp-out.yaml",
		"tcp/audit-both-http-tcp-out.yaml",
	} {
		_, err := loadGolden(t, file)
		if err == nil {
			t.Errorf("%s: compiled; want an error for metadata", file)
			continue
		}
		if !strings.Contains(err.Error(), ".metadata (filter ") || !strings.Contains(err.Error(), "policies[") {
			t.Errorf("%s: error %q does not name the metadata field and policy", file, err)
		}
	}
}

// constructedCases exercise testdata/constructed/allow-sources-ops-out.yaml:
// each case changes one fact of a request the policy allows.
func constructedCases() []goldenCase {
	const pol = "ns[foo]-policy[constructed]-rule[0]"
	ok := func(mod func(*Input)) *Input {
		in := httpIn("GET", "web.foo.svc", "/api/items?x=1", peer("spiffe://cluster.local/ns/foo/sa/sleep"))
		in.Local = netip.MustParseAddrPort("10.0.1.5:8080")
		in.DirectRemote = netip.MustParseAddr("10.0.3.4")
		in.Remote = netip.MustParseAddr("192.0.2.77")
		if mod != nil {
			mod(in)
		}
		return in
	}
	return []goldenCase{
		{"all facts allowed", ok(nil), true, false, pol},
		{"host ignore_case", ok(func(in *Input) { in.Authority = "WEB.Foo.SVC" }), true, false, pol},
		{"service account under a sub-path", ok(func(in *Input) { in.Peer = peer("spiffe://td/ns/foo/x/sa/sleep") }), true, false, pol},
		{"other service account", ok(func(in *Input) { in.Peer = peer("spiffe://cluster.local/ns/foo/sa/sleeper") }), false, false, ""},
		{"other namespace", ok(func(in *Input) { in.Peer = peer("spiffe://cluster.local/ns/bar/sa/sleep") }), false, false, ""},
		{"method", ok(func(in *Input) { in.Method = "POST" }), false, false, ""},
		{"host", ok(func(in *Input) { in.Authority = "web.bar.svc" }), false, false, ""},
		{"notPaths", ok(func(in *Input) { in.Path = "/api/admin/users" }), false, false, ""},
		{"paths", ok(func(in *Input) { in.Path = "/other" }), false, false, ""},
		{"ports", ok(func(in *Input) { in.Local = netip.MustParseAddrPort("10.0.1.5:9090") }), false, false, ""},
		{"ipBlocks", ok(func(in *Input) { in.DirectRemote = netip.MustParseAddr("10.1.0.1") }), false, false, ""},
		{"notIpBlocks", ok(func(in *Input) { in.DirectRemote = netip.MustParseAddr("10.0.9.1") }), false, false, ""},
		{"remoteIpBlocks", ok(func(in *Input) { in.Remote = netip.MustParseAddr("198.51.100.1") }), false, false, ""},
		{"no TLS", ok(func(in *Input) { in.Peer = nil }), false, false, ""},
	}
}
