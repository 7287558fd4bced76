package tlsctx

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/mesh/strmatch"
)

func regex(r string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: r}}}
}

// TestStringMatcher: Envoy's StringMatcher, regex anchored on both ends.
func TestStringMatcher(t *testing.T) {
	ic := func(m *matcherv3.StringMatcher) *matcherv3.StringMatcher { m.IgnoreCase = true; return m }
	for _, tc := range []struct {
		m    *matcherv3.StringMatcher
		v    string
		want bool
	}{
		{testpki.Exact("spiffe://a/ns/b"), "spiffe://a/ns/b", true},
		{testpki.Exact("spiffe://a/ns/b"), "spiffe://a/ns/bb", false},
		{ic(testpki.Exact("SPIFFE://A")), "spiffe://a", true},
		{testpki.Prefix("spiffe://cluster.local/"), "spiffe://cluster.local/ns/x", true},
		{testpki.Prefix("spiffe://cluster.local/"), "spiffe://cluster.localx/ns", false},
		{ic(testpki.Prefix("SPIFFE://")), "spiffe://x", true},
		{ic(testpki.Prefix("SPIFFE://long")), "spi", false},
		{&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: "/sa/b"}}, "spiffe://a/ns/x/sa/b", true},
		{ic(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: "/SA/B"}}), "spiffe://a/ns/x/sa/b", true},
		{&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Contains{Contains: "/ns/x/"}}, "spiffe://a/ns/x/sa/b", true},
		{ic(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Contains{Contains: "/NS/X/"}}), "spiffe://a/ns/x/sa/b", true},
		{&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Contains{Contains: "/ns/y/"}}, "spiffe://a/ns/x/sa/b", false},
		{regex(".*/ns/x/.*"), "spiffe://a/ns/x/sa/b", true},
		{regex("ns/x"), "spiffe://a/ns/x/sa/b", false}, // full match, not search
		{regex("a|spiffe://.*"), "spiffe://q", true},   // the alternation is anchored as a whole
	} {
		m, err := strmatch.Compile("m", tc.m)
		if err != nil {
			t.Fatal(err)
		}
		if got := m.Match(tc.v); got != tc.want {
			t.Errorf("%v on %q = %v, want %v", tc.m, tc.v, got, tc.want)
		}
	}
}

// TestSANMatching: match_subject_alt_names tries every SAN type;
// match_typed_subject_alt_names only its own; DNS exact honours a
// wildcard SAN for one label.
func TestSANMatching(t *testing.T) {
	ca := testpki.NewCA(t)
	cert := ca.Leaf(t, "spiffe://td/ns/a/sa/b", testpki.LeafOpts{DNS: []string{"*.svc.example", "api.example"},
		Email: []string{"ops@example"}, IPs: []string{"10.0.0.7"}}).Cert
	any := func(m *matcherv3.StringMatcher) *tlsv3.CertificateValidationContext {
		return &tlsv3.CertificateValidationContext{MatchSubjectAltNames: []*matcherv3.StringMatcher{m}}
	}
	typed := func(ty tlsv3.SubjectAltNameMatcher_SanType, m *matcherv3.StringMatcher) *tlsv3.CertificateValidationContext {
		return &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{SanType: ty, Matcher: m}}}
	}
	for _, tc := range []struct {
		name string
		vc   *tlsv3.CertificateValidationContext
		want bool
	}{
		{"uri exact", any(testpki.Exact("spiffe://td/ns/a/sa/b")), true},
		{"dns via any", any(testpki.Exact("api.example")), true},
		{"email via any", any(testpki.Exact("ops@example")), true},
		{"ip via any", any(testpki.Exact("10.0.0.7")), true},
		{"dns wildcard", any(testpki.Exact("web.svc.example")), true},
		{"dns wildcard one label only", any(testpki.Exact("a.web.svc.example")), false},
		{"nothing", any(testpki.Exact("spiffe://td/ns/a/sa/c")), false},
		{"typed uri", typed(tlsv3.SubjectAltNameMatcher_URI, testpki.Prefix("spiffe://td/")), true},
		{"typed dns does not see uri", typed(tlsv3.SubjectAltNameMatcher_DNS, testpki.Prefix("spiffe://td/")), false},
		{"typed ip", typed(tlsv3.SubjectAltNameMatcher_IP_ADDRESS, testpki.Exact("10.0.0.7")), true},
		{"typed email", typed(tlsv3.SubjectAltNameMatcher_EMAIL, testpki.Exact("ops@example")), true},
		{"typed uri does not see email", typed(tlsv3.SubjectAltNameMatcher_URI, testpki.Exact("ops@example")), false},
	} {
		ms, err := compileSANs("v", tc.vc)
		if err != nil {
			t.Fatal(err)
		}
		if got := matchSANs(ms, cert); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestCombinedValidationMerge: the SDS context's trusted_ca replaces the
// default's and its SAN matchers are added to the default's, as Envoy's
// MergeFrom does; the merge follows a new version of the secret.
func TestCombinedValidationMerge(t *testing.T) {
	ca, wrong := testpki.NewCA(t), testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	uc := istioUp("sni", "spiffe://cluster.local/ns/default/sa/someone-else")
	def := uc.CommonTlsContext.GetCombinedValidationContext().GetDefaultValidationContext()
	def.TrustedCa = &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: wrong.CertPEM}}
	var st Stats
	u := mustUp(t, cl.store, uc, &st)
	d := mustDown(t, sv.store, istioDown(), nil)

	// ROOTCA (the right CA) wins over the default's trusted_ca; the SAN
	// matchers are the default's alone, which the server does not match.
	if r := handshake(t, u, "", d); r.clientErr == nil || !strings.HasPrefix(reason(t, r.clientErr), "verify SAN") {
		t.Fatalf("default SANs only: %v", r.clientErr)
	}
	// A ROOTCA version that also names the server adds to the default's.
	root := ca.RootSecret("ROOTCA")
	root.GetValidationContext().MatchSubjectAltNames = []*matcherv3.StringMatcher{testpki.Exact(serverID)}
	put(t, cl.store, root)
	if r := handshake(t, u, "", d); r.clientErr != nil {
		t.Fatalf("merged SANs: %v", r.clientErr)
	}
	wantStats(t, "client", &st, map[string]uint64{"fail_verify_san": 1, "handshake": 1})
}

// TestPinnedHashes: verify_certificate_hash and _spki accept only the
// pinned certificate, counted as fail_verify_cert_hash otherwise.
func TestPinnedHashes(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	d := mustDown(t, sv.store, istioDown(), nil)
	h := sha256.Sum256(sv.leaf.Cert.Raw)
	good := strings.ToUpper(hex.EncodeToString(h[:2])) + ":" + hex.EncodeToString(h[2:])
	for _, tc := range []struct {
		pin  string
		want bool
	}{{good, true}, {strings.Repeat("00", 32), false}} {
		uc := istioUp("sni", serverID)
		uc.CommonTlsContext.GetCombinedValidationContext().GetDefaultValidationContext().VerifyCertificateHash = []string{tc.pin}
		var st Stats
		r := handshake(t, mustUp(t, cl.store, uc, &st), "", d)
		if (r.clientErr == nil) != tc.want {
			t.Errorf("pin %s: err %v, want success %v", tc.pin, r.clientErr, tc.want)
		}
		if !tc.want {
			wantStats(t, "client", &st, map[string]uint64{"fail_verify_cert_hash": 1})
		}
	}
}
