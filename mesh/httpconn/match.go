package httpconn

import (
	"errors"
	"net/http"
	"net/url"
	"regexp"
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

// compileHeaderMatcher is strmatch.CompileHeader with this package's
// field errors.
func compileHeaderMatcher(h *routev3.HeaderMatcher, field string) (strmatch.Header, error) {
	m, err := strmatch.CompileHeader(field, h)
	return m, matchErr(err)
}

// matchHeader evaluates m on r's header (Envoy's HeaderUtility).
func matchHeader(m *strmatch.Header, r *http.Request) bool {
	return m.Match(headerValue(r, m.Name))
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
