package tun

import (
	"fmt"
	"net/netip"
)

// LocalConfig describes laptop-mode capture: only the given CIDRs (a mesh's
// service range, say 10.96.0.0/12) are routed into the TUN. Nothing is
// captured inbound, the default route and every other destination are left
// alone, and the proxy's own connections (marked on Linux, bound to the
// outgoing interface elsewhere) are never routed back into the TUN.
type LocalConfig struct {
	TunName string
	CIDRs   []netip.Prefix
	// Mark of the proxy's sockets (Linux); default 0x539.
	Mark uint32
	// Table holds the CIDR routes (Linux); default 15002, so that sidecar
	// capture (15001) and laptop mode can be told apart.
	Table int
}

func (c *LocalConfig) setDefaults() error {
	if c.TunName == "" {
		return fmt.Errorf("local capture: TunName: required")
	}
	if len(c.CIDRs) == 0 {
		return fmt.Errorf("local capture: no CIDR to capture (--capture-cidr)")
	}
	for _, p := range c.CIDRs {
		if !p.IsValid() || p.Addr().Is4In6() || p.Bits() == 0 {
			return fmt.Errorf("local capture: %v: want a CIDR narrower than the default route", p)
		}
		if p != p.Masked() {
			return fmt.Errorf("local capture: %v: host bits set (did you mean %v?)", p, p.Masked())
		}
	}
	if c.Mark == 0 {
		c.Mark = 0x539
	}
	if c.Table == 0 {
		c.Table = 15002
	}
	if c.Table < 1 || c.Table == 253 || c.Table == 254 || c.Table == 255 || c.Table > 0xfffffff0 {
		return fmt.Errorf("local capture: Table %d: not a free routing table id", c.Table)
	}
	return nil
}
