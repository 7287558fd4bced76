package strmatch

import (
	"errors"
	"strings"
	"testing"

	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

func sm(p any, ic bool) *matcherv3.StringMatcher {
	m := &matcherv3.StringMatcher{IgnoreCase: ic}
	switch v := p.(type) {
	case *matcherv3.StringMatcher_Exact:
		m.MatchPattern = v
	case *matcherv3.StringMatcher_Prefix:
		m.MatchPattern = v
	case *matcherv3.StringMatcher_Suffix:
		m.MatchPattern = v
	case *matcherv3.StringMatcher_Contains:
		m.MatchPattern = v
	case *matcherv3.StringMatcher_SafeRegex:
		m.MatchPattern = v
	}
	return m
}

func TestMatch(t *testing.T) {
	re := func(r string) *matcherv3.StringMatcher_SafeRegex {
		return &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: r}}
	}
	for _, tc := range []struct {
		m        *matcherv3.StringMatcher
		yes, not []string
	}{
		{sm(&matcherv3.StringMatcher_Exact{Exact: "spiffe://td/ns/a/sa/b"}, false), []string{"spiffe://td/ns/a/sa/b"}, []string{"spiffe://td/ns/a/sa/B", ""}},
		{sm(&matcherv3.StringMatcher_Exact{Exact: ""}, false), []string{""}, []string{"x"}},
		{sm(&matcherv3.StringMatcher_Exact{Exact: "Host.Example"}, true), []string{"host.example", "HOST.EXAMPLE"}, []string{"host.exampl"}},
		{sm(&matcherv3.StringMatcher_Prefix{Prefix: "spiffe://cluster.local/"}, false), []string{"spiffe://cluster.local/ns/x"}, []string{"spiffe://cluster.localx"}},
		{sm(&matcherv3.StringMatcher_Prefix{Prefix: "/API"}, true), []string{"/api/v1", "/Api"}, []string{"/ap"}},
		{sm(&matcherv3.StringMatcher_Suffix{Suffix: ".svc"}, false), []string{"a.svc"}, []string{"a.SVC", "svc"}},
		{sm(&matcherv3.StringMatcher_Suffix{Suffix: ".SVC"}, true), []string{"a.svc"}, []string{"a.sv"}},
		{sm(&matcherv3.StringMatcher_Contains{Contains: "admin"}, false), []string{"/x/admin/y"}, []string{"/ADMIN"}},
		{sm(&matcherv3.StringMatcher_Contains{Contains: "ADMIN"}, true), []string{"/x/Admin/y", "admin"}, []string{"/adm"}},
		// Envoy folds ASCII only: the long s (U+017F) is not an s.
		{sm(&matcherv3.StringMatcher_Exact{Exact: "s"}, true), []string{"S"}, []string{"ſ"}},
		{sm(re(`.*/ns/foo/.*`), false), []string{"spiffe://td/ns/foo/sa/x"}, []string{"spiffe://td/ns/foox/sa"}},
		{sm(re(`ab|cd`), false), []string{"ab", "cd"}, []string{"abcd", "xab"}}, // whole value
	} {
		m, err := Compile("m", tc.m)
		if err != nil {
			t.Fatalf("%v: %v", tc.m, err)
		}
		for _, v := range tc.yes {
			if !m.Match(v) {
				t.Errorf("%v does not match %q", tc.m, v)
			}
		}
		for _, v := range tc.not {
			if m.Match(v) {
				t.Errorf("%v matches %q", tc.m, v)
			}
		}
	}
}

func TestCompileErrors(t *testing.T) {
	for _, tc := range []struct {
		m     *matcherv3.StringMatcher
		field string
	}{
		{&matcherv3.StringMatcher{}, "x.m"},
		{sm(&matcherv3.StringMatcher_Prefix{Prefix: ""}, false), "x.m"},
		{sm(&matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "("}}, false), "x.m.safe_regex.regex"},
		{sm(&matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "a"}}, true), "x.m.ignore_case"},
		{&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Custom{}}, "x.m.custom"},
	} {
		_, err := Compile("x.m", tc.m)
		var e *Error
		if !errors.As(err, &e) || e.Field != tc.field || !strings.HasPrefix(err.Error(), tc.field+": ") {
			t.Errorf("%v: error %v, want one at %s", tc.m, err, tc.field)
		}
	}
}

func TestMatchDoesNotAllocate(t *testing.T) {
	m, err := Compile("m", sm(&matcherv3.StringMatcher_Contains{Contains: "ADMIN"}, true))
	if err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() { m.Match("/some/long/path/with/Admin/in/it") }); n != 0 {
		t.Fatalf("Match allocates %v times", n)
	}
}
