package agent

import (
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// defaultRoutes are the IPv4 default routes of the main table, read over
// netlink (what `ip route show default` lists).
func defaultRoutes() ([]defaultRoute, error) {
	rs, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, err
	}
	var out []defaultRoute
	for _, r := range rs {
		if r.Dst != nil {
			if ones, _ := r.Dst.Mask.Size(); ones != 0 {
				continue
			}
		}
		if r.Type != unix.RTN_UNICAST {
			continue // unreachable, blackhole, prohibit: no address to leave from
		}
		d := defaultRoute{ifindex: r.LinkIndex, metric: r.Priority}
		if r.LinkIndex == 0 && len(r.MultiPath) > 0 {
			d.ifindex = r.MultiPath[0].LinkIndex
		}
		if src, ok := netip.AddrFromSlice(r.Src.To4()); ok {
			d.src = src
		}
		out = append(out, d)
	}
	return out, nil
}
