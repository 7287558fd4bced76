package tun

import (
	"fmt"
	"net/netip"
	"sync"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netns"
)

// AlwaysExcludedInboundPorts are never captured inbound: the admin,
// agent, health and Prometheus ports must answer even when the proxy's
// data path is down, and must stay off the capture path (Istio #23970).
// Each call returns a new slice, so no caller can change what capture
// leaves out for the others.
func AlwaysExcludedInboundPorts() []PortRange {
	return []PortRange{{15000, 15000}, {15020, 15021}, {15090, 15090}}
}

// CaptureConfig describes sidecar capture in the current network namespace.
type CaptureConfig struct {
	TunName string // the TUN device; must exist

	// Mark and MarkMask select the proxy's own sockets (SO_MARK), which
	// bypass capture. Default 0x539/0xffffffff (Istio's 1337).
	Mark, MarkMask uint32

	// PodInterface is the pod's interface; default: the interface of the
	// IPv4 default route (else the IPv6 one).
	PodInterface string
	// PodIPs default to the global unicast addresses of PodInterface.
	PodIPs []netip.Addr

	// OwnerUID, when positive, is a user whose sockets bypass capture
	// like marked ones: the least-privilege sidecar's, which cannot set
	// SO_MARK.
	OwnerUID int

	// Inbound captures TCP arriving on PodInterface for PodIPs.
	Inbound bool

	ExcludeOutboundPorts []PortRange
	ExcludeOutboundCIDRs []netip.Prefix
	ExcludeInboundPorts  []PortRange // AlwaysExcludedInboundPorts() are added

	// Table is the routing table whose default route is the TUN. Default 15001.
	Table int
	// StateDir holds the record of what setup changed. Default /run/meshtun.
	StateDir string
}

func (c *CaptureConfig) setDefaults() error {
	if c.TunName == "" {
		return fmt.Errorf("capture: TunName: required")
	}
	if c.Mark == 0 {
		c.Mark = 0x539
	}
	if c.MarkMask == 0 {
		c.MarkMask = 0xffffffff
	}
	if c.Mark&c.MarkMask != c.Mark {
		return fmt.Errorf("capture: Mark %#x has bits outside MarkMask %#x", c.Mark, c.MarkMask)
	}
	if c.Table == 0 {
		c.Table = 15001
	}
	if c.Table < 1 || c.Table == 253 || c.Table == 254 || c.Table == 255 || c.Table > 0xfffffff0 {
		return fmt.Errorf("capture: Table %d: not a free routing table id", c.Table)
	}
	if c.StateDir == "" {
		c.StateDir = "/run/meshtun"
	}
	for _, ip := range c.PodIPs {
		if !ip.IsValid() || ip.Is4In6() || ip.IsUnspecified() || ip.IsMulticast() || ip.IsLoopback() {
			return fmt.Errorf("capture: PodIPs: %v is not a unicast address", ip)
		}
	}
	for _, f := range []struct {
		name  string
		ports []PortRange
	}{{"ExcludeOutboundPorts", c.ExcludeOutboundPorts}, {"ExcludeInboundPorts", c.ExcludeInboundPorts}} {
		for _, pr := range f.ports {
			if pr.Start == 0 || pr.End < pr.Start {
				return fmt.Errorf("capture: %s: %d-%d is not a port range", f.name, pr.Start, pr.End)
			}
		}
	}
	for _, p := range c.ExcludeOutboundCIDRs {
		if !p.IsValid() || p.Addr().Is4In6() {
			return fmt.Errorf("capture: ExcludeOutboundCIDRs: %v is not a CIDR", p)
		}
	}
	return nil
}

// Capture is capture in force; Teardown undoes it.
type Capture struct {
	cfg    CaptureConfig
	podIPs []netip.Addr
	podIf  string
	log    zerolog.Logger

	serverPorts []PortRange // ports outside the ephemeral range

	mu     sync.Mutex
	ns     netns.NsHandle // the network namespace capture is in
	undone bool
}

// PodIPs are the pod addresses capture uses (given or discovered).
func (c *Capture) PodIPs() []netip.Addr { return c.podIPs }

// PodInterface is the pod interface capture uses (given or discovered).
func (c *Capture) PodInterface() string { return c.podIf }
