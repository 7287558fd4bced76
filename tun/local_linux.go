package tun

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// localRulePrio is the priority of laptop mode's one rule per family:
// "not fwmark MARK lookup TABLE". It comes before the main table, and the
// table holds only the CIDR routes, so any other destination falls
// through to the host's own rules untouched.
const localRulePrio = 5210

// Local is laptop-mode capture in force.
type Local struct {
	cfg LocalConfig
	log zerolog.Logger
	ns  netns.NsHandle
}

// SetupLocal routes cfg.CIDRs into the TUN. Whatever a crashed run left
// (its rules and routes are recognised by table and protocol) is removed
// first; on error nothing stays.
func SetupLocal(cfg LocalConfig, log zerolog.Logger) (*Local, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	link, err := netlink.LinkByName(cfg.TunName)
	if err != nil {
		return nil, fmt.Errorf("local capture: TUN %q: %w", cfg.TunName, err)
	}
	l := &Local{cfg: cfg, log: log}
	if l.ns, err = netns.Get(); err != nil {
		return nil, fmt.Errorf("local capture: network namespace: %w", err)
	}
	if err := l.remove(); err != nil {
		l.ns.Close()
		return nil, err
	}
	if err := l.install(link); err != nil {
		if rerr := l.remove(); rerr != nil {
			log.Error().Err(rerr).Msg("undoing a failed local capture setup")
		}
		l.ns.Close()
		return nil, err
	}
	log.Info().Str("tun", cfg.TunName).Interface("cidrs", cfg.CIDRs).Int("table", cfg.Table).Msg("local capture installed")
	return l, nil
}

func (l *Local) install(link netlink.Link) error {
	fams := map[int]bool{}
	for _, p := range l.cfg.CIDRs {
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Table: l.cfg.Table, Dst: prefixToIPNet(p),
			Protocol: rtProto, Scope: netlink.SCOPE_LINK}
		if err := netlink.RouteAdd(r); err != nil {
			return fmt.Errorf("local capture: route %v dev %s table %d: %w", p, l.cfg.TunName, l.cfg.Table, err)
		}
		fams[familyOf(p)] = true
	}
	for fam := range fams {
		r := netlink.NewRule()
		r.Family, r.Priority, r.Table = fam, localRulePrio, l.cfg.Table
		r.Mark, r.Mask, r.Invert = l.cfg.Mark, ptr(uint32(0xffffffff)), true
		if err := netlink.RuleAdd(r); err != nil {
			return fmt.Errorf("local capture: rule %d (%s): %w", localRulePrio, familyName(fam), err)
		}
	}
	return nil
}

func ptr[T any](v T) *T { return &v }

func familyOf(p netip.Prefix) int {
	if p.Addr().Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// remove deletes laptop mode's rules and routes: every rule pointing at
// its table from its priority, every route of its protocol in its table.
func (l *Local) remove() error {
	var errs []error
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			if errors.Is(err, unix.EAFNOSUPPORT) {
				continue
			}
			return fmt.Errorf("local capture: list %s rules: %w", familyName(fam), err)
		}
		for i := range rules {
			r := &rules[i]
			if r.Priority == localRulePrio && r.Table == l.cfg.Table {
				if err := netlink.RuleDel(r); err != nil && !errors.Is(err, unix.ENOENT) {
					errs = append(errs, fmt.Errorf("rule %d: %w", r.Priority, err))
				}
			}
		}
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: l.cfg.Table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return fmt.Errorf("local capture: list %s routes: %w", familyName(fam), err)
		}
		for i := range routes {
			if routes[i].Protocol == rtProto {
				if err := netlink.RouteDel(&routes[i]); err != nil && !errors.Is(err, unix.ESRCH) {
					errs = append(errs, fmt.Errorf("route %v: %w", routes[i].Dst, err))
				}
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("local capture: removing: %w", errors.Join(errs...))
	}
	return nil
}

// Teardown removes the rules and routes, from the namespace SetupLocal
// ran in, whichever thread calls it.
func (l *Local) Teardown() error {
	if !l.ns.IsOpen() {
		return nil
	}
	err := inNetns(l.ns, l.remove)
	l.ns.Close()
	l.ns = netns.None()
	if err == nil {
		l.log.Info().Str("tun", l.cfg.TunName).Msg("local capture removed")
	}
	return err
}

// DefaultInterface is 0 on Linux: the socket mark keeps the proxy's
// sockets off the capture routes, no interface pinning is needed.
func DefaultInterface() (int, error) { return 0, nil }
