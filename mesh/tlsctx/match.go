package tlsctx

import (
	"crypto/x509"
	"fmt"
	"regexp"
	"strings"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

// stringMatcher is a compiled envoy.type.matcher.v3.StringMatcher.
type stringMatcher struct {
	kind       int // matchExact...
	s          string
	re         *regexp.Regexp
	ignoreCase bool
}

const (
	matchExact = iota
	matchPrefix
	matchSuffix
	matchContains
	matchRegex
)

func compileStringMatcher(field string, m *matcherv3.StringMatcher) (stringMatcher, error) {
	out := stringMatcher{ignoreCase: m.GetIgnoreCase()}
	switch p := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		out.kind, out.s = matchExact, p.Exact
	case *matcherv3.StringMatcher_Prefix:
		out.kind, out.s = matchPrefix, p.Prefix
	case *matcherv3.StringMatcher_Suffix:
		out.kind, out.s = matchSuffix, p.Suffix
	case *matcherv3.StringMatcher_Contains:
		out.kind, out.s = matchContains, p.Contains
	case *matcherv3.StringMatcher_SafeRegex:
		if out.ignoreCase {
			return out, fmt.Errorf("%s.ignore_case: has no effect on safe_regex (Envoy refuses it)", field)
		}
		// RE2 semantics, matched against the whole string as Envoy does.
		re, err := regexp.Compile(`^(?:` + p.SafeRegex.GetRegex() + `)$`)
		if err != nil {
			return out, fmt.Errorf("%s.safe_regex.regex: %w", field, err)
		}
		out.kind, out.re = matchRegex, re
		return out, nil
	case nil:
		return out, fmt.Errorf("%s: no match_pattern", field)
	default:
		return out, fmt.Errorf("%s: match_pattern %T not supported", field, p)
	}
	if out.s == "" && out.kind != matchExact {
		return out, fmt.Errorf("%s: empty pattern", field)
	}
	return out, nil
}

func (m *stringMatcher) match(v string) bool {
	s := m.s
	switch m.kind {
	case matchExact:
		if m.ignoreCase {
			return strings.EqualFold(v, s)
		}
		return v == s
	case matchPrefix:
		if m.ignoreCase {
			return len(v) >= len(s) && strings.EqualFold(v[:len(s)], s)
		}
		return strings.HasPrefix(v, s)
	case matchSuffix:
		if m.ignoreCase {
			return len(v) >= len(s) && strings.EqualFold(v[len(v)-len(s):], s)
		}
		return strings.HasSuffix(v, s)
	case matchContains:
		if m.ignoreCase {
			return containsFold(v, s)
		}
		return strings.Contains(v, s)
	case matchRegex:
		return m.re.MatchString(v)
	}
	return false
}

// containsFold is strings.Contains under ASCII/Unicode simple folding,
// without allocating a lowered copy.
func containsFold(v, s string) bool {
	for i := 0; i+len(s) <= len(v); i++ {
		if strings.EqualFold(v[i:i+len(s)], s) {
			return true
		}
	}
	return false
}

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
	m     stringMatcher
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
		sm, err := compileStringMatcher(f+".matcher", m.GetMatcher())
		if err != nil {
			return nil, err
		}
		out = append(out, sanMatcher{types: t, m: sm})
	}
	for i, m := range vc.GetMatchSubjectAltNames() {
		sm, err := compileStringMatcher(fmt.Sprintf("%s.match_subject_alt_names[%d]", field, i), m)
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
				if m.m.match(u.String()) {
					return true
				}
			}
		}
		if m.types&sanDNS != 0 {
			for _, d := range c.DNSNames {
				if m.m.match(d) || (m.m.kind == matchExact && dnsWildcardMatch(d, m.m.s)) {
					return true
				}
			}
		}
		if m.types&sanEmail != 0 {
			for _, e := range c.EmailAddresses {
				if m.m.match(e) {
					return true
				}
			}
		}
		if m.types&sanIP != 0 {
			for _, ip := range c.IPAddresses {
				if m.m.match(ip.String()) {
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
