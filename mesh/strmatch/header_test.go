package strmatch

import (
	"testing"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
)

// TestHeaderMissing: Envoy's HeaderUtility on a missing header: only a
// presence matcher asking for absence matches (inverted: for presence);
// an inverted value matcher does not; treat_missing_header_as_empty
// matches the value "".
func TestHeaderMissing(t *testing.T) {
	exact := func(v string, inv, empty bool) *routev3.HeaderMatcher {
		return &routev3.HeaderMatcher{Name: "x-a", InvertMatch: inv, TreatMissingHeaderAsEmpty: empty,
			HeaderMatchSpecifier: &routev3.HeaderMatcher_ExactMatch{ExactMatch: v}}
	}
	present := func(p, inv bool) *routev3.HeaderMatcher {
		return &routev3.HeaderMatcher{Name: "x-a", InvertMatch: inv, HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: p}}
	}
	for _, tc := range []struct {
		name string
		h    *routev3.HeaderMatcher
		want bool
	}{
		{"exact", exact("v", false, false), false},
		{"inverted exact", exact("v", true, false), false},
		{"exact empty, missing as empty", exact("", false, true), true},
		{"present", present(true, false), false},
		{"absent", present(false, false), true},
		{"inverted present", present(true, true), true},
	} {
		m, err := CompileHeader("h", tc.h)
		if err != nil {
			t.Fatal(err)
		}
		if got := m.Match("", false); got != tc.want {
			t.Errorf("%s on a missing header: %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestHeaderNamesAndRange(t *testing.T) {
	m, err := CompileHeader("h", &routev3.HeaderMatcher{Name: "Host", HeaderMatchSpecifier: &routev3.HeaderMatcher_RangeMatch{RangeMatch: &typev3.Int64Range{Start: 10, End: 20}}})
	if err != nil {
		t.Fatal(err)
	}
	if m.Name != ":authority" || !m.Match("19", true) || m.Match("20", true) || m.Match("x", true) {
		t.Fatalf("host range matcher: name %q", m.Name)
	}
	if _, err := CompileHeader("h", &routev3.HeaderMatcher{Name: ":status"}); err == nil {
		t.Fatal(":status accepted")
	}
	m, _ = CompileHeader("h", &routev3.HeaderMatcher{Name: "x-request-id"})
	if m.Name != "X-Request-Id" || !m.Match("", true) || m.Match("", false) {
		t.Fatalf("no specifier is presence; name %q", m.Name)
	}
}
