package tun

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// errCaptureRemoved is returned by Block and Unblock after Teardown.
var errCaptureRemoved = errors.New("capture: already removed")

// backstopMetric is the metric of the capture table's "unreachable"
// default routes: behind the TUN's routes, so they only decide when the
// TUN's are gone.
const backstopMetric = 0x7fffffff

// Block makes captured traffic fail at once while no proxy reads the TUN.
// The capture table's default routes into the TUN (IPv4 and IPv6) are
// removed, leaving "unreachable" routes of the lowest preference: a local
// connect or send to a captured destination gets EHOSTUNREACH from the
// route lookup, and an inbound SYN for a captured port is answered with
// an ICMP unreachable, which aborts the peer's connect. Without it,
// packets would queue in a TUN nobody reads and every client would hang
// until its own timeout.
//
// The unreachable routes stay after Unblock, behind the TUN's. So capture
// fails closed even when the TUN disappears without a Block — the agent
// that holds it is killed, the kernel removes the TUN's routes — and a
// capture installed by an init container stays blocked after its TUN is
// gone, until the agent that takes over sets capture up again. Nothing
// captured ever leaks out uncaptured. The rules do not change, and every
// route keeps capture's protocol tag, so Teardown and CleanupStale remove
// them all.
//
// Block and Unblock act on the namespace capture was set up in, from any
// goroutine, and may be called repeatedly. Each switch is one route change
// per family: there is no moment without a route.
func (c *Capture) Block() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.undone {
		return errCaptureRemoved
	}
	err := inNetns(c.ns, func() error {
		if err := c.addBackstop(); err != nil {
			return err
		}
		tunLink, err := netlink.LinkByName(c.cfg.TunName)
		if err != nil {
			return nil // the TUN is gone, and its routes with it
		}
		for _, v6 := range []bool{false, true} {
			r, err := c.setTunRoute(tunLink, v6, netlink.RouteDel)
			if err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("capture: blocking: removing route %v dev %s from table %d: %w", r.Dst, c.cfg.TunName, c.cfg.Table, err)
			}
		}
		return nil
	})
	if err == nil {
		c.log.Info().Int("table", c.cfg.Table).Msg("capture blocked: captured flows are refused until a proxy serves them")
	}
	return err
}

// Unblock puts the capture table's default routes into the TUN back, as
// setup installed them; they take precedence over the unreachable ones.
func (c *Capture) Unblock() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.undone {
		return errCaptureRemoved
	}
	err := inNetns(c.ns, func() error {
		if err := c.addBackstop(); err != nil {
			return err
		}
		tunLink, err := netlink.LinkByName(c.cfg.TunName)
		if err != nil {
			return fmt.Errorf("capture: unblocking: TUN %q: %w", c.cfg.TunName, err)
		}
		for _, v6 := range []bool{false, true} {
			if r, err := c.setTunRoute(tunLink, v6, netlink.RouteReplace); err != nil {
				return fmt.Errorf("capture: unblocking: route %v in table %d: %w", r.Dst, c.cfg.Table, err)
			}
		}
		return nil
	})
	if err == nil {
		c.log.Info().Str("tun", c.cfg.TunName).Int("table", c.cfg.Table).Msg("capture unblocked: captured flows go to the proxy")
	}
	return err
}

// addBackstop installs (or keeps) the unreachable default routes of the
// capture table, behind everything else in it.
func (c *Capture) addBackstop() error {
	for _, v6 := range []bool{false, true} {
		r := &netlink.Route{
			Table:    c.cfg.Table,
			Dst:      defaultDst(v6),
			Type:     unix.RTN_UNREACHABLE,
			Protocol: rtProto,
			Priority: backstopMetric,
		}
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("capture: unreachable route %v metric %d in table %d: %w", r.Dst, backstopMetric, c.cfg.Table, err)
		}
	}
	return nil
}
