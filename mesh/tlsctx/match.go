package tlsctx

import (
	"crypto/x509"
	"fmt"
	"strings"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/meshtun/meshtun/mesh/strmatch"
)

// SAN types a sanMatcher applies to (bits).
const (
	sanDNS = 1 << iota
	sanURI
	sanEmail
	sanIP
	sanAny = sanDNS | sanURI | sanEmail | sanIP
)

// sanMatcher is one entry of match_subject_alt_names (types sanAny: Envoy
// expands the deprecated field into one matcher per SAN type) or of
// match_typed_subject_alt_names (one type).
type sanMatcher struct {
	types int
	m     strmatch.Matcher
}

func compileSANs(field string, vc *tlsv3.CertificateValidationContext) ([]sanMatcher, error) {
	var out []sanMatcher
	for i, m := range vc.GetMatchTypedSubjectAltNames() {
		f := fmt.Sprintf("%s.match_typed_subject_alt_names[%d]", field, i)
		var t int
		switch m.GetSanType() {
		case tlsv3.SubjectAltNameMatcher_DNS:
			t = sanDNS
		case tlsv3.SubjectAltNameMatcher_URI:
			t = sanURI
		case tlsv3.SubjectAltNameMatcher_EMAIL:
			t = sanEmail
		case tlsv3.SubjectAltNameMatcher_IP_ADDRESS:
			t = sanIP
		default:
			return nil, fmt.Errorf("%s.san_type: %v not supported", f, m.GetSanType())
		}
		if m.GetMatcher() == nil {
			return nil, fmt.Errorf("%s.matcher: missing", f)
		}
		sm, err := strmatch.Compile(f+".matcher", m.GetMatcher())
		if err != nil {
			return nil, err
		}
		out = append(out, sanMatcher{types: t, m: sm})
	}
	for i, m := range vc.GetMatchSubjectAltNames() {
		sm, err := strmatch.Compile(fmt.Sprintf("%s.match_subject_alt_names[%d]", field, i), m)
		if err != nil {
			return nil, err
		}
		out = append(out, sanMatcher{types: sanAny, m: sm})
	}
	return out, nil
}

// matchSANs reports whether any SAN of c satisfies any matcher: Envoy's
// semantics, a single match anywhere passes.
func matchSANs(ms []sanMatcher, c *x509.Certificate) bool {
	for i := range ms {
		m := &ms[i]
		if m.types&sanURI != 0 {
			for _, u := range c.URIs {
				if m.m.Match(u.String()) {
					return true
				}
			}
		}
		if m.types&sanDNS != 0 {
			for _, d := range c.DNSNames {
				if m.m.Match(d) || dnsExactWildcard(&m.m, d) {
					return true
				}
			}
		}
		if m.types&sanEmail != 0 {
			for _, e := range c.EmailAddresses {
				if m.m.Match(e) {
					return true
				}
			}
		}
		if m.types&sanIP != 0 {
			for _, ip := range c.IPAddresses {
				if m.m.Match(ip.String()) {
					return true
				}
			}
		}
	}
	return false
}

// dnsWildcardMatch is Envoy's dnsNameMatch for an exact matcher against a
// wildcard DNS SAN: "*.example.com" covers exactly one leftmost label.
func dnsWildcardMatch(san, name string) bool {
	if !strings.HasPrefix(san, "*.") {
		return false
	}
	dot := strings.IndexByte(name, '.')
	return dot > 0 && strings.EqualFold(name[dot:], san[1:])
}

// sanList is the peer's SANs for an error message.
func sanList(c *x509.Certificate) string {
	var parts []string
	for _, u := range c.URIs {
		parts = append(parts, "URI:"+u.String())
	}
	for _, d := range c.DNSNames {
		parts = append(parts, "DNS:"+d)
	}
	for _, e := range c.EmailAddresses {
		parts = append(parts, "email:"+e)
	}
	for _, ip := range c.IPAddresses {
		parts = append(parts, "IP:"+ip.String())
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// dnsExactWildcard applies an exact matcher's value as a DNS name that
// may be a wildcard SAN's match, as Envoy's DNS SAN matching does.
func dnsExactWildcard(m *strmatch.Matcher, san string) bool {
	v, ok := m.Exact()
	return ok && dnsWildcardMatch(san, v)
}
