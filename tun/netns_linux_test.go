package tun

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/netnstest"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// requireRoot stops a test that needs namespaces and /dev/net/tun where
// they are not available (netnstest.Require).
func requireRoot(t *testing.T) { netnstest.Require(t) }

// newNetns locks the test goroutine to its thread and moves the thread into
// a fresh network namespace until the test ends. Everything the test does
// on this goroutine — netlink calls, /proc/sys, TUN creation — happens in
// that namespace. The thread goes back to the original namespace at
// cleanup; if it cannot, it stays locked and dies with the goroutine.
func newNetns(t *testing.T) {
	t.Helper()
	netnstest.Enter(t)
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	mustSysctl(t, "net/ipv4/ip_local_port_range", "32768 60999")
}

// Addresses of the pod topology built by podNet.
var (
	podV4 = netip.MustParseAddr("10.200.0.2")
	podV6 = netip.MustParseAddr("fd00:200::2")
	gwV4  = netip.MustParseAddr("10.200.0.1")
	gwV6  = netip.MustParseAddr("fd00:200::1")
)

// podNet gives the namespace a pod's network: eth0 with 10.200.0.2/24
// and fd00:200::2/64 (no DAD) and default routes via .1. eth0 is a veth
// whose peer lives in a namespace of its own (this kernel may lack the
// dummy driver), so the pod namespace holds only the pod's devices.
func podNet(t *testing.T) netlink.Link {
	t.Helper()
	pod, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer pod.Close()
	peerNs, err := netns.New() // the thread is now in peerNs
	if err != nil {
		t.Fatal(err)
	}
	if err := netns.Set(pod); err != nil {
		t.Fatalf("back to the pod namespace: %v", err) // the thread stays locked and dies with the test
	}
	t.Cleanup(func() { peerNs.Close() })
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "gw0", PeerNamespace: netlink.NsFd(peerNs)}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add eth0: %v", err)
	}
	peers, err := netlink.NewHandleAt(peerNs)
	if err != nil {
		t.Fatal(err)
	}
	defer peers.Close()
	if gw, err := peers.LinkByName("gw0"); err != nil {
		t.Fatal(err)
	} else if err := peers.LinkSetUp(gw); err != nil {
		t.Fatal(err)
	}
	link, err := netlink.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []struct {
		p     string
		flags int
	}{{"10.200.0.2/24", 0}, {"fd00:200::2/64", unix.IFA_F_NODAD}} {
		if err := netlink.AddrAdd(link, &netlink.Addr{IPNet: prefixToIPNet(netip.MustParsePrefix(a.p)), Flags: a.flags}); err != nil {
			t.Fatalf("eth0 address %s: %v", a.p, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	// The kernel adds the IPv6 address's local route from a work queue
	// after the link comes up; wait for it (bounded) so that a test's
	// "before" snapshot is not taken in the middle.
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		rs, _ := netlink.RouteListFiltered(unix.AF_INET6, &netlink.Route{Table: unix.RT_TABLE_LOCAL, Dst: prefixToIPNet(netip.MustParsePrefix("fd00:200::2/128"))},
			netlink.RT_FILTER_TABLE|netlink.RT_FILTER_DST)
		if len(rs) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the IPv6 local route of eth0's address did not appear within 3s")
		}
	}
	for _, gw := range []netip.Addr{gwV4, gwV6} {
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Gw: gw.AsSlice(), Dst: defaultDst(gw.Is6())}
		if err := netlink.RouteAdd(r); err != nil {
			t.Fatalf("default route via %v: %v", gw, err)
		}
	}
	return link
}

func mustSysctl(t *testing.T, key, val string) {
	t.Helper()
	if err := writeSysctl("/proc/sys/"+key, val); err != nil {
		t.Fatalf("sysctl %s=%s: %v", key, val, err)
	}
}

func sysctl(t *testing.T, key string) string {
	t.Helper()
	v, err := readSysctl("/proc/sys/" + key)
	if err != nil {
		t.Fatalf("sysctl %s: %v", key, err)
	}
	return v
}

