package tlsctx

import (
	"crypto/tls"
	"fmt"
	"strings"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// suites maps BoringSSL's cipher names (what tls_params.cipher_suites and
// Envoy's ciphers.<name> counters use) to Go's TLS 1.0–1.2 suite IDs.
var suites = [...]struct {
	name string
	id   uint16
}{
	{"ECDHE-ECDSA-AES128-GCM-SHA256", tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256},
	{"ECDHE-RSA-AES128-GCM-SHA256", tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256},
	{"ECDHE-ECDSA-AES256-GCM-SHA384", tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384},
	{"ECDHE-RSA-AES256-GCM-SHA384", tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384},
	{"ECDHE-ECDSA-CHACHA20-POLY1305", tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256},
	{"ECDHE-RSA-CHACHA20-POLY1305", tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256},
	{"ECDHE-ECDSA-AES128-SHA", tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA},
	{"ECDHE-RSA-AES128-SHA", tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA},
	{"ECDHE-ECDSA-AES256-SHA", tls.TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA},
	{"ECDHE-RSA-AES256-SHA", tls.TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA},
	{"ECDHE-ECDSA-AES128-SHA256", tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256},
	{"ECDHE-RSA-AES128-SHA256", tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256},
	{"AES128-GCM-SHA256", tls.TLS_RSA_WITH_AES_128_GCM_SHA256},
	{"AES256-GCM-SHA384", tls.TLS_RSA_WITH_AES_256_GCM_SHA384},
	{"AES128-SHA", tls.TLS_RSA_WITH_AES_128_CBC_SHA},
	{"AES256-SHA", tls.TLS_RSA_WITH_AES_256_CBC_SHA},
	{"AES128-SHA256", tls.TLS_RSA_WITH_AES_128_CBC_SHA256},
	{"DES-CBC3-SHA", tls.TLS_RSA_WITH_3DES_EDE_CBC_SHA},
	{"ECDHE-RSA-DES-CBC3-SHA", tls.TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA},
	// TLS 1.3 suites: counted, not configurable (neither BoringSSL nor Go
	// lets a context pick them).
	{"TLS_AES_128_GCM_SHA256", tls.TLS_AES_128_GCM_SHA256},
	{"TLS_AES_256_GCM_SHA384", tls.TLS_AES_256_GCM_SHA384},
	{"TLS_CHACHA20_POLY1305_SHA256", tls.TLS_CHACHA20_POLY1305_SHA256},
}

// cipherStatNames are the suites' names by index, for the counters.
var cipherStatNames = func() (n [len(suites)]string) {
	for i, s := range suites {
		n[i] = s.name
	}
	return n
}()

func cipherIndex(id uint16) int {
	for i := range suites {
		if suites[i].id == id {
			return i
		}
	}
	return -1
}

func isTLS13Suite(id uint16) bool {
	return id == tls.TLS_AES_128_GCM_SHA256 || id == tls.TLS_AES_256_GCM_SHA384 || id == tls.TLS_CHACHA20_POLY1305_SHA256
}

// curves maps BoringSSL's group names (ecdh_curves) to Go's.
var curveByName = map[string]tls.CurveID{
	"X25519": tls.X25519, "P-256": tls.CurveP256, "prime256v1": tls.CurveP256, "secp256r1": tls.CurveP256,
	"P-384": tls.CurveP384, "secp384r1": tls.CurveP384, "P-521": tls.CurveP521, "secp521r1": tls.CurveP521,
	"X25519MLKEM768": tls.X25519MLKEM768,
}

var versionOf = map[tlsv3.TlsParameters_TlsProtocol]uint16{
	tlsv3.TlsParameters_TLSv1_0: tls.VersionTLS10, tlsv3.TlsParameters_TLSv1_1: tls.VersionTLS11,
	tlsv3.TlsParameters_TLSv1_2: tls.VersionTLS12, tlsv3.TlsParameters_TLSv1_3: tls.VersionTLS13,
}

// params are the compiled tls_params.
type params struct {
	min, max uint16
	ciphers  []uint16
	curves   []tls.CurveID
}

// parseParams compiles tls_params. Envoy's defaults: TLS 1.2 minimum, and
// maximum TLS 1.2 for clients, TLS 1.3 for servers; the library's ciphers
// and curves.
func parseParams(field string, p *tlsv3.TlsParameters, server bool) (params, error) {
	out := params{min: tls.VersionTLS12, max: tls.VersionTLS12}
	if server {
		out.max = tls.VersionTLS13
	}
	if p == nil {
		return out, nil
	}
	if v := p.GetTlsMinimumProtocolVersion(); v != tlsv3.TlsParameters_TLS_AUTO {
		g, ok := versionOf[v]
		if !ok {
			return out, fmt.Errorf("%s.tls_minimum_protocol_version: %v unknown", field, v)
		}
		out.min = g
	}
	if v := p.GetTlsMaximumProtocolVersion(); v != tlsv3.TlsParameters_TLS_AUTO {
		g, ok := versionOf[v]
		if !ok {
			return out, fmt.Errorf("%s.tls_maximum_protocol_version: %v unknown", field, v)
		}
		out.max = g
	}
	if out.min > out.max {
		return out, fmt.Errorf("%s: tls_minimum_protocol_version %v is above tls_maximum_protocol_version %v",
			field, p.GetTlsMinimumProtocolVersion(), p.GetTlsMaximumProtocolVersion())
	}
	for i, c := range p.GetCipherSuites() {
		// "[A|B]" is BoringSSL's equal-preference group; Go orders suites
		// itself, so a group is just its members.
		for _, name := range strings.Split(strings.Trim(c, "[]"), "|") {
			idx := -1
			for j := range suites {
				if suites[j].name == name {
					idx = j
				}
			}
			switch {
			case idx < 0:
				return out, fmt.Errorf("%s.cipher_suites[%d]: %q is not a cipher suite meshtun supports", field, i, name)
			case isTLS13Suite(suites[idx].id):
				return out, fmt.Errorf("%s.cipher_suites[%d]: %q: TLS 1.3 suites are not configurable", field, i, name)
			}
			out.ciphers = append(out.ciphers, suites[idx].id)
		}
	}
	for i, c := range p.GetEcdhCurves() {
		id, ok := curveByName[c]
		if !ok {
			return out, fmt.Errorf("%s.ecdh_curves[%d]: %q is not a curve meshtun supports", field, i, c)
		}
		out.curves = append(out.curves, id)
	}
	if len(p.GetSignatureAlgorithms()) > 0 {
		return out, fmt.Errorf("%s.signature_algorithms: not supported (Go's crypto/tls does not restrict them)", field)
	}
	if len(p.GetCompliancePolicies()) > 0 {
		return out, fmt.Errorf("%s.compliance_policies: not supported", field)
	}
	return out, nil
}

func (p params) apply(c *tls.Config) {
	c.MinVersion, c.MaxVersion = p.min, p.max
	c.CipherSuites = p.ciphers
	c.CurvePreferences = p.curves
}
