package rbac

import (
	"fmt"
	"net/netip"
	"net/textproto"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

	"github.com/meshtun/meshtun/mesh/strmatch"
)

// headerMatch is a compiled route.v3.HeaderMatcher as RBAC uses it.
type headerMatch struct {
	name          string // canonical key, or a pseudo-header (":path")
	kind          uint8  // hmString, hmPresent, hmRange
	str           strmatch.Matcher
	present       bool
	lo, hi        int64 // range [lo, hi)
	invert        bool
	missingAsNone bool // treat_missing_header_as_empty
}

const (
	hmString = iota
	hmPresent
	hmRange
)

func compileHeader(h *routev3.HeaderMatcher, field string) (headerMatch, error) {
	hm := headerMatch{invert: h.GetInvertMatch(), missingAsNone: h.GetTreatMissingHeaderAsEmpty()}
	name := h.GetName()
	if name == "" {
		return hm, fmt.Errorf("%s.name: empty", field)
	}
	if strings.HasPrefix(name, ":") {
		switch strings.ToLower(name) {
		case ":method", ":authority", ":path", ":scheme":
			hm.name = strings.ToLower(name)
		default:
			return hm, fmt.Errorf("%s.name: pseudo-header %q is not supported (want :method, :authority, :path or :scheme)", field, name)
		}
	} else {
		hm.name = textproto.CanonicalMIMEHeaderKey(name)
		if strings.EqualFold(name, "host") {
			hm.name = ":authority" // Envoy's host header is :authority
		}
	}
	var err error
	switch s := h.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_ExactMatch:
		hm.str = strmatch.Exactly(s.ExactMatch)
	case *routev3.HeaderMatcher_PrefixMatch:
		hm.str = strmatch.Prefix(s.PrefixMatch)
	case *routev3.HeaderMatcher_SuffixMatch:
		hm.str = strmatch.Suffix(s.SuffixMatch)
	case *routev3.HeaderMatcher_ContainsMatch:
		hm.str = strmatch.Contains(s.ContainsMatch)
	case *routev3.HeaderMatcher_SafeRegexMatch:
		re, err := strmatch.CompileRegex(field+".safe_regex_match", s.SafeRegexMatch)
		if err != nil {
			return hm, err
		}
		hm.str = strmatch.Regex(re)
	case *routev3.HeaderMatcher_StringMatch:
		hm.str, err = strmatch.Compile(field+".string_match", s.StringMatch)
	case *routev3.HeaderMatcher_PresentMatch:
		hm.kind, hm.present = hmPresent, s.PresentMatch
	case *routev3.HeaderMatcher_RangeMatch:
		hm.kind, hm.lo, hm.hi = hmRange, s.RangeMatch.GetStart(), s.RangeMatch.GetEnd()
	case nil:
		// No specifier: the header's presence, as Envoy.
		hm.kind, hm.present = hmPresent, true
	default:
		return hm, fmt.Errorf("%s: unsupported header_match_specifier %T", field, s)
	}
	return hm, err
}

// match evaluates the matcher on the request's headers. A header with
// several values is matched on the values joined by ",", as Envoy; only
// that rare case allocates.
func (m *headerMatch) match(in *Input) bool {
	v, ok := in.header(m.name)
	if !ok && m.missingAsNone {
		v, ok = "", true
	}
	if m.kind == hmPresent {
		return (ok == m.present) != m.invert
	}
	if !ok {
		// A missing header matches only an inverted value matcher.
		return m.invert
	}
	var r bool
	switch m.kind {
	case hmString:
		r = m.str.Match(v)
	case hmRange:
		n, err := parseInt(v)
		r = err == nil && n >= m.lo && n < m.hi
	}
	return r != m.invert
}

func parseInt(s string) (int64, error) {
	var n int64
	if s == "" {
		return 0, errNotInt
	}
	neg := s[0] == '-'
	if neg {
		s = s[1:]
		if s == "" {
			return 0, errNotInt
		}
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' || n > (1<<62)/10 {
			return 0, errNotInt
		}
		n = n*10 + int64(c-'0')
	}
	if neg {
		n = -n
	}
	return n, nil
}

var errNotInt = fmt.Errorf("not an integer")

// header returns a header's value: pseudo-headers from the request line,
// others from Header (values joined by ",").
func (in *Input) header(name string) (string, bool) {
	switch name {
	case ":method":
		return in.Method, in.Method != ""
	case ":authority":
		return in.Authority, in.Authority != ""
	case ":path":
		return in.Path, in.Path != ""
	case ":scheme":
		return in.Scheme, in.Scheme != ""
	}
	vs, ok := in.Header[name]
	switch {
	case !ok || len(vs) == 0:
		return "", false
	case len(vs) == 1:
		return vs[0], true
	}
	return strings.Join(vs, ","), true
}

func compileCIDR(c *corev3.CidrRange, field string) (netip.Prefix, error) {
	a, err := netip.ParseAddr(c.GetAddressPrefix())
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%s.address_prefix: %w", field, err)
	}
	// An absent prefix_len is 0, as in Envoy: the range holds every
	// address of the family.
	bits := int(c.GetPrefixLen().GetValue())
	p, err := a.Unmap().Prefix(bits)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%s.prefix_len: %w", field, err)
	}
	return p, nil
}

// pathOnly is :path without its query and fragment, what url_path and
// uri_template match.
func pathOnly(p string) string {
	if i := strings.IndexAny(p, "?#"); i >= 0 {
		return p[:i]
	}
	return p
}
