package tun

import (
	"fmt"
	"net/netip"
	"strconv"
)

// The command lines darwin's laptop mode runs, built here (no build
// constraint) so that they are tested on every OS. ifconfig(8) and
// route(8) are named by path: an agent started by launchd or under
// `env -i` may have no /sbin in PATH.
const (
	darwinIfconfig = "/sbin/ifconfig"
	darwinRoute    = "/sbin/route"
)

// utunUpCommands bring a utun device up: a macOS utun is created down and
// without addresses, and routes with -interface to a down interface carry
// nothing. Each address is added as an alias (a second one must not
// replace the first): IPv4 as a point-to-point address to itself, as a
// utun has no peer on a link, IPv6 with its prefix length.
func utunUpCommands(name string, addrs []netip.Prefix) ([][]string, error) {
	var cmds [][]string
	for _, p := range addrs {
		if !p.IsValid() || p.Addr().Is4In6() || p.Addr().Zone() != "" {
			return nil, fmt.Errorf("tun: %s: address %v: want an IPv4 or IPv6 CIDR", name, p)
		}
		a := p.Addr()
		if a.Is4() {
			cmds = append(cmds, []string{darwinIfconfig, name, "inet", p.String(), a.String(), "alias"})
		} else {
			cmds = append(cmds, []string{darwinIfconfig, name, "inet6", a.String(), "prefixlen", strconv.Itoa(p.Bits()), "alias"})
		}
	}
	return append(cmds, []string{darwinIfconfig, name, "up"}), nil
}

// routeCommand adds ("add") or deletes ("delete") the route of p through
// the interface ifname.
func routeCommand(op string, p netip.Prefix, ifname string) []string {
	fam := "-inet"
	if p.Addr().Is6() {
		fam = "-inet6"
	}
	return []string{darwinRoute, "-n", op, fam, "-net", p.String(), "-interface", ifname}
}
