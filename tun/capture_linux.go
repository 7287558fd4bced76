package tun

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The rule block sits at the head of the rule list, in front of the
// kernel's "lookup local", which moves from priority 0 to prioLocal: inbound
// TCP for the pod's own address must be routed into the TUN before the
// local table would deliver it to the pod's sockets.
const (
	prioMark       = 10 // fwmark <mark> goto prioLocal: the proxy's own sockets
	prioLocalOut   = 11 // iif lo lookup local: local destinations stay local
	prioExcludeOut = 12 // iif lo, excluded CIDR/port or server source port: goto prioLocal
	prioCaptureOut = 13 // iif lo ipproto tcp|udp lookup <table>
	prioExcludeIn  = 14 // iif <pod if> ipproto tcp dport <excluded>: goto prioLocal
	prioCaptureIn  = 15 // iif <pod if> ipproto tcp to <pod IP> dport <server ports> lookup <table>
	prioLocal      = 20 // lookup local, moved from 0

	// rtProto tags every rule and route capture adds (rtm_protocol), so the
	// cleanup after a crash finds exactly its own and nothing else.
	rtProto = 0x6d
)

// alwaysExcludedOut are destinations never captured: multicast, broadcast
// and IPv6 link-local traffic is not a flow to proxy.
var alwaysExcludedOut = []netip.Prefix{
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("255.255.255.255/32"),
	netip.MustParsePrefix("ff00::/8"),
	netip.MustParsePrefix("fe80::/10"),
}

// sysctlChange is one recorded sysctl value, restored at teardown.
type sysctlChange struct {
	Path string `json:"path"`
	Old  string `json:"old"`
}

// state is what setup changed, written before the change, so that the
// next setup can undo a crashed run exactly.
type state struct {
	Tun     string         `json:"tun"`
	Table   int            `json:"table"`
	Sysctls []sysctlChange `json:"sysctls"`
	// LocalRuleProto is the protocol of the "0: lookup local" rule
	// capture moved, per family ("ipv4", "ipv6"): RTPROT_KERNEL unless
	// someone re-created the rule.
	LocalRuleProto map[string]uint8 `json:"local_rule_proto,omitempty"`
	// NetnsCookie identifies the namespace the record is about. The file
	// name has the namespace's inode number, which a later namespace may
	// be given again; the cookie is never reused.
	NetnsCookie uint64 `json:"netns_cookie,omitempty"`
}

// netnsCookie identifies the calling thread's network namespace for the
// lifetime of the system (SO_NETNS_COOKIE, Linux 5.14); 0 if unknown.
func netnsCookie() uint64 {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0
	}
	return c
}

// statePath names the record after the network namespace (its inode), so
// proxies in several namespaces of one host — tests, or pods sharing a
// host path — never read each other's record.
func statePath(dir string) string {
	var st unix.Stat_t
	name := "capture.json"
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err == nil {
		name = fmt.Sprintf("capture-netns-%d.json", st.Ino)
	}
	return filepath.Join(dir, name)
}

// SetupCapture installs sidecar capture in the calling thread's network
// namespace. It first removes what a crashed run may have left, so calling
// it twice yields one set of rules. On error, whatever it did is undone.
func SetupCapture(cfg CaptureConfig, log zerolog.Logger) (*Capture, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	// Every netlink socket and /proc/sys file below belongs to the
	// namespace of the thread that opens it: stay on one thread.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := CleanupStale(cfg.StateDir, log); err != nil {
		return nil, err
	}
	tunLink, err := netlink.LinkByName(cfg.TunName)
	if err != nil {
		return nil, fmt.Errorf("capture: TUN %q: %w", cfg.TunName, err)
	}
	c := &Capture{cfg: cfg, log: log}
	if c.podIf, c.podIPs, err = PodAddrs(cfg.PodInterface, cfg.PodIPs); err != nil {
		return nil, err
	}
	if c.serverPorts, err = serverPorts(); err != nil {
		return nil, err
	}
	if c.ns, err = netns.Get(); err != nil {
		return nil, fmt.Errorf("capture: network namespace: %w", err)
	}
	if err := c.install(tunLink); err != nil {
		if terr := c.Teardown(); terr != nil {
			log.Error().Err(terr).Msg("undoing a failed capture setup")
			c.ns.Close()
		}
		return nil, err
	}
	log.Info().Str("tun", cfg.TunName).Str("pod_interface", c.podIf).Interface("pod_ips", c.podIPs).
		Int("table", cfg.Table).Bool("inbound", cfg.Inbound).Msg("capture installed")
	return c, nil
}

