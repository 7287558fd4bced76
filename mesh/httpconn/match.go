package httpconn

import (
	"errors"
	"net/http"
	"net/textproto"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/meshtun/meshtun/mesh/strmatch"
)

// compileStringMatcher is strmatch.Compile with this package's field
// errors (so at nests them under the caller's path).
func compileStringMatcher(m *matcherv3.StringMatcher, field string) (strmatch.Matcher, error) {
	sm, err := strmatch.Compile(field, m)
	return sm, matchErr(err)
}

// compileRegex compiles a RegexMatcher for a full match (Envoy's
// safe_regex matches the whole value).
func compileRegex(m *matcherv3.RegexMatcher, field string) (*regexp.Regexp, error) {
	re, err := strmatch.CompileRegex(field, m)
	return re, matchErr(err)
}

func matchErr(err error) error {
	var se *strmatch.Error
	if errors.As(err, &se) {
		return &fieldError{se.Field, se.Err}
	}
	return err
}

// headerMatcher is a compiled route.v3.HeaderMatcher.
type headerMatcher struct {
	name    string // canonical MIME key, or a pseudo-header (":path", …)
	kind    uint8
	sm      strmatch.Matcher
	present bool
	lo, hi  int64 // range_match [lo, hi)
	invert  bool
	missing bool // treat_missing_header_as_empty
}

const (
	hmString = iota
	hmPresent
	hmRange
)

func compileHeaderMatcher(h *routev3.HeaderMatcher, field string) (headerMatcher, error) {
	name := strings.ToLower(h.GetName())
	if name == "" {
		return headerMatcher{}, fieldf(field+".name", "empty")
	}
	m := headerMatcher{invert: h.GetInvertMatch(), missing: h.GetTreatMissingHeaderAsEmpty()}
	switch name {
	case ":authority", "host":
		m.name = ":authority"
	case ":path", ":method", ":scheme":
		m.name = name
	default:
		if name[0] == ':' {
			return m, fieldf(field+".name", "pseudo-header %q not supported", name)
		}
		m.name = textproto.CanonicalMIMEHeaderKey(name)
	}
	var err error
	switch s := h.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_ExactMatch:
		m.sm = strmatch.Exactly(s.ExactMatch)
	case *routev3.HeaderMatcher_SafeRegexMatch:
		var re *regexp.Regexp
		re, err = compileRegex(s.SafeRegexMatch, field+".safe_regex_match")
		m.sm = strmatch.Regex(re)
	case *routev3.HeaderMatcher_RangeMatch:
		m.kind, m.lo, m.hi = hmRange, s.RangeMatch.GetStart(), s.RangeMatch.GetEnd()
	case *routev3.HeaderMatcher_PresentMatch:
		m.kind, m.present = hmPresent, s.PresentMatch
	case *routev3.HeaderMatcher_PrefixMatch:
		m.sm = strmatch.Prefix(s.PrefixMatch)
	case *routev3.HeaderMatcher_SuffixMatch:
		m.sm = strmatch.Suffix(s.SuffixMatch)
	case *routev3.HeaderMatcher_ContainsMatch:
		m.sm = strmatch.Contains(s.ContainsMatch)
	case *routev3.HeaderMatcher_StringMatch:
		m.sm, err = compileStringMatcher(s.StringMatch, field+".string_match")
	case nil:
		// No specifier: Envoy matches on presence.
		m.kind, m.present = hmPresent, true
	}
	return m, err
}

// headerValue returns the request's value of a header for matching: the
// values of a repeated header joined by "," as Envoy does.
func headerValue(r *http.Request, name string) (string, bool) {
	switch name {
	case ":authority":
		return r.Host, r.Host != ""
	case ":path":
		return r.RequestURI, true
	case ":method":
		return r.Method, true
	case ":scheme":
		return "http", true
	}
	vs, ok := r.Header[name]
	if !ok || len(vs) == 0 {
		return "", false
	}
	if len(vs) == 1 {
		return vs[0], true
	}
	return strings.Join(vs, ","), true
}

// match is Envoy's HeaderUtility::matchHeaders.
func (m *headerMatcher) match(r *http.Request) bool {
	v, ok := headerValue(r, m.name)
	if !ok && !m.missing {
		if m.invert {
			return m.kind == hmPresent && m.present
		}
		return m.kind == hmPresent && !m.present
	}
	var res bool
	switch m.kind {
	case hmPresent:
		res = m.present
	case hmRange:
		n, err := strconv.ParseInt(v, 10, 64)
		res = err == nil && n >= m.lo && n < m.hi
	default:
		res = m.sm.Match(v)
	}
	return res != m.invert
}

// queryMatcher is a compiled route.v3.QueryParameterMatcher.
type queryMatcher struct {
	name    string
	present bool // present_match (no string matcher)
	sm      *strmatch.Matcher
}

func compileQueryMatcher(q *routev3.QueryParameterMatcher, field string) (queryMatcher, error) {
	m := queryMatcher{name: q.GetName()}
	switch s := q.GetQueryParameterMatchSpecifier().(type) {
	case *routev3.QueryParameterMatcher_StringMatch:
		sm, err := compileStringMatcher(s.StringMatch, field+".string_match")
		if err != nil {
			return m, err
		}
		m.sm = &sm
	case *routev3.QueryParameterMatcher_PresentMatch:
		m.present = s.PresentMatch
	default:
		// Neither: Envoy matches when the parameter is present.
		m.present = true
	}
	return m, nil
}

func (m *queryMatcher) match(rawQuery string) bool {
	v, ok := queryValue(rawQuery, m.name)
	if m.sm == nil {
		return ok == m.present
	}
	return ok && m.sm.Match(v)
}

// queryValue finds the first value of key in a raw query string without
// building a map; values are percent-decoded only when they need it.
func queryValue(q, key string) (string, bool) {
	for q != "" {
		var kv string
		kv, q, _ = strings.Cut(q, "&")
		k, v, _ := strings.Cut(kv, "=")
		if strings.ContainsAny(k, "%+") {
			if uk, err := url.QueryUnescape(k); err == nil {
				k = uk
			}
		}
		if k != key {
			continue
		}
		if strings.ContainsAny(v, "%+") {
			if uv, err := url.QueryUnescape(v); err == nil {
				v = uv
			}
		}
		return v, true
	}
	return "", false
}
