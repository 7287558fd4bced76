// Package strmatch owns Envoy's envoy.type.matcher.v3.StringMatcher and
// RegexMatcher, compiled once per configuration and matched without
// allocating: route header and query matchers (httpconn), SAN matchers
// (tlsctx) and RBAC principals, paths and headers (rbac) all use it, so
// the three agree on Envoy's semantics.
//
//   - exact, prefix, suffix, contains: with ignore_case compared ASCII
//     case-insensitively, as Envoy does (absl's EqualsIgnoreCase: "ſ" is
//     not "s"), the pattern lowered once;
//     prefix, suffix and contains must not be empty (Envoy's proto
//     validation: min_len 1).
//   - safe_regex: RE2 (Go's regexp is RE2, as Envoy's engine), matched
//     against the whole value; ignore_case has no effect on it and is
//     refused, as Envoy refuses it.
//   - custom: refused, naming the field.
package strmatch

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

// Error is a compile error at Field (a dotted path the caller gave, with
// the sub-field at fault appended).
type Error struct {
	Field string
	Err   error
}

func (e *Error) Error() string { return e.Field + ": " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

func errAt(field, msg string) error { return &Error{Field: field, Err: errors.New(msg)} }

type kind uint8

const (
	exact kind = iota
	prefix
	suffix
	contains
	regex
)

// Matcher is a compiled StringMatcher; the zero value matches only "".
type Matcher struct {
	kind       kind
	value      string // lowered when ignoreCase
	ignoreCase bool
	re         *regexp.Regexp
}

// Compile compiles m; errors are *Error naming field and the sub-field.
func Compile(field string, m *matcherv3.StringMatcher) (Matcher, error) {
	sm := Matcher{ignoreCase: m.GetIgnoreCase()}
	switch p := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		sm.kind, sm.value = exact, p.Exact
	case *matcherv3.StringMatcher_Prefix:
		sm.kind, sm.value = prefix, p.Prefix
	case *matcherv3.StringMatcher_Suffix:
		sm.kind, sm.value = suffix, p.Suffix
	case *matcherv3.StringMatcher_Contains:
		sm.kind, sm.value = contains, p.Contains
	case *matcherv3.StringMatcher_SafeRegex:
		if sm.ignoreCase {
			return sm, errAt(field+".ignore_case", "has no effect on safe_regex (Envoy refuses it)")
		}
		re, err := CompileRegex(field+".safe_regex", p.SafeRegex)
		if err != nil {
			return sm, err
		}
		sm.kind, sm.re = regex, re
		return sm, nil
	case *matcherv3.StringMatcher_Custom:
		return sm, errAt(field+".custom", "custom string matchers are not supported")
	case nil:
		return sm, errAt(field, "no match_pattern")
	default:
		return sm, errAt(field, fmt.Sprintf("match_pattern %T is not supported", p))
	}
	if sm.value == "" && sm.kind != exact {
		return sm, errAt(field, "empty pattern (prefix, suffix and contains need at least one character)")
	}
	if sm.ignoreCase {
		sm.value = lowerASCII(sm.value)
	}
	return sm, nil
}

// CompileRegex compiles a RegexMatcher to match whole values, as Envoy's
// safe_regex does.
func CompileRegex(field string, m *matcherv3.RegexMatcher) (*regexp.Regexp, error) {
	re, err := regexp.Compile("^(?:" + m.GetRegex() + ")$")
	if err != nil {
		return nil, &Error{Field: field + ".regex", Err: err}
	}
	return re, nil
}

// Match reports whether v matches. It does not allocate.
func (m *Matcher) Match(v string) bool {
	s := m.value
	switch m.kind {
	case exact:
		if m.ignoreCase {
			return equalFoldASCII(v, s)
		}
		return v == s
	case prefix:
		if m.ignoreCase {
			return len(v) >= len(s) && equalFoldASCII(v[:len(s)], s)
		}
		return strings.HasPrefix(v, s)
	case suffix:
		if m.ignoreCase {
			return len(v) >= len(s) && equalFoldASCII(v[len(v)-len(s):], s)
		}
		return strings.HasSuffix(v, s)
	case contains:
		if m.ignoreCase {
			return containsFold(v, s)
		}
		return strings.Contains(v, s)
	case regex:
		return m.re.MatchString(v)
	}
	return false
}

// containsFold is strings.Contains, ASCII case-insensitive, without
// allocating a lowered copy of v.
func containsFold(v, s string) bool {
	for i := 0; i+len(s) <= len(v); i++ {
		if equalFoldASCII(v[i:i+len(s)], s) {
			return true
		}
	}
	return false
}

// equalFoldASCII compares a with b, whose letters are lower case,
// ignoring the case of ASCII letters only.
func equalFoldASCII(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		c := a[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != b[i] {
			return false
		}
	}
	return true
}

func lowerASCII(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// Exact returns the value of an exact matcher (lower case under
// ignore_case), for matchers that give exact patterns a meaning of their
// own (a DNS SAN's wildcard).
func (m *Matcher) Exact() (string, bool) { return m.value, m.kind == exact }

// The deprecated HeaderMatcher fields (exact_match, prefix_match, …) are
// StringMatchers without ignore_case: these build them.

// Exactly matches v.
func Exactly(v string) Matcher { return Matcher{kind: exact, value: v} }

// Prefix matches values starting with v.
func Prefix(v string) Matcher { return Matcher{kind: prefix, value: v} }

// Suffix matches values ending with v.
func Suffix(v string) Matcher { return Matcher{kind: suffix, value: v} }

// Contains matches values containing v.
func Contains(v string) Matcher { return Matcher{kind: contains, value: v} }

// Regex matches values re matches (CompileRegex anchors it).
func Regex(re *regexp.Regexp) Matcher { return Matcher{kind: regex, re: re} }