func (c *Capture) has(v6 bool) (netip.Addr, bool) {
	for _, ip := range c.podIPs {
		if ip.Is6() == v6 {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

func (c *Capture) install(tunLink netlink.Link) error {
	cfg := &c.cfg

	// 1. Record what changes, then set the sysctls.
	st := state{Tun: cfg.TunName, Table: cfg.Table, LocalRuleProto: map[string]uint8{}, NetnsCookie: netnsCookie()}
	movedLocal := map[int]*netlink.Rule{}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			return fmt.Errorf("capture: listing %s rules: %w", familyName(fam), err)
		}
		if r := localRuleAtZero(rules); r != nil {
			movedLocal[fam] = r
			st.LocalRuleProto[familyName(fam)] = r.Protocol
		}
	}
	wants := c.sysctls()
	for _, w := range wants {
		old, err := readSysctl(w.path)
		if err != nil {
			return fmt.Errorf("capture: sysctl %s: %w", w.path, err)
		}
		if old != w.val || w.recordOnly {
			st.Sysctls = append(st.Sysctls, sysctlChange{Path: w.path, Old: old})
		}
	}
	if err := writeState(cfg.StateDir, &st); err != nil {
		return err
	}
	for _, w := range wants {
		if w.recordOnly {
			continue
		}
		if err := writeSysctl(w.path, w.val); err != nil {
			return fmt.Errorf("capture: sysctl %s=%s: %w", w.path, w.val, err)
		}
	}

	// 2. The capture table: everything routed there goes into the TUN.
	for _, v6 := range []bool{false, true} {
		r, err := c.setTunRoute(tunLink, v6, netlink.RouteAdd)
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("capture: table %d already has a default route capture did not add; set another Table", cfg.Table)
		}
		if err != nil {
			return fmt.Errorf("capture: route %v in table %d: %w", r.Dst, cfg.Table, err)
		}
	}

	// 3. Move "lookup local" behind the capture rules: add ours first, so
	// that local delivery never lapses, then delete the one at 0. Where
	// there is none at 0, whoever moved it put it behind ours, or it
	// would never have been at 0.
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		local := newRule(fam, prioLocal)
		local.Table = unix.RT_TABLE_LOCAL
		if err := netlink.RuleAdd(local); err != nil {
			return fmt.Errorf("capture: rule %s: %w", describe(local), err)
		}
		if orig := movedLocal[fam]; orig != nil {
			if err := netlink.RuleDel(orig); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("capture: moving the %s local rule from priority 0: %w", familyName(fam), err)
			}
		}
	}

	// 4. The capture rules.
	for _, r := range c.rules() {
		if err := netlink.RuleAdd(r); err != nil {
			return fmt.Errorf("capture: rule %s: %w", describe(r), err)
		}
	}
	return nil
}

// setTunRoute adds (or, with netlink.RouteReplace, puts back) the capture
// table's default route of one family: into the TUN, from the pod's
// address of that family when it has one.
func (c *Capture) setTunRoute(tunLink netlink.Link, v6 bool, set func(*netlink.Route) error) (*netlink.Route, error) {
	r := &netlink.Route{
		LinkIndex: tunLink.Attrs().Index,
		Table:     c.cfg.Table,
		Dst:       defaultDst(v6),
		Protocol:  rtProto,
		Scope:     netlink.SCOPE_UNIVERSE,
	}
	if ip, ok := c.has(v6); ok {
		r.Src = ip.AsSlice()
	}
	err := set(r)
	if err != nil && v6 && r.Src != nil && errors.Is(err, unix.EINVAL) {
		// The kernel refuses a source address that is still tentative
		// (DAD running); source selection picks it later anyway.
		c.log.Warn().Err(err).Str("src", net.IP(r.Src).String()).
			Msg("IPv6 capture route without a source address: the pod address is not usable yet")
		r.Src = nil
		err = set(r)
	}
	return r, err
}

