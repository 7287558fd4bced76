package tun

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestUtunUpCommands(t *testing.T) {
	join := func(cmds [][]string) []string {
		var out []string
		for _, c := range cmds {
			out = append(out, strings.Join(c, " "))
		}
		return out
	}
	for _, tc := range []struct {
		addrs []string
		want  []string
	}{
		{nil, []string{"/sbin/ifconfig utun7 up"}},
		{[]string{"100.100.0.1/32", "10.99.0.1/24", "fd7a:115c::1/128", "fd00:1::2/64"}, []string{
			"/sbin/ifconfig utun7 inet 100.100.0.1/32 100.100.0.1 alias",
			"/sbin/ifconfig utun7 inet 10.99.0.1/24 10.99.0.1 alias",
			"/sbin/ifconfig utun7 inet6 fd7a:115c::1 prefixlen 128 alias",
			"/sbin/ifconfig utun7 inet6 fd00:1::2 prefixlen 64 alias",
			// Up last: the device never carries a packet half configured.
			"/sbin/ifconfig utun7 up",
		}},
	} {
		var addrs []netip.Prefix
		for _, a := range tc.addrs {
			addrs = append(addrs, netip.MustParsePrefix(a))
		}
		cmds, err := utunUpCommands("utun7", addrs)
		if err != nil {
			t.Fatalf("%v: %v", tc.addrs, err)
		}
		if got := join(cmds); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%v:\n got %q\nwant %q", tc.addrs, got, tc.want)
		}
	}
	for _, bad := range []netip.Prefix{{}, netip.MustParsePrefix("::ffff:10.0.0.1/128")} {
		if _, err := utunUpCommands("utun7", []netip.Prefix{bad}); err == nil {
			t.Errorf("%v: accepted", bad)
		}
	}
}

func TestRouteCommand(t *testing.T) {
	for _, tc := range []struct {
		op, cidr, want string
	}{
		{"add", "10.96.0.0/12", "/sbin/route -n add -inet -net 10.96.0.0/12 -interface utun4"},
		{"delete", "10.96.0.0/12", "/sbin/route -n delete -inet -net 10.96.0.0/12 -interface utun4"},
		{"add", "fd00:10:96::/112", "/sbin/route -n add -inet6 -net fd00:10:96::/112 -interface utun4"},
	} {
		if got := strings.Join(routeCommand(tc.op, netip.MustParsePrefix(tc.cidr), "utun4"), " "); got != tc.want {
			t.Errorf("routeCommand(%s, %s) = %q, want %q", tc.op, tc.cidr, got, tc.want)
		}
	}
}
