package tun

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

func TestCaptureConfigRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  CaptureConfig
		want string
	}{
		{"empty outbound port range", CaptureConfig{ExcludeOutboundPorts: []PortRange{{90, 80}}}, "ExcludeOutboundPorts: 90-80"},
		{"port 0", CaptureConfig{ExcludeInboundPorts: []PortRange{{0, 10}}}, "ExcludeInboundPorts: 0-10"},
		{"zero CIDR", CaptureConfig{ExcludeOutboundCIDRs: []netip.Prefix{{}}}, "ExcludeOutboundCIDRs"},
		{"mapped CIDR", CaptureConfig{ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("::ffff:10.0.0.0/104")}}, "::ffff:10.0.0.0/104"},
		{"loopback pod IP", CaptureConfig{PodIPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}, "PodIPs: 127.0.0.1"},
		{"unspecified pod IP", CaptureConfig{PodIPs: []netip.Addr{netip.IPv6Unspecified()}}, "PodIPs: ::"},
		{"table main", CaptureConfig{Table: 254}, "Table 254"},
	} {
		cfg := tc.cfg
		cfg.TunName = "meshtun0"
		if err := cfg.setDefaults(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}

// TestAlwaysExcludedInboundPortsIsACopy: a caller that appends to or
// overwrites the list it got changes nothing for the next caller (capture
// setup and the agent both extend it).
func TestAlwaysExcludedInboundPortsIsACopy(t *testing.T) {
	want := fmt.Sprint(AlwaysExcludedInboundPorts())
	got := AlwaysExcludedInboundPorts()
	got[0] = PortRange{1, 1}
	_ = append(got[:1], PortRange{2, 2})
	if again := fmt.Sprint(AlwaysExcludedInboundPorts()); again != want || want != "[15000 15020-15021 15090]" {
		t.Errorf("after a caller changed its copy: %s, want %s (and [15000 15020-15021 15090])", again, want)
	}
}

// FuzzParsePorts: no input panics; what parses is a list of valid ranges
// that prints back to itself.
func FuzzParsePorts(f *testing.F) {
	for _, s := range []string{"80", "15000, 80,8080-8090", "1-65535", " ,", "9-1", "x", "80-"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		prs, err := ParsePorts(s)
		if err != nil {
			return
		}
		var parts []string
		for _, pr := range prs {
			if pr.Start == 0 || pr.End < pr.Start {
				t.Fatalf("ParsePorts(%q) gave invalid range %+v", s, pr)
			}
			parts = append(parts, pr.String())
		}
		again, err := ParsePorts(strings.Join(parts, ","))
		if err != nil || len(again) != len(prs) {
			t.Fatalf("ParsePorts(%q) = %v, which reparses as %v, %v", s, prs, again, err)
		}
		for i := range again {
			if again[i] != prs[i] {
				t.Fatalf("ParsePorts(%q) = %v, which reparses as %v", s, prs, again)
			}
		}
	})
}

// FuzzParseCIDRs: no input panics; what parses are valid, masked prefixes
// without IPv4-mapped addresses.
func FuzzParseCIDRs(f *testing.F) {
	for _, s := range []string{"10.0.0.0/8,fd00::/8", "*", "10.1.2.3", "::ffff:1.2.3.4", "1.2.3.4/33", "::ffff:1.2.3.0/120", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ps, err := ParseCIDRs(s)
		if err != nil {
			return
		}
		for _, p := range ps {
			if !p.IsValid() || p != p.Masked() || p.Addr().Is4In6() {
				t.Fatalf("ParseCIDRs(%q) gave %v, not a valid masked prefix", s, p)
			}
		}
	})
}
