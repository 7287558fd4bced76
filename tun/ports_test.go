package tun

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestParsePorts(t *testing.T) {
	got, err := ParsePorts(" 80,443, 8000-8100,,15021")
	if err != nil {
		t.Fatal(err)
	}
	want := []PortRange{{80, 80}, {443, 443}, {8000, 8100}, {15021, 15021}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for in, wantErr := range map[string]string{
		"80,http":    `port "http"`,
		"0":          `port "0"`,
		"70000":      `port "70000"`,
		"90-80":      `port range "90-80": end before start`,
		"80-x":       `port range "80-x"`,
		"8000-8100-": `port range "8000-8100-"`,
	} {
		if _, err := ParsePorts(in); err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("ParsePorts(%q) = %v, want error containing %q", in, err, wantErr)
		}
	}
}

func TestParseCIDRs(t *testing.T) {
	got, err := ParseCIDRs("10.1.2.3/16, fd00::1,192.0.2.7,*")
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{
		netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("fd00::1/128"),
		netip.MustParsePrefix("192.0.2.7/32"), netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0"),
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for _, bad := range []string{"10.0.0.0/33", "10.0.0", "example.com", "fd00::/129"} {
		if _, err := ParseCIDRs(bad); err == nil || !strings.Contains(err.Error(), bad) {
			t.Errorf("ParseCIDRs(%q) = %v, want an error naming it", bad, err)
		}
	}
}

func TestCaptureConfigValidation(t *testing.T) {
	for _, tc := range []struct {
		cfg  CaptureConfig
		want string
	}{
		{CaptureConfig{}, "TunName: required"},
		{CaptureConfig{TunName: "t", Mark: 0x10, MarkMask: 0x1}, "outside MarkMask"},
		{CaptureConfig{TunName: "t", Table: 255}, "Table 255"},
		{CaptureConfig{TunName: "t", PodIPs: []netip.Addr{netip.MustParseAddr("224.0.0.1")}}, "224.0.0.1"},
	} {
		c := tc.cfg
		if err := c.setDefaults(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want error containing %q", tc.cfg, err, tc.want)
		}
	}
	c := CaptureConfig{TunName: "t"}
	if err := c.setDefaults(); err != nil || c.Mark != 0x539 || c.Table != 15001 || c.StateDir != "/run/meshtun" {
		t.Fatalf("defaults: %+v, %v", c, err)
	}
}

func TestDeviceConfigValidation(t *testing.T) {
	for _, tc := range []struct {
		cfg  DeviceConfig
		want string
	}{
		{DeviceConfig{MTU: 576}, "MTU 576"},
		{DeviceConfig{MTU: 70000}, "MTU 70000"},
		{DeviceConfig{Name: "a-very-long-interface-name"}, "longer than 15"},
	} {
		c := tc.cfg
		if err := c.setDefaults(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want error containing %q", tc.cfg, err, tc.want)
		}
	}
}
