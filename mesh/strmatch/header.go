package strmatch

import (
	"fmt"
	"net/textproto"
	"strconv"
	"strings"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

// Header is a compiled envoy.config.route.v3.HeaderMatcher, as routes,
// the fault filter's header conditions and RBAC use it. Name is the
// header to look up: a canonical MIME key, or one of the pseudo-headers
// ":authority" (also for "host"), ":path", ":method", ":scheme". Callers
// find the value (the values of a repeated header joined by ",", as
// Envoy) and call Match.
type Header struct {
	Name    string
	kind    uint8 // hdrString, hdrPresent, hdrRange
	str     Matcher
	present bool
	lo, hi  int64 // range_match [lo, hi)
	invert  bool
	missing bool // treat_missing_header_as_empty
}

const (
	hdrString = iota
	hdrPresent
	hdrRange
)

// CompileHeader compiles h; errors are *Error naming field and the
// sub-field.
func CompileHeader(field string, h *routev3.HeaderMatcher) (Header, error) {
	name := strings.ToLower(h.GetName())
	m := Header{invert: h.GetInvertMatch(), missing: h.GetTreatMissingHeaderAsEmpty()}
	switch {
	case name == "":
		return m, errAt(field+".name", "empty")
	case name == ":authority" || name == "host":
		m.Name = ":authority" // Envoy's Host header is :authority
	case name == ":path" || name == ":method" || name == ":scheme":
		m.Name = name
	case name[0] == ':':
		return m, errAt(field+".name", fmt.Sprintf("pseudo-header %q is not supported (want :method, :authority, :path or :scheme)", h.GetName()))
	default:
		m.Name = textproto.CanonicalMIMEHeaderKey(name)
	}
	var err error
	switch s := h.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_ExactMatch:
		m.str = Exactly(s.ExactMatch)
	case *routev3.HeaderMatcher_PrefixMatch:
		m.str = Prefix(s.PrefixMatch)
	case *routev3.HeaderMatcher_SuffixMatch:
		m.str = Suffix(s.SuffixMatch)
	case *routev3.HeaderMatcher_ContainsMatch:
		m.str = Contains(s.ContainsMatch)
	case *routev3.HeaderMatcher_SafeRegexMatch:
		re, rerr := CompileRegex(field+".safe_regex_match", s.SafeRegexMatch)
		m.str, err = Regex(re), rerr
	case *routev3.HeaderMatcher_StringMatch:
		m.str, err = Compile(field+".string_match", s.StringMatch)
	case *routev3.HeaderMatcher_PresentMatch:
		m.kind, m.present = hdrPresent, s.PresentMatch
	case *routev3.HeaderMatcher_RangeMatch:
		m.kind, m.lo, m.hi = hdrRange, s.RangeMatch.GetStart(), s.RangeMatch.GetEnd()
	case nil:
		// No specifier: the header's presence, as Envoy.
		m.kind, m.present = hdrPresent, true
	default:
		return m, errAt(field, fmt.Sprintf("header_match_specifier %T is not supported", s))
	}
	return m, err
}

// Match is Envoy's HeaderUtility::matchHeaders on the header's value v
// (ok: the header is present). A missing header matches only a presence
// matcher that asks for absence (or, inverted, for presence), unless
// treat_missing_header_as_empty makes it "".
func (m *Header) Match(v string, ok bool) bool {
	if !ok && !m.missing {
		if m.invert {
			return m.kind == hdrPresent && m.present
		}
		return m.kind == hdrPresent && !m.present
	}
	var res bool
	switch m.kind {
	case hdrPresent:
		res = m.present
	case hdrRange:
		n, err := strconv.ParseInt(v, 10, 64)
		res = err == nil && n >= m.lo && n < m.hi
	default:
		res = m.str.Match(v)
	}
	return res != m.invert
}