// netState is everything capture may change in a namespace: the policy
// rules and the routes of every table of both families, and the sysctls
// of the forwarding, filtering and router-advertisement family. Each rule
// and route line ends in a hash of the kernel's netlink message for it, so
// two states are equal only if the kernel reports identical objects, not
// merely ones that print alike.
type netState struct {
	Rules4, Rules6, Routes4, Routes6, Sysctls []string
}

func dumpState(t *testing.T) netState {
	t.Helper()
	var s netState
	s.Rules4, s.Rules6 = dumpRules(t, unix.AF_INET), dumpRules(t, unix.AF_INET6)
	s.Routes4, s.Routes6 = dumpRoutes(t, unix.AF_INET), dumpRoutes(t, unix.AF_INET6)
	var keys []string
	for _, pat := range []string{
		"net/ipv4/ip_forward",
		"net/ipv4/conf/*/rp_filter", "net/ipv4/conf/*/accept_local", "net/ipv4/conf/*/forwarding",
		"net/ipv4/conf/*/route_localnet",
		"net/ipv6/conf/*/forwarding", "net/ipv6/conf/*/accept_ra", "net/ipv6/conf/*/disable_ipv6",
	} {
		m, err := filepath.Glob("/proc/sys/" + pat)
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, m...)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v, err := readSysctl(k)
		if err != nil {
			t.Fatalf("sysctl %s: %v", k, err)
		}
		s.Sysctls = append(s.Sysctls, strings.TrimPrefix(k, "/proc/sys/")+" = "+v)
	}
	return s
}

// rawDump returns the payloads of a netlink dump of the given type.
func rawDump(t *testing.T, proto, family int, resType uint16) [][]byte {
	t.Helper()
	req := nl.NewNetlinkRequest(proto, unix.NLM_F_DUMP)
	msg := nl.NewRtMsg()
	msg.Family = uint8(family)
	msg.Protocol, msg.Scope, msg.Type = 0, 0, 0
	req.AddData(msg)
	msgs, err := req.Execute(unix.NETLINK_ROUTE, resType)
	if err != nil {
		t.Fatalf("netlink dump %d: %v", proto, err)
	}
	return msgs
}

func shortHash(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:5])
}

func dumpRules(t *testing.T, family int) []string {
	t.Helper()
	raw := rawDump(t, unix.RTM_GETRULE, family, unix.RTM_NEWRULE)
	rules, err := netlink.RuleList(family)
	if err != nil {
		t.Fatal(err)
	}
	if len(raw) != len(rules) {
		t.Fatalf("rule dumps disagree: %d raw, %d parsed", len(raw), len(rules))
	}
	out := make([]string, len(rules))
	for i := range rules {
		out[i] = fmtRule(rules[i]) + " #" + shortHash(raw[i])
	}
	return out
}

// dumpRoutes lists the routes of all tables, each with the hash of its
// message minus the cache info (use counters, not configuration).
func dumpRoutes(t *testing.T, family int) []string {
	t.Helper()
	var out []string
	for _, m := range rawDump(t, unix.RTM_GETROUTE, family, unix.RTM_NEWROUTE) {
		rt := nl.DeserializeRtMsg(m)
		attrs, err := nl.ParseRouteAttr(m[unix.SizeofRtMsg:])
		if err != nil {
			t.Fatal(err)
		}
		table := uint32(rt.Table)
		dst, via, dev, src, metric := "default", "", "", "", ""
		h := sha256.New()
		h.Write(m[:unix.SizeofRtMsg])
		for _, a := range attrs {
			if a.Attr.Type == unix.RTA_CACHEINFO {
				continue
			}
			var hdr [4]byte
			binary.NativeEndian.PutUint16(hdr[:], a.Attr.Type)
			h.Write(hdr[:])
			h.Write(a.Value)
			switch a.Attr.Type {
			case unix.RTA_TABLE:
				table = binary.NativeEndian.Uint32(a.Value)
			case unix.RTA_DST:
				dst = fmt.Sprintf("%v/%d", net.IP(a.Value), rt.Dst_len)
			case unix.RTA_GATEWAY:
				via = fmt.Sprintf(" via %v", net.IP(a.Value))
			case unix.RTA_OIF:
				dev = " dev " + ifName(int(binary.NativeEndian.Uint32(a.Value)))
			case unix.RTA_PREFSRC:
				src = fmt.Sprintf(" src %v", net.IP(a.Value))
			case unix.RTA_PRIORITY:
				metric = fmt.Sprintf(" metric %d", binary.NativeEndian.Uint32(a.Value))
			}
		}
		out = append(out, fmt.Sprintf("table %d type %d %s%s%s%s%s proto %d scope %d #%s",
			table, rt.Type, dst, via, dev, src, metric, rt.Protocol, rt.Scope, hex.EncodeToString(h.Sum(nil)[:5])))
	}
	return out
}

