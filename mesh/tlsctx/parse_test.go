package tlsctx

import (
	"errors"
	"io/fs"
	"os"
	"slices"
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/testpki"
)

const fixtures = "../../../shared/istio/permissive-allow-any/"

// resources reads one of istiod's DiscoveryResponses as received.
func resources(t *testing.T, file string) []*anypb.Any {
	t.Helper()
	b, err := os.ReadFile(fixtures + file)
	if errors.Is(err, fs.ErrNotExist) {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s missing: CI must check out shared/ beside the repository", file)
		}
		t.Skipf("%s not present", file)
	}
	if err != nil {
		t.Fatal(err)
	}
	var dr discoveryv3.DiscoveryResponse
	if err := proto.Unmarshal(b, &dr); err != nil {
		t.Fatal(err)
	}
	return dr.GetResources()
}

// TestIstiodContextsParse: every TLS context in istiod's real clusters and
// listeners compiles, raw_buffer is plaintext, and the compiled contexts
// drop istio-peer-exchange.
func TestIstiodContextsParse(t *testing.T) {
	store := newStore(t)
	var ups, downs, raws int
	for _, a := range resources(t, "clusters.pb") {
		c := &clusterv3.Cluster{}
		if err := proto.Unmarshal(a.GetValue(), c); err != nil {
			t.Fatal(err)
		}
		sockets := map[string]*corev3.TransportSocket{"transport_socket": c.GetTransportSocket()}
		for i, m := range c.GetTransportSocketMatches() {
			sockets["transport_socket_matches["+string(rune('0'+i))+"] ("+m.GetName()+").transport_socket"] = m.GetTransportSocket()
		}
		for field, ts := range sockets {
			if ts == nil {
				continue
			}
			u, err := ParseUpstream("cluster "+c.GetName()+": "+field, ts, store, nil)
			switch {
			case err != nil:
				t.Errorf("%v", err)
			case u == nil:
				raws++
			default:
				ups++
				if got := u.cfgs[appTCP].NextProtos; !slices.Equal(got, []string{"istio"}) {
					t.Errorf("cluster %s: TCP offer %v, want [istio]", c.GetName(), got)
				}
				if u.cfgs[appTCP].ServerName == "" || u.cfgs[appTCP].GetClientCertificate == nil {
					t.Errorf("cluster %s: no SNI or client certificate", c.GetName())
				}
			}
		}
	}
	for _, a := range resources(t, "listeners.pb") {
		l := &listenerv3.Listener{}
		if err := proto.Unmarshal(a.GetValue(), l); err != nil {
			t.Fatal(err)
		}
		for i, fc := range l.GetFilterChains() {
			if fc.GetTransportSocket() == nil {
				continue
			}
			d, err := ParseDownstream("listener "+l.GetName()+": filter_chains["+string(rune('0'+i))+"]", fc.GetTransportSocket(), store, nil)
			switch {
			case err != nil:
				t.Errorf("%v", err)
			case d == nil:
				raws++
			default:
				downs++
				if slices.Contains(d.alpn, peerExchange) || len(d.alpn) != 2 {
					t.Errorf("listener %s chain %s: server ALPN %v, want h2 and http/1.1 only", l.GetName(), fc.GetName(), d.alpn)
				}
			}
		}
	}
	// The fixture: 5 tlsMode-istio cluster matches (their tlsMode-disabled
	// siblings are raw_buffer) and 3 inbound mTLS chains.
	if ups != 5 || downs != 3 || raws < 5 {
		t.Errorf("parsed %d upstream, %d downstream, %d raw_buffer contexts; want 5, 3, ≥5", ups, downs, raws)
	}
}

