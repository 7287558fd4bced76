package tun

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/rs/zerolog"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// openTun opens the TUN device in the test's namespace, closed at cleanup.
func openTun(t *testing.T) *Device {
	t.Helper()
	dev, err := Open(DeviceConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	return dev
}

func testLogger(t *testing.T) zerolog.Logger {
	return zerolog.New(zerolog.NewTestWriter(t))
}

// stripHashes drops the message hashes dumpState appends, for comparing
// with hand-written expectations.
func stripHashes(lines []string) []string {
	out := make([]string, 0, len(lines))
	for _, l := range lines {
		if i := strings.LastIndex(l, " #"); i >= 0 {
			l = l[:i]
		}
		out = append(out, l)
	}
	return out
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func expectLines(t *testing.T, what string, got, want []string) {
	t.Helper()
	got, want = sorted(stripHashes(got)), sorted(want)
	if slices.Equal(got, want) {
		return
	}
	var b strings.Builder
	for _, l := range want {
		if !slices.Contains(got, l) {
			b.WriteString("\n  missing: " + l)
		}
	}
	for _, l := range got {
		if !slices.Contains(want, l) {
			b.WriteString("\n  unexpected: " + l)
		}
	}
	if b.Len() == 0 {
		b.WriteString("\n  (duplicates differ)")
	}
	t.Errorf("%s:%s\ngot:\n  %s", what, b.String(), strings.Join(got, "\n  "))
}

func filterLines(lines []string, prefix string) []string {
	var out []string
	for _, l := range lines {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return out
}

func mustNotDiffer(t *testing.T, what string, a, b netState) {
	t.Helper()
	if d := diffState(a, b); d != "" {
		t.Fatalf("%s:\n%s", what, d)
	}
}

var testCaptureConfig = CaptureConfig{
	TunName:              "meshtun0",
	Inbound:              true,
	ExcludeOutboundPorts: []PortRange{{3306, 3306}, {8000, 8100}},
	ExcludeOutboundCIDRs: []netip.Prefix{netip.MustParsePrefix("10.99.0.0/16"), netip.MustParsePrefix("fd99::/16")},
	ExcludeInboundPorts:  []PortRange{{9091, 9091}},
}

func captureConfig(t *testing.T) CaptureConfig {
	cfg := testCaptureConfig
	cfg.StateDir = t.TempDir()
	return cfg
}

// wantRules is the full rule list expected for testCaptureConfig on the
// podNet topology, with ip_local_port_range 32768-60999.
func wantRules(v6 bool) []string {
	pod, mcast, other := "10.200.0.2/32", []string{"224.0.0.0/4", "255.255.255.255/32"}, "10.99.0.0/16"
	if v6 {
		pod, mcast, other = "fd00:200::2/128", []string{"ff00::/8", "fe80::/10"}, "fd99::/16"
	}
	rules := []string{
		"10: fwmark 0x539/0xffffffff goto 20 proto 109",
		"11: iif lo lookup local proto 109",
	}
	for _, p := range append(mcast, other) {
		rules = append(rules, "12: to "+p+" iif lo goto 20 proto 109")
	}
	for _, proto := range []string{"tcp", "udp"} {
		rules = append(rules,
			"12: iif lo ipproto "+proto+" dport 3306 goto 20 proto 109",
			"12: iif lo ipproto "+proto+" dport 8000-8100 goto 20 proto 109",
			"12: iif lo ipproto "+proto+" sport 1-32767 goto 20 proto 109",
			"12: iif lo ipproto "+proto+" sport 61000-65534 goto 20 proto 109",
			"13: iif lo ipproto "+proto+" lookup 15001 proto 109")
	}
	for _, p := range []string{"15000", "15020-15021", "15090", "9091"} {
		rules = append(rules, "14: iif eth0 ipproto tcp dport "+p+" goto 20 proto 109")
	}
	rules = append(rules,
		"15: to "+pod+" iif eth0 ipproto tcp dport 1-32767 lookup 15001 proto 109",
		"15: to "+pod+" iif eth0 ipproto tcp dport 61000-65534 lookup 15001 proto 109",
		"20: lookup local proto 109",
		"32766: lookup main proto 2")
	if !v6 {
		rules = append(rules, "32767: lookup default proto 2")
	}
	return rules
}

const (
	tcp  = unix.IPPROTO_TCP
	udp  = unix.IPPROTO_UDP
	icmp = unix.IPPROTO_ICMP
)

// routeCase is one packet and where capture must send it.
type routeCase struct {
	name string
	q    routeQuery
	want string // "tun", "out" (main table, eth0) or "local"
}

func checkRoutes(t *testing.T, cases []routeCase) {
	t.Helper()
	for _, c := range cases {
		got, err := routeGet(c.q)
		if err != nil {
			t.Errorf("%s (%v): route get: %v", c.name, c.q, err)
			continue
		}
		var ok bool
		switch c.want {
		case "tun":
			ok = got.Table == 15001 && got.Dev == "meshtun0"
		case "out":
			ok = got.Table == unix.RT_TABLE_MAIN && got.Dev == "eth0"
		case "local":
			// Without policy rules of its own the kernel merges the local
			// table into main and reports main.
			ok = got.Type == unix.RTN_LOCAL
		}
		if !ok {
			t.Errorf("%s (%v): routed to %v, want %s", c.name, c.q, got, c.want)
		}
	}
}

func a(s string) netip.Addr { return netip.MustParseAddr(s) }

// capturedRoutes are the routing decisions testCaptureConfig implies.
var capturedRoutes = []routeCase{
	// Outbound: locally generated.
	{"tcp connect (port not chosen yet)", routeQuery{Dst: a("192.0.2.1"), Proto: tcp, Dport: 443}, "tun"},
	{"tcp from an ephemeral port", routeQuery{Dst: a("192.0.2.1"), Proto: tcp, Sport: 40000, Dport: 443}, "tun"},
	{"udp", routeQuery{Dst: a("192.0.2.1"), Proto: udp, Sport: 40000, Dport: 53}, "tun"},
	{"tcp to the gateway's subnet", routeQuery{Dst: a("10.200.0.7"), Proto: tcp, Dport: 80}, "tun"},
	{"icmp", routeQuery{Dst: a("192.0.2.1"), Proto: icmp}, "out"},
	{"proxy's marked socket", routeQuery{Dst: a("192.0.2.1"), Proto: tcp, Mark: 0x539, Dport: 443}, "out"},
	{"to the pod IP", routeQuery{Dst: podV4, Proto: tcp, Dport: 9090}, "local"},
	{"to loopback", routeQuery{Dst: a("127.0.0.1"), Proto: tcp, Dport: 9090}, "local"},
	{"excluded port", routeQuery{Dst: a("192.0.2.1"), Proto: tcp, Sport: 40000, Dport: 3306}, "out"},
	{"excluded port range, udp", routeQuery{Dst: a("192.0.2.1"), Proto: udp, Sport: 40000, Dport: 8050}, "out"},
	{"excluded CIDR", routeQuery{Dst: a("10.99.3.4"), Proto: tcp, Dport: 443}, "out"},
	{"multicast", routeQuery{Dst: a("224.0.0.251"), Proto: udp, Sport: 5353, Dport: 5353}, "out"},
	{"reply of an app server (server source port)", routeQuery{Dst: gwV4, Src: podV4, Proto: tcp, Sport: 8080, Dport: 40000}, "out"},
	{"ipv6 tcp", routeQuery{Dst: a("2001:db8::1"), Proto: tcp, Dport: 443}, "tun"},
	{"ipv6 udp", routeQuery{Dst: a("2001:db8::1"), Proto: udp, Sport: 40000, Dport: 443}, "tun"},
	{"ipv6 icmp", routeQuery{Dst: a("2001:db8::1"), Proto: unix.IPPROTO_ICMPV6}, "out"},
	{"ipv6 marked", routeQuery{Dst: a("2001:db8::1"), Proto: tcp, Mark: 0x539, Dport: 443}, "out"},
	{"ipv6 excluded CIDR", routeQuery{Dst: a("fd99::1"), Proto: tcp, Dport: 443}, "out"},
	{"ipv6 to the pod IP", routeQuery{Dst: podV6, Proto: tcp, Dport: 9090}, "local"},
	{"ipv6 link-local", routeQuery{Dst: a("fe80::1"), Proto: tcp, Dport: 80}, "out"},

	// Inbound: arriving on eth0.
	{"inbound tcp", routeQuery{Dst: podV4, Src: gwV4, Iif: "eth0", Proto: tcp, Sport: 40000, Dport: 9090}, "tun"},
	{"inbound admin port", routeQuery{Dst: podV4, Src: gwV4, Iif: "eth0", Proto: tcp, Sport: 40000, Dport: 15021}, "local"},
	{"inbound excluded port", routeQuery{Dst: podV4, Src: gwV4, Iif: "eth0", Proto: tcp, Sport: 40000, Dport: 9091}, "local"},
	{"reply to an outbound connection", routeQuery{Dst: podV4, Src: gwV4, Iif: "eth0", Proto: tcp, Sport: 443, Dport: 40000}, "local"},
	{"inbound udp", routeQuery{Dst: podV4, Src: gwV4, Iif: "eth0", Proto: udp, Sport: 40000, Dport: 9090}, "local"},
	{"inbound icmp", routeQuery{Dst: podV4, Src: gwV4, Iif: "eth0", Proto: icmp}, "local"},
	{"ipv6 inbound tcp", routeQuery{Dst: podV6, Src: gwV6, Iif: "eth0", Proto: tcp, Sport: 40000, Dport: 9090}, "tun"},
	{"ipv6 inbound admin port", routeQuery{Dst: podV6, Src: gwV6, Iif: "eth0", Proto: tcp, Sport: 40000, Dport: 15000}, "local"},
	{"ipv6 reply to an outbound connection", routeQuery{Dst: podV6, Src: gwV6, Iif: "eth0", Proto: tcp, Sport: 443, Dport: 40000}, "local"},
}

// uncapturedRoutes are the same packets' routes without capture.
func uncapturedRoutes() []routeCase {
	out := make([]routeCase, len(capturedRoutes))
	for i, c := range capturedRoutes {
		c.name = "without capture: " + c.name
		switch {
		case c.q.Dst == podV4 || c.q.Dst == podV6 || c.q.Dst.IsLoopback():
			c.want = "local"
		default:
			c.want = "out"
		}
		out[i] = c
	}
	return out
}

func TestCaptureSetupIdempotentTeardownRestores(t *testing.T) {
	newNetns(t)
	podNet(t)
	openTun(t)
	before := dumpState(t)
	checkRoutes(t, uncapturedRoutes())

	cfg := captureConfig(t)
	c1, err := SetupCapture(cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if got := c1.PodIPs(); !slices.Equal(got, []netip.Addr{podV4, podV6}) || c1.PodInterface() != "eth0" {
		t.Errorf("discovered pod interface %q, IPs %v; want eth0, [%v %v]", c1.PodInterface(), got, podV4, podV6)
	}
	installed := dumpState(t)
	expectLines(t, "ipv4 rules", installed.Rules4, wantRules(false))
	expectLines(t, "ipv6 rules", installed.Rules6, wantRules(true))
	expectLines(t, "ipv4 table 15001", filterLines(installed.Routes4, "table 15001 "),
		[]string{"table 15001 type 1 default dev meshtun0 src 10.200.0.2 proto 109 scope 0"})
	expectLines(t, "ipv6 table 15001", filterLines(installed.Routes6, "table 15001 "),
		[]string{"table 15001 type 1 default dev meshtun0 src fd00:200::2 metric 1024 proto 109 scope 0"})
	for key, want := range map[string]string{
		"net/ipv4/conf/meshtun0/accept_local": "1",
		"net/ipv4/conf/meshtun0/rp_filter":    "0",
		"net/ipv4/conf/meshtun0/forwarding":   "1",
		"net/ipv4/conf/eth0/forwarding":       "1",
		"net/ipv6/conf/all/forwarding":        "1",
		"net/ipv6/conf/eth0/accept_ra":        "2", // it was 1: RAs still accepted while forwarding
	} {
		if got := sysctl(t, key); got != want {
			t.Errorf("sysctl %s = %s, want %s", key, got, want)
		}
	}
	checkRoutes(t, capturedRoutes)

	// Setup again, over a live capture: the same rules, none twice.
	c2, err := SetupCapture(cfg, testLogger(t))
	if err != nil {
		t.Fatalf("second setup: %v", err)
	}
	mustNotDiffer(t, "second setup differs from the first", installed, dumpState(t))

	if err := c2.Teardown(); err != nil {
		t.Fatalf("teardown: %v", err)
	}
	mustNotDiffer(t, "state after teardown differs from before setup", before, dumpState(t))
	if err := c2.Teardown(); err != nil {
		t.Errorf("second teardown: %v", err)
	}
	if err := c1.Teardown(); err != nil {
		t.Errorf("teardown of the replaced capture: %v", err)
	}
	mustNotDiffer(t, "state after repeated teardowns", before, dumpState(t))
	checkRoutes(t, uncapturedRoutes())
	if ents, _ := os.ReadDir(cfg.StateDir); len(ents) != 0 {
		t.Errorf("state dir not empty after teardown: %v", ents)
	}
}

// TestCaptureCrashRecovery leaves capture behind as a killed proxy would,
// on a namespace with unusual sysctls, and requires the next setup to
// clean it up and its teardown to restore everything.
func TestCaptureCrashRecovery(t *testing.T) {
	newNetns(t)
	podNet(t)
	// Strict reverse-path filtering, and IPv6 forwarding on for devices
	// created from now on (the TUN) but off globally.
	mustSysctl(t, "net/ipv4/conf/all/rp_filter", "1")
	mustSysctl(t, "net/ipv6/conf/default/forwarding", "1")
	openTun(t)
	mustSysctl(t, "net/ipv6/conf/eth0/accept_ra", "0")
	before := dumpState(t)

	cfg := captureConfig(t)
	if _, err := SetupCapture(cfg, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	if got := sysctl(t, "net/ipv4/conf/all/rp_filter"); got != "2" {
		t.Errorf("all.rp_filter = %s with capture, want 2 (loose)", got)
	}
	if got := sysctl(t, "net/ipv6/conf/eth0/accept_ra"); got != "0" {
		t.Errorf("eth0 accept_ra = %s with capture, want 0 (it was off)", got)
	}
	crashed := dumpState(t)
	// The *Capture is dropped without Teardown: the process "died".

	c, err := SetupCapture(cfg, testLogger(t))
	if err != nil {
		t.Fatalf("setup after a crash: %v", err)
	}
	mustNotDiffer(t, "setup after a crash differs from a clean setup", crashed, dumpState(t))
	checkRoutes(t, capturedRoutes)
	if err := c.Teardown(); err != nil {
		t.Fatal(err)
	}
	mustNotDiffer(t, "state after crash, setup and teardown differs from before", before, dumpState(t))
}

// TestCleanupStaleWithoutState: CleanupStale alone undoes a crashed run,
// and is a no-op where nothing was installed.
func TestCleanupStaleWithoutState(t *testing.T) {
	newNetns(t)
	podNet(t)
	openTun(t)
	before := dumpState(t)
	dir := t.TempDir()
	if err := CleanupStale(dir, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	mustNotDiffer(t, "CleanupStale changed a namespace without capture", before, dumpState(t))

	cfg := captureConfig(t)
	cfg.StateDir = dir
	if _, err := SetupCapture(cfg, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	if err := CleanupStale(dir, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	mustNotDiffer(t, "CleanupStale after a crash", before, dumpState(t))
}

// TestCaptureOutboundOnlyIPv4: no inbound capture, and a pod without an
// IPv6 address: no inbound rules, no forwarding, an IPv6 capture route
// without a source address.
func TestCaptureOutboundOnlyIPv4(t *testing.T) {
	newNetns(t)
	podNet(t)
	openTun(t)
	before := dumpState(t)
	cfg := CaptureConfig{TunName: "meshtun0", PodInterface: "eth0", PodIPs: []netip.Addr{podV4}, StateDir: t.TempDir()}
	c, err := SetupCapture(cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	st := dumpState(t)
	for _, l := range append(st.Rules4, st.Rules6...) {
		if strings.Contains(l, "iif eth0") {
			t.Errorf("inbound rule without inbound capture: %s", l)
		}
	}
	expectLines(t, "ipv6 table 15001", filterLines(st.Routes6, "table 15001 "),
		[]string{"table 15001 type 1 default dev meshtun0 metric 1024 proto 109 scope 0"})
	for _, key := range []string{"net/ipv4/conf/eth0/forwarding", "net/ipv6/conf/all/forwarding"} {
		if got := sysctl(t, key); got != "0" {
			t.Errorf("sysctl %s = %s without inbound capture, want 0", key, got)
		}
	}
	checkRoutes(t, []routeCase{
		{"tcp", routeQuery{Dst: a("192.0.2.1"), Proto: tcp, Dport: 443}, "tun"},
		{"inbound tcp", routeQuery{Dst: podV4, Src: gwV4, Iif: "eth0", Proto: tcp, Sport: 40000, Dport: 9090}, "local"},
	})
	if err := c.Teardown(); err != nil {
		t.Fatal(err)
	}
	mustNotDiffer(t, "after teardown", before, dumpState(t))
}

// TestCaptureFailedSetupUndone: a setup that fails half-way (the capture
// table holds a route capture did not add) leaves nothing behind.
func TestCaptureFailedSetupUndone(t *testing.T) {
	newNetns(t)
	eth := podNet(t)
	openTun(t)
	foreign := &netlink.Route{LinkIndex: eth.Attrs().Index, Dst: defaultDst(false), Table: 15001, Gw: gwV4.AsSlice()}
	if err := netlink.RouteAdd(foreign); err != nil {
		t.Fatal(err)
	}
	before := dumpState(t)
	cfg := captureConfig(t)
	_, err := SetupCapture(cfg, testLogger(t))
	if err == nil || !strings.Contains(err.Error(), "table 15001") {
		t.Fatalf("setup over a foreign route in the capture table: %v, want an error naming table 15001", err)
	}
	mustNotDiffer(t, "failed setup left changes", before, dumpState(t))
	if _, err := os.Stat(filepath.Join(cfg.StateDir)); err == nil {
		if ents, _ := os.ReadDir(cfg.StateDir); len(ents) != 0 {
			t.Errorf("failed setup left a state file: %v", ents)
		}
	}
}

// TestCaptureKeepsMovedLocalRule: where "lookup local" is not at priority
// 0 to begin with, capture leaves it where it was.
func TestCaptureKeepsMovedLocalRule(t *testing.T) {
	newNetns(t)
	podNet(t)
	openTun(t)
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		r := netlink.NewRule()
		r.Family, r.Priority, r.Table = fam, 100, unix.RT_TABLE_LOCAL
		if err := netlink.RuleAdd(r); err != nil {
			t.Fatal(err)
		}
		r.Priority = 0
		if err := netlink.RuleDel(r); err != nil {
			t.Fatal(err)
		}
	}
	captureRoundTrip(t)
}

// TestCaptureTeardownFromAnotherThread: Teardown acts on the namespace
// capture was set up in, whatever namespace the calling thread is in.
func TestCaptureTeardownFromAnotherThread(t *testing.T) {
	newNetns(t)
	podNet(t)
	openTun(t)
	before := dumpState(t)
	c, err := SetupCapture(captureConfig(t), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { done <- c.Teardown() }() // not locked: any thread, the host namespace
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	mustNotDiffer(t, "after teardown from another goroutine", before, dumpState(t))
}

// TestCaptureRecreatedLocalRule: a "0: lookup local" rule someone
// re-created (protocol boot, not kernel) is moved all the same and comes
// back with its own protocol.
func TestCaptureRecreatedLocalRule(t *testing.T) {
	newNetns(t)
	podNet(t)
	openTun(t)
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		r := netlink.NewRule()
		r.Family, r.Priority, r.Table = fam, 0, unix.RT_TABLE_LOCAL
		if err := netlink.RuleDel(r); err != nil {
			t.Fatal(err)
		}
		r.Protocol = unix.RTPROT_BOOT
		if err := netlink.RuleAdd(r); err != nil {
			t.Fatal(err)
		}
	}
	captureRoundTrip(t)
}

// TestCleanupStaleForeignRecord: a record left by a namespace that is
// gone, under the inode number this one now has, is discarded, not
// applied; this namespace's own record is applied.
func TestCleanupStaleForeignRecord(t *testing.T) {
	newNetns(t)
	mustSysctl(t, "net/ipv4/conf/all/rp_filter", "0")
	dir := t.TempDir()
	write := func(cookie uint64) {
		t.Helper()
		st := state{Tun: "meshtun0", Table: 15001, NetnsCookie: cookie,
			Sysctls: []sysctlChange{{Path: "/proc/sys/net/ipv4/conf/all/rp_filter", Old: "1"}}}
		if err := writeState(dir, &st); err != nil {
			t.Fatal(err)
		}
	}
	write(netnsCookie() + 1)
	if err := CleanupStale(dir, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	if got := sysctl(t, "net/ipv4/conf/all/rp_filter"); got != "0" {
		t.Errorf("a foreign record was applied: all.rp_filter = %s", got)
	}
	if _, err := os.Stat(statePath(dir)); !os.IsNotExist(err) {
		t.Errorf("foreign record not removed: %v", err)
	}
	write(netnsCookie())
	if err := CleanupStale(dir, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	if got := sysctl(t, "net/ipv4/conf/all/rp_filter"); got != "1" {
		t.Errorf("this namespace's record was not applied: all.rp_filter = %s", got)
	}
}

// captureRoundTrip sets capture up with the default test config, checks
// the routing decisions it must make, tears it down and checks that the
// namespace is exactly as before.
func captureRoundTrip(t *testing.T) {
	t.Helper()
	before := dumpState(t)
	c, err := SetupCapture(captureConfig(t), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	checkRoutes(t, capturedRoutes)
	if err := c.Teardown(); err != nil {
		t.Fatal(err)
	}
	mustNotDiffer(t, "after teardown", before, dumpState(t))
}