func ifName(index int) string {
	l, err := netlink.LinkByIndex(index)
	if err != nil {
		return fmt.Sprintf("if%d", index)
	}
	return l.Attrs().Name
}

// fmtRule prints a rule much as `ip rule` does, with its protocol.
func fmtRule(r netlink.Rule) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d:", r.Priority)
	if r.Src != nil {
		fmt.Fprintf(&b, " from %v", r.Src)
	}
	if r.Dst != nil {
		fmt.Fprintf(&b, " to %v", r.Dst)
	}
	if r.Mark != 0 || r.Mask != nil {
		fmt.Fprintf(&b, " fwmark %#x", r.Mark)
		if r.Mask != nil {
			fmt.Fprintf(&b, "/%#x", *r.Mask)
		}
	}
	if r.IifName != "" {
		fmt.Fprintf(&b, " iif %s", r.IifName)
	}
	if r.OifName != "" {
		fmt.Fprintf(&b, " oif %s", r.OifName)
	}
	switch r.IPProto {
	case 0:
	case unix.IPPROTO_TCP:
		b.WriteString(" ipproto tcp")
	case unix.IPPROTO_UDP:
		b.WriteString(" ipproto udp")
	default:
		fmt.Fprintf(&b, " ipproto %d", r.IPProto)
	}
	if r.Sport != nil {
		fmt.Fprintf(&b, " sport %s", PortRange{r.Sport.Start, r.Sport.End})
	}
	if r.Dport != nil {
		fmt.Fprintf(&b, " dport %s", PortRange{r.Dport.Start, r.Dport.End})
	}
	switch {
	case r.Goto >= 0:
		fmt.Fprintf(&b, " goto %d", r.Goto)
	case r.Table == unix.RT_TABLE_LOCAL:
		b.WriteString(" lookup local")
	case r.Table == unix.RT_TABLE_MAIN:
		b.WriteString(" lookup main")
	case r.Table == unix.RT_TABLE_DEFAULT:
		b.WriteString(" lookup default")
	default:
		fmt.Fprintf(&b, " lookup %d", r.Table)
	}
	fmt.Fprintf(&b, " proto %d", r.Protocol)
	return b.String()
}

// diffState lists what differs between two states, "" if nothing.
func diffState(a, b netState) string {
	var out []string
	for _, p := range []struct {
		name string
		a, b []string
	}{
		{"ipv4 rules", a.Rules4, b.Rules4}, {"ipv6 rules", a.Rules6, b.Rules6},
		{"ipv4 routes", a.Routes4, b.Routes4}, {"ipv6 routes", a.Routes6, b.Routes6},
		{"sysctls", a.Sysctls, b.Sysctls},
	} {
		if slices.Equal(p.a, p.b) {
			continue
		}
		out = append(out, "## "+p.name+" (- first, + second)")
		for _, l := range p.a {
			if !slices.Contains(p.b, l) {
				out = append(out, "- "+l)
			}
		}
		for _, l := range p.b {
			if !slices.Contains(p.a, l) {
				out = append(out, "+ "+l)
			}
		}
		if out[len(out)-1] == "## "+p.name+" (- first, + second)" {
			out = append(out, "  (same lines, other order)")
		}
	}
	return strings.Join(out, "\n")
}

