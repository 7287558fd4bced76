package mesh

import (
	"net/netip"
	"slices"
)

// LocalAddrs is the pod's own addresses: a flow to one of them is
// inbound, any other outbound. It is built once, from the addresses
// capture uses, before anything that takes flows exists, and shared by
// value by the Gate, the Dispatcher and Passthrough, so the three can
// never disagree on a flow's direction, nor see it change while they run.
// The zero value holds none (laptop mode: nothing is inbound).
type LocalAddrs struct {
	// addrs is sorted, without duplicates or invalid addresses, and never
	// written after NewLocalAddrs.
	addrs []netip.Addr
}

// NewLocalAddrs is the set of ips; it keeps a copy.
func NewLocalAddrs(ips []netip.Addr) LocalAddrs {
	var addrs []netip.Addr
	for _, ip := range ips {
		if ip.IsValid() {
			addrs = append(addrs, ip)
		}
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	return LocalAddrs{addrs: slices.Compact(addrs)}
}

// Contains reports whether ip is one of the pod's addresses. It is on
// every flow's path: a linear scan, because a pod has one address per
// family and comparing two beats hashing one; it allocates nothing.
func (l LocalAddrs) Contains(ip netip.Addr) bool {
	for _, a := range l.addrs {
		if a == ip {
			return true
		}
	}
	return false
}

// Addrs returns the addresses, sorted, in a new slice.
func (l LocalAddrs) Addrs() []netip.Addr { return slices.Clone(l.addrs) }
