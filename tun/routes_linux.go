package tun

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DefaultRoutes lists the unicast default routes of the main table of the
// calling thread's network namespace, IPv4 or IPv6, read over netlink
// (what `ip route show default` lists). Unreachable, blackhole and
// prohibit routes are left out: there is no interface to leave from.
func DefaultRoutes(v6 bool) ([]DefaultRoute, error) {
	fam := netlink.FAMILY_V4
	if v6 {
		fam = netlink.FAMILY_V6
	}
	rs, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	var out []DefaultRoute
	for _, r := range rs {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		if r.Type != unix.RTN_UNICAST {
			continue
		}
		d := DefaultRoute{Ifindex: r.LinkIndex, Metric: r.Priority}
		if r.LinkIndex == 0 && len(r.MultiPath) > 0 {
			d.Ifindex = r.MultiPath[0].LinkIndex
		}
		if src, ok := netip.AddrFromSlice(r.Src); ok {
			d.Src = src.Unmap()
		}
		out = append(out, d)
	}
	return out, nil
}