// routeQuery is a route lookup the kernel answers as it would for a
// packet (RTM_GETROUTE with protocol and ports): with Iif, as a packet
// arriving on that interface, else as one sent by a local socket.
type routeQuery struct {
	Dst, Src     netip.Addr
	Iif          string
	Mark         uint32
	Proto        uint8
	Sport, Dport uint16
}

func (q routeQuery) String() string {
	s := fmt.Sprintf("proto %d %v:%d -> %v:%d", q.Proto, q.Src, q.Sport, q.Dst, q.Dport)
	if q.Iif != "" {
		s += " iif " + q.Iif
	}
	if q.Mark != 0 {
		s += fmt.Sprintf(" mark %#x", q.Mark)
	}
	return s
}

// routeResult is where the kernel sends the packet.
type routeResult struct {
	Table int
	Type  int // RTN_*
	Dev   string
}

func (r routeResult) String() string {
	return fmt.Sprintf("table %d type %d dev %s", r.Table, r.Type, r.Dev)
}

func routeGet(q routeQuery) (routeResult, error) {
	family, bits := unix.AF_INET, 32
	if q.Dst.Is6() {
		family, bits = unix.AF_INET6, 128
	}
	req := nl.NewNetlinkRequest(unix.RTM_GETROUTE, unix.NLM_F_ACK)
	msg := nl.NewRtMsg()
	msg.Family, msg.Dst_len = uint8(family), uint8(bits)
	msg.Flags = unix.RTM_F_LOOKUP_TABLE
	msg.Protocol, msg.Scope, msg.Type, msg.Table = 0, 0, 0, 0
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.RTA_DST, q.Dst.AsSlice()))
	if q.Src.IsValid() {
		msg.Src_len = uint8(bits)
		req.AddData(nl.NewRtAttr(unix.RTA_SRC, q.Src.AsSlice()))
	}
	if q.Iif != "" {
		l, err := netlink.LinkByName(q.Iif)
		if err != nil {
			return routeResult{}, err
		}
		req.AddData(nl.NewRtAttr(unix.RTA_IIF, nl.Uint32Attr(uint32(l.Attrs().Index))))
	}
	if q.Mark != 0 {
		req.AddData(nl.NewRtAttr(unix.RTA_MARK, nl.Uint32Attr(q.Mark)))
	}
	if q.Proto != 0 {
		req.AddData(nl.NewRtAttr(unix.RTA_IP_PROTO, []byte{q.Proto}))
	}
	if q.Sport != 0 {
		req.AddData(nl.NewRtAttr(unix.RTA_SPORT, binary.BigEndian.AppendUint16(nil, q.Sport)))
	}
	if q.Dport != 0 {
		req.AddData(nl.NewRtAttr(unix.RTA_DPORT, binary.BigEndian.AppendUint16(nil, q.Dport)))
	}
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWROUTE)
	if err != nil {
		return routeResult{}, err
	}
	if len(msgs) != 1 {
		return routeResult{}, fmt.Errorf("%d answers", len(msgs))
	}
	rt := nl.DeserializeRtMsg(msgs[0])
	res := routeResult{Table: int(rt.Table), Type: int(rt.Type)}
	attrs, err := nl.ParseRouteAttr(msgs[0][unix.SizeofRtMsg:])
	if err != nil {
		return routeResult{}, err
	}
	for _, a := range attrs {
		switch a.Attr.Type {
		case unix.RTA_TABLE:
			res.Table = int(binary.NativeEndian.Uint32(a.Value))
		case unix.RTA_OIF:
			res.Dev = ifName(int(binary.NativeEndian.Uint32(a.Value)))
		}
	}
	return res, nil
}
