package agent

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/meshtun/meshtun/tun"
)

func TestLocalEnviron(t *testing.T) {
	got := strings.Join(LocalEnviron([]string{"PATH=/bin", "POD_NAMESPACE=shop"}), " ")
	if !strings.Contains(got, "POD_NAMESPACE=shop") || strings.Contains(got, "POD_NAMESPACE=default") {
		t.Errorf("a set value was replaced: %s", got)
	}
	if !strings.Contains(got, "POD_NAME=") {
		t.Errorf("POD_NAME not defaulted: %s", got)
	}
	kept := LocalEnviron([]string{"POD_NAME=me", "INSTANCE_IP=10.1.2.3"})
	if strings.Join(kept, " ") != "POD_NAME=me INSTANCE_IP=10.1.2.3 POD_NAMESPACE=default" {
		t.Errorf("LocalEnviron = %v", kept)
	}
}

func TestChooseHostIP(t *testing.T) {
	addrs := map[int][]netip.Addr{
		1: {netip.MustParseAddr("127.0.0.1")},
		2: {netip.MustParseAddr("169.254.3.4"), netip.MustParseAddr("10.1.0.5"), netip.MustParseAddr("10.1.0.6")},
		3: {netip.MustParseAddr("fd00::3"), netip.MustParseAddr("192.168.7.9")},
	}
	lookup := func(i int) []netip.Addr { return addrs[i] }
	for _, tc := range []struct {
		name   string
		routes []tun.DefaultRoute
		want   string
	}{
		{"no default route", nil, "invalid IP"},
		{"the route's interface, its first global IPv4", []tun.DefaultRoute{{Ifindex: 2}}, "10.1.0.5"},
		{"the route's preferred source first", []tun.DefaultRoute{{Ifindex: 2, Src: netip.MustParseAddr("10.1.0.6")}}, "10.1.0.6"},
		{"the lowest metric wins, whatever the order",
			[]tun.DefaultRoute{{Ifindex: 2, Metric: 600}, {Ifindex: 3, Metric: 100}}, "192.168.7.9"},
		{"a route whose interface has no global IPv4 is passed over",
			[]tun.DefaultRoute{{Ifindex: 1, Metric: 0}, {Ifindex: 3, Metric: 50}}, "192.168.7.9"},
		{"no usable address", []tun.DefaultRoute{{Ifindex: 1}, {Ifindex: 9}}, "invalid IP"},
	} {
		if got := chooseHostIP(tc.routes, lookup).String(); got != tc.want {
			t.Errorf("%s: chooseHostIP = %s, want %s", tc.name, got, tc.want)
		}
	}
}