// TestParseErrors: what meshtun cannot honour is refused, naming the field.
func TestParseErrors(t *testing.T) {
	ca := testpki.NewCA(t)
	store := newStore(t)
	up := func(mod func(*tlsv3.UpstreamTlsContext)) *corev3.TransportSocket {
		uc := istioUp("sni", serverID)
		mod(uc)
		return testpki.Socket(uc)
	}
	down := func(mod func(*tlsv3.DownstreamTlsContext)) *corev3.TransportSocket {
		dc := istioDown("h2")
		mod(dc)
		return testpki.Socket(dc)
	}
	def := func(c *tlsv3.CommonTlsContext) *tlsv3.CertificateValidationContext {
		return c.GetCombinedValidationContext().GetDefaultValidationContext()
	}
	static := func(vc *tlsv3.CertificateValidationContext) *tlsv3.CommonTlsContext_ValidationContext {
		return &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: vc}
	}
	leaf := ca.Leaf(t, serverID, testpki.LeafOpts{})
	for _, tc := range []struct {
		name string
		ts   *corev3.TransportSocket
		down bool
		want string
	}{
		{"private key provider", up(func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.TlsCertificates = []*tlsv3.TlsCertificate{{PrivateKeyProvider: &tlsv3.PrivateKeyProvider{ProviderName: "cryptomb"}}}
			u.CommonTlsContext.TlsCertificateSdsSecretConfigs = nil
		}), false, "typed_config.common_tls_context.tls_certificates[0].private_key_provider: not supported"},
		{"certificate provider", up(func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.TlsCertificateProviderInstance = &tlsv3.CertificateProviderPluginInstance{InstanceName: "x"}
		}), false, "common_tls_context.tls_certificate_provider_instance: certificate providers are not supported"},
		{"custom validator", up(func(u *tlsv3.UpstreamTlsContext) {
			def(u.CommonTlsContext).CustomValidatorConfig = &corev3.TypedExtensionConfig{Name: "envoy.tls.cert_validator.spiffe"}
		}), false, "combined_validation_context.default_validation_context.custom_validator_config (envoy.tls.cert_validator.spiffe): custom certificate validators are not supported"},
		{"crl", up(func(u *tlsv3.UpstreamTlsContext) {
			def(u.CommonTlsContext).Crl = &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: "/crl.pem"}}
		}), false, "default_validation_context.crl: certificate revocation lists are not supported"},
		{"allow expired", up(func(u *tlsv3.UpstreamTlsContext) { def(u.CommonTlsContext).AllowExpiredCertificate = true }),
			false, "default_validation_context.allow_expired_certificate: not supported"},
		{"unknown cipher", up(func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.TlsParams.CipherSuites = []string{"ECDHE-ECDSA-AES128-GCM-SHA256", "PSK-AES128-CBC-SHA"}
		}), false, `tls_params.cipher_suites[1]: "PSK-AES128-CBC-SHA" is not a cipher suite meshtun supports`},
		{"TLS 1.3 cipher", up(func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.TlsParams.CipherSuites = []string{"TLS_AES_128_GCM_SHA256"}
		}),
			false, "TLS 1.3 suites are not configurable"},
		{"unknown curve", up(func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.TlsParams.EcdhCurves = []string{"brainpoolP256r1"}
		}),
			false, `tls_params.ecdh_curves[0]: "brainpoolP256r1" is not a curve`},
		{"versions inverted", up(func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.TlsParams.TlsMinimumProtocolVersion = tlsv3.TlsParameters_TLSv1_3
			u.CommonTlsContext.TlsParams.TlsMaximumProtocolVersion = tlsv3.TlsParameters_TLSv1_2
		}), false, "tls_params: tls_minimum_protocol_version TLSv1_3 is above tls_maximum_protocol_version TLSv1_2"},
		{"signature algorithms", up(func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.TlsParams.SignatureAlgorithms = []string{"ecdsa_secp256r1_sha256"}
		}),
			false, "tls_params.signature_algorithms: not supported"},
		{"regex ignore_case", up(func(u *tlsv3.UpstreamTlsContext) {
			def(u.CommonTlsContext).MatchSubjectAltNames = []*matcherv3.StringMatcher{{IgnoreCase: true,
				MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "a"}}}}
		}), false, "match_subject_alt_names[0].ignore_case: has no effect on safe_regex"},
		{"bad regex", up(func(u *tlsv3.UpstreamTlsContext) {
			def(u.CommonTlsContext).MatchSubjectAltNames = []*matcherv3.StringMatcher{{
				MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "(a"}}}}
		}), false, "match_subject_alt_names[0].safe_regex.regex: error parsing regexp"},
		{"empty prefix", up(func(u *tlsv3.UpstreamTlsContext) {
			def(u.CommonTlsContext).MatchSubjectAltNames = []*matcherv3.StringMatcher{testpki.Prefix("")}
		}),
			false, "match_subject_alt_names[0]: empty pattern"},
		{"other_name SAN", up(func(u *tlsv3.UpstreamTlsContext) {
			def(u.CommonTlsContext).MatchTypedSubjectAltNames = []*tlsv3.SubjectAltNameMatcher{{SanType: tlsv3.SubjectAltNameMatcher_OTHER_NAME, Matcher: testpki.Exact("x")}}
		}), false, "match_typed_subject_alt_names[0].san_type: OTHER_NAME not supported"},
		{"SAN without CA", up(func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.ValidationContextType = static(&tlsv3.CertificateValidationContext{MatchSubjectAltNames: []*matcherv3.StringMatcher{testpki.Exact(serverID)}})
		}), false, "common_tls_context.validation_context: subject-alt-name checks without a trusted CA are insecure"},
		{"bad pinned hash", up(func(u *tlsv3.UpstreamTlsContext) { def(u.CommonTlsContext).VerifyCertificateHash = []string{"zz"} }),
			false, "verify_certificate_hash[0]: want a hex SHA-256 digest"},
		{"missing trusted_ca file", up(func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.ValidationContextType = static(&tlsv3.CertificateValidationContext{
				TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: "/nonexistent/ca.pem"}}})
		}), false, "validation_context.trusted_ca.filename: open /nonexistent/ca.pem"},
		{"sds without config", up(func(u *tlsv3.UpstreamTlsContext) {
			u.CommonTlsContext.TlsCertificateSdsSecretConfigs[0].SdsConfig = nil
		}),
			false, "tls_certificate_sds_secret_configs[0] (default).sds_config: missing"},
		{"auto_host_sni", up(func(u *tlsv3.UpstreamTlsContext) { u.AutoHostSni = true }), false, "typed_config.auto_host_sni: not supported"},
		{"key_log", up(func(u *tlsv3.UpstreamTlsContext) { u.CommonTlsContext.KeyLog = &tlsv3.TlsKeyLog{Path: "/tmp/keys"} }),
			false, "common_tls_context.key_log: not supported"},
		{"key mismatch", up(func(u *tlsv3.UpstreamTlsContext) {
			other := ca.Leaf(t, clientID, testpki.LeafOpts{})
			u.CommonTlsContext.TlsCertificateSdsSecretConfigs = nil
			u.CommonTlsContext.TlsCertificates = []*tlsv3.TlsCertificate{{
				CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: leaf.ChainPEM}},
				PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: other.KeyPEM}}}}
		}), false, "tls_certificates[0]: tls: private key does not match public key"},
		{"other socket type", &corev3.TransportSocket{Name: "envoy.transport_sockets.internal_upstream",
			ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: testpki.Socket(&tlsv3.DownstreamTlsContext{}).GetTypedConfig()}},
			false, "typed_config: type type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext not supported here"},
		{"server without certificate", down(func(d *tlsv3.DownstreamTlsContext) { d.CommonTlsContext.TlsCertificateSdsSecretConfigs = nil }),
			true, "common_tls_context: a server needs tls_certificates or tls_certificate_sds_secret_configs"},
		{"session ticket keys", down(func(d *tlsv3.DownstreamTlsContext) {
			d.SessionTicketKeysType = &tlsv3.DownstreamTlsContext_SessionTicketKeys{SessionTicketKeys: &tlsv3.TlsSessionTicketKeys{}}
		}), true, "configured session ticket keys are not supported"},
		{"session timeout", down(func(d *tlsv3.DownstreamTlsContext) { d.SessionTimeout = durationpb.New(0) }), true, "typed_config.session_timeout: not supported"},
		{"ocsp must staple", down(func(d *tlsv3.DownstreamTlsContext) { d.OcspStaplePolicy = tlsv3.DownstreamTlsContext_MUST_STAPLE }),
			true, "typed_config.ocsp_staple_policy: MUST_STAPLE not supported"},
	} {
		var err error
		if tc.down {
			_, err = ParseDownstream("listener \"virtualInbound\": filter_chains[1]", tc.ts, store, nil)
		} else {
			_, err = ParseUpstream("cluster \"c\": transport_socket", tc.ts, store, nil)
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want it to contain %q", tc.name, err, tc.want)
			continue
		}
		if want := map[bool]string{false: `cluster "c": transport_socket`, true: `listener "virtualInbound": filter_chains[1]`}[tc.down]; !strings.HasPrefix(err.Error(), want) {
			t.Errorf("%s: err = %v, want it to start with the field %q", tc.name, err, want)
		}
	}

	// raw_buffer and no socket are plaintext.
	raw := &corev3.TransportSocket{Name: "envoy.transport_sockets.raw_buffer"}
	if u, err := ParseUpstream("f", raw, store, nil); u != nil || err != nil {
		t.Errorf("raw_buffer upstream = %v, %v", u, err)
	}
	if d, err := ParseDownstream("f", nil, store, nil); d != nil || err != nil {
		t.Errorf("nil downstream = %v, %v", d, err)
	}
}
