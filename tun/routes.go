package tun

import "net/netip"

// DefaultRoute is one of the host's (or the pod's) default routes: what
// picking "the default route's interface and address" needs.
type DefaultRoute struct {
	Ifindex int
	Src     netip.Addr // the route's preferred source, if it names one
	Metric  int        // the lowest wins, as in the kernel
}