// rulePorts converts a port range for a rule. The kernel refuses a range
// ending at 65535 (fib_rule_port_range_valid), so that port is left out.
func rulePorts(pr PortRange) *netlink.RulePortRange {
	return netlink.NewRulePortRange(pr.Start, min(pr.End, 65534))
}

func newRule(family, prio int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = family
	r.Priority = prio
	r.Protocol = rtProto
	return r
}

// rules returns the capture rules for both families (see the prio* consts).
func (c *Capture) rules() []*netlink.Rule {
	cfg := &c.cfg
	var out []*netlink.Rule
	mask := cfg.MarkMask
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		v6 := fam == unix.AF_INET6
		gotoLocal := func(prio int) *netlink.Rule {
			r := newRule(fam, prio)
			r.Goto = prioLocal
			return r
		}
		r := gotoLocal(prioMark)
		r.Mark, r.Mask = cfg.Mark, &mask
		out = append(out, r)
		if cfg.OwnerUID > 0 {
			// The unprivileged sidecar cannot mark its sockets (SO_MARK
			// needs CAP_NET_ADMIN): its user is exempt instead, as
			// istio-iptables exempts uid 1337.
			r = gotoLocal(prioMark)
			r.UIDRange = netlink.NewRuleUIDRange(uint32(cfg.OwnerUID), uint32(cfg.OwnerUID))
			out = append(out, r)
		}

		r = newRule(fam, prioLocalOut)
		r.IifName, r.Table = "lo", unix.RT_TABLE_LOCAL
		out = append(out, r)

		for _, p := range append(append([]netip.Prefix(nil), alwaysExcludedOut...), cfg.ExcludeOutboundCIDRs...) {
			if p.Addr().Is6() != v6 {
				continue
			}
			r = gotoLocal(prioExcludeOut)
			r.IifName, r.Dst = "lo", prefixToIPNet(p)
			out = append(out, r)
		}
		for _, pr := range cfg.ExcludeOutboundPorts {
			if pr.Start == 65535 {
				continue // not expressible in a rule; see rulePorts
			}
			for _, proto := range []int{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
				r = gotoLocal(prioExcludeOut)
				r.IifName, r.IPProto = "lo", proto
				r.Dport = rulePorts(pr)
				out = append(out, r)
			}
		}
		// Server-side source ports: replies of connections accepted here.
		for _, pr := range c.serverPorts {
			for _, proto := range []int{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
				r = gotoLocal(prioExcludeOut)
				r.IifName, r.IPProto = "lo", proto
				r.Sport = rulePorts(pr)
				out = append(out, r)
			}
		}
		for _, proto := range []int{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
			r = newRule(fam, prioCaptureOut)
			r.IifName, r.IPProto, r.Table = "lo", proto, cfg.Table
			out = append(out, r)
		}
		if !cfg.Inbound {
			continue
		}
		for _, pr := range append(AlwaysExcludedInboundPorts(), cfg.ExcludeInboundPorts...) {
			if pr.Start == 65535 {
				continue
			}
			r = gotoLocal(prioExcludeIn)
			r.IifName, r.IPProto = c.podIf, unix.IPPROTO_TCP
			r.Dport = rulePorts(pr)
			out = append(out, r)
		}
		for _, ip := range c.podIPs {
			if ip.Is6() != v6 {
				continue
			}
			for _, pr := range c.serverPorts {
				r = newRule(fam, prioCaptureIn)
				r.IifName, r.IPProto, r.Table = c.podIf, unix.IPPROTO_TCP, cfg.Table
				r.Dst = prefixToIPNet(netip.PrefixFrom(ip, ip.BitLen()))
				r.Dport = rulePorts(pr)
				out = append(out, r)
			}
		}
	}
	return out
}

// Teardown removes the rules and routes and restores the sysctls and the
// local rule exactly. It acts on the namespace capture was set up in,
// from any goroutine. It is idempotent; after an error it may be retried.
func (c *Capture) Teardown() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.undone {
		return nil
	}
	err := inNetns(c.ns, func() error { return CleanupStale(c.cfg.StateDir, c.log) })
	if err != nil {
		return err
	}
	c.undone = true
	c.ns.Close()
	c.log.Info().Str("tun", c.cfg.TunName).Msg("capture removed")
	return nil
}

// inNetns runs fn on a thread in the network namespace ns.
func inNetns(ns netns.NsHandle, fn func() error) error {
	runtime.LockOSThread()
	cur, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("capture: network namespace: %w", err)
	}
	defer cur.Close()
	if cur.Equal(ns) {
		defer runtime.UnlockOSThread()
		return fn()
	}
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("capture: entering its network namespace: %w", err)
	}
	defer func() {
		// A thread that cannot go back stays locked: the runtime ends it
		// with this goroutine instead of reusing it in the wrong namespace.
		if netns.Set(cur) == nil {
			runtime.UnlockOSThread()
		}
	}()
	return fn()
}

// CleanupStale removes every rule and route tagged as capture's, puts
// "lookup local" back at priority 0 if capture had moved it, and restores
// the sysctls recorded in stateDir by the run that installed them (a
// crashed one included). It acts on the calling thread's namespace.
func CleanupStale(stateDir string, log zerolog.Logger) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var errs []error
	st, err := readState(stateDir)
	if err != nil {
		errs = append(errs, err)
	}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			errs = append(errs, fmt.Errorf("capture: listing %s rules: %w", familyName(fam), err))
			continue
		}
		// Local rule first, so local delivery never lapses.
		proto := uint8(unix.RTPROT_KERNEL)
		if p, ok := st.localRuleProto(fam); ok {
			proto = p
		}
		if err := restoreLocalRule(fam, rules, proto); err != nil {
			errs = append(errs, err)
		}
		n := 0
		for i := range rules {
			if rules[i].Protocol != rtProto {
				continue
			}
			if err := netlink.RuleDel(&rules[i]); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("capture: deleting rule %s: %w", describe(&rules[i]), err))
			}
			n++
		}
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: rtProto},
			netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			errs = append(errs, fmt.Errorf("capture: listing %s routes: %w", familyName(fam), err))
			continue
		}
		for i := range routes {
			if err := netlink.RouteDel(&routes[i]); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("capture: deleting route %v table %d: %w", routes[i].Dst, routes[i].Table, err))
			}
			n++
		}
		if n > 0 {
			log.Info().Str("family", familyName(fam)).Int("removed", n).Msg("capture rules and routes removed")
		}
	}
	if st != nil {
		// In reverse: a global switch (ipv6 all.forwarding) is restored
		// before the per-device values it overwrote.
		for i := len(st.Sysctls) - 1; i >= 0; i-- {
			s := st.Sysctls[i]
			if err := writeSysctl(s.Path, s.Old); err != nil && !errors.Is(err, os.ErrNotExist) {
				// A sysctl of the TUN device is gone with the device.
				errs = append(errs, fmt.Errorf("capture: restoring %s=%s: %w", s.Path, s.Old, err))
			}
		}
		if len(errs) == 0 {
			if err := os.Remove(statePath(stateDir)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("capture: state: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}

// localRuleAtZero finds "0: from all lookup local" (not capture's).
func localRuleAtZero(rules []netlink.Rule) *netlink.Rule {
	for i, r := range rules {
		if r.Priority == 0 && r.Table == unix.RT_TABLE_LOCAL && r.Protocol != rtProto && r.Goto < 0 &&
			r.Src == nil && r.Dst == nil && r.IifName == "" && r.OifName == "" && r.Mark == 0 && r.IPProto == 0 {
			return &rules[i]
		}
	}
	return nil
}

func (st *state) localRuleProto(fam int) (uint8, bool) {
	if st == nil {
		return 0, false
	}
	p, ok := st.LocalRuleProto[familyName(fam)]
	return p, ok
}

// restoreLocalRule puts "0: from all lookup local" back, with protocol
// proto, if capture moved it: capture's own local rule is there and no
// other is. Where someone else had moved the rule, it stays where they
// put it.
func restoreLocalRule(fam int, rules []netlink.Rule, proto uint8) error {
	ours := false
	for _, r := range rules {
		if r.Table != unix.RT_TABLE_LOCAL || r.Goto >= 0 {
			continue
		}
		if r.Protocol != rtProto {
			return nil
		}
		ours = ours || r.Priority == prioLocal
	}
	if !ours {
		return nil
	}
	r := netlink.NewRule()
	r.Family, r.Priority, r.Table = fam, 0, unix.RT_TABLE_LOCAL
	r.Protocol = proto
	if err := netlink.RuleAdd(r); err != nil {
		return fmt.Errorf("capture: restoring the %s local rule at priority 0: %w", familyName(fam), err)
	}
	return nil
}

func familyName(fam int) string {
	if fam == unix.AF_INET6 {
		return "ipv6"
	}
	return "ipv4"
}

// sysctlWant is a sysctl value capture needs. recordOnly values are not
// written but change with another (ipv6 all.forwarding sets every
// device's); their old value is recorded to be restored.
type sysctlWant struct {
	path, val  string
	recordOnly bool
}

// sysctls lists the sysctl values capture needs, in the order to set them.
func (c *Capture) sysctls() []sysctlWant {
	cfg := &c.cfg
	conf4 := func(dev, key string) string { return "/proc/sys/net/ipv4/conf/" + dev + "/" + key }
	conf6 := func(dev, key string) string { return "/proc/sys/net/ipv6/conf/" + dev + "/" + key }
	wants := []sysctlWant{
		// Replies of inbound flows leave the stack with the pod IP as
		// source, arriving on the TUN.
		{path: conf4(cfg.TunName, "accept_local"), val: "1"},
		{path: conf4(cfg.TunName, "rp_filter"), val: "0"},
	}
	if v, err := readSysctl(conf4("all", "rp_filter")); err == nil && v == "1" {
		// The effective rp_filter is max(all, dev): strict would drop them.
		wants = append(wants, sysctlWant{path: conf4("all", "rp_filter"), val: "2"})
	}
	if !cfg.Inbound {
		return wants
	}
	// Inbound packets are forwarded pod-if → TUN, replies TUN → pod-if.
	wants = append(wants,
		sysctlWant{path: conf4(c.podIf, "forwarding"), val: "1"},
		sysctlWant{path: conf4(cfg.TunName, "forwarding"), val: "1"})
	if _, hasV6 := c.has(true); !hasV6 {
		return wants
	}
	// IPv6 forwarding is only checked globally. Keep accepting router
	// advertisements on the pod interface if it did: accept_ra=1 stops
	// when forwarding.
	if v, err := readSysctl(conf6(c.podIf, "accept_ra")); err == nil && v == "1" {
		wants = append(wants, sysctlWant{path: conf6(c.podIf, "accept_ra"), val: "2"})
	}
	if v, err := readSysctl(conf6("all", "forwarding")); err == nil && v != "1" {
		// Writing all.forwarding overwrites default.forwarding and every
		// device's value.
		devs, _ := os.ReadDir("/proc/sys/net/ipv6/conf")
		for _, d := range devs {
			if d.Name() != "all" {
				wants = append(wants, sysctlWant{path: conf6(d.Name(), "forwarding"), val: "1", recordOnly: true})
			}
		}
	}
	return append(wants, sysctlWant{path: conf6("all", "forwarding"), val: "1"})
}

// serverPorts splits the port space at the local ephemeral range
// (net.ipv4.ip_local_port_range, which IPv6 shares): ports inside it are
// the client side of connections this host opens, ports outside it the
// server side of connections it accepts.
//
// Policy routing sees packets, not connections, and without conntrack a
// reply would be taken for a new flow: the SYN-ACK of the proxy's own
// upstream connection arriving on the pod interface, or an app's answer
// on a connection that was not captured inbound (an excluded port, the
// admin ports). Replies always travel between a server port and a client
// port, so packets from a server port leave uncaptured, and inbound
// capture covers only server ports: no reply matches a capture rule.
// (Outbound capture cannot instead match client source ports: IPv6
// connect() routes before choosing its port, with source port 0, and a
// rule's port range cannot start at 0.)
// The cost: an app listening inside the ephemeral range is not captured
// inbound, and an outbound connection bound to a fixed source port outside
// it is not captured (README, "Capture").
func serverPorts() ([]PortRange, error) {
	v, err := readSysctl("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return nil, fmt.Errorf("capture: %w", err)
	}
	var lo, hi int
	if _, err := fmt.Sscanf(v, "%d %d", &lo, &hi); err != nil || lo < 1 || hi > 65535 || lo > hi {
		return nil, fmt.Errorf("capture: net.ipv4.ip_local_port_range %q: want two ports", v)
	}
	var out []PortRange
	if lo > 1 {
		out = append(out, PortRange{1, uint16(lo - 1)})
	}
	if hi < 65534 {
		out = append(out, PortRange{uint16(hi + 1), 65534})
	}
	return out, nil
}

func defaultDst(v6 bool) *net.IPNet {
	if v6 {
		return &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
}

// PodAddrs is the pod interface and addresses SetupCapture uses for
// CaptureConfig.PodInterface iface and PodIPs ips: iface, else the default
// route's; ips, else iface's global unicast addresses. It reads the host
// and changes nothing, so the proxy can build what must know the pod's
// addresses (which flows are inbound) before capture is installed, and a
// start that fails then leaves nothing to undo.
func PodAddrs(iface string, ips []netip.Addr) (string, []netip.Addr, error) {
	var err error
	if iface == "" {
		if iface, err = defaultRouteInterface(); err != nil {
			return "", nil, err
		}
	}
	link, err := netlink.LinkByName(iface)
	if err != nil {
		return "", nil, fmt.Errorf("capture: pod interface %q: %w", iface, err)
	}
	if len(ips) > 0 {
		return iface, slices.Clone(ips), nil
	}
	if ips, err = globalAddrs(link); err != nil {
		return "", nil, err
	}
	return iface, ips, nil
}

// defaultRouteInterface is the interface of the main table's default route,
// IPv4 first.
func defaultRouteInterface() (string, error) {
	for _, v6 := range []bool{false, true} {
		routes, err := DefaultRoutes(v6)
		if err != nil {
			return "", fmt.Errorf("capture: %w", err)
		}
		for _, r := range routes {
			if r.Ifindex > 0 {
				if l, err := netlink.LinkByIndex(r.Ifindex); err == nil {
					return l.Attrs().Name, nil
				}
			}
		}
	}
	return "", errors.New("capture: no default route to find the pod interface; set it explicitly")
}

func globalAddrs(l netlink.Link) ([]netip.Addr, error) {
	addrs, err := netlink.AddrList(l, unix.AF_UNSPEC)
	if err != nil {
		return nil, fmt.Errorf("capture: addresses of %s: %w", l.Attrs().Name, err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if ok && ip.Unmap().IsGlobalUnicast() {
			out = append(out, ip.Unmap())
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("capture: %s has no global unicast address; set the pod IPs explicitly", l.Attrs().Name)
	}
	return out, nil
}

func describe(r *netlink.Rule) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d:", r.Priority)
	if r.Mark != 0 {
		fmt.Fprintf(&b, " fwmark %#x", r.Mark)
	}
	if r.UIDRange != nil {
		fmt.Fprintf(&b, " uidrange %d-%d", r.UIDRange.Start, r.UIDRange.End)
	}
	if r.IifName != "" {
		fmt.Fprintf(&b, " iif %s", r.IifName)
	}
	if r.Dst != nil {
		fmt.Fprintf(&b, " to %v", r.Dst)
	}
	if r.IPProto != 0 {
		fmt.Fprintf(&b, " ipproto %d", r.IPProto)
	}
	if r.Dport != nil {
		fmt.Fprintf(&b, " dport %d-%d", r.Dport.Start, r.Dport.End)
	}
	if r.Goto >= 0 {
		fmt.Fprintf(&b, " goto %d", r.Goto)
	} else {
		fmt.Fprintf(&b, " lookup %d", r.Table)
	}
	return b.String()
}

func readSysctl(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}

func writeSysctl(path, val string) error {
	return os.WriteFile(path, []byte(val), 0)
}

func readState(dir string) (*state, error) {
	b, err := os.ReadFile(statePath(dir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("capture: state: %w", err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("capture: state %s: %w", statePath(dir), err)
	}
	if cur := netnsCookie(); st.NetnsCookie != 0 && cur != 0 && st.NetnsCookie != cur {
		// Left by a namespace that is gone and had this inode number:
		// what it changed went with it.
		if err := os.Remove(statePath(dir)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("capture: state: %w", err)
		}
		return nil, nil
	}
	return &st, nil
}

// writeState records st atomically (write to a temp file, rename).
func writeState(dir string, st *state) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("capture: state dir: %w", err)
	}
	b, _ := json.Marshal(st)
	tmp := statePath(dir) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("capture: state: %w", err)
	}
	if err := os.Rename(tmp, statePath(dir)); err != nil {
		return fmt.Errorf("capture: state: %w", err)
	}
	return nil
}
