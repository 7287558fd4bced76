package tun

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// blockedRoutes are capturedRoutes as Block leaves them: what went into
// the TUN is unreachable, everything else is routed as before.
func checkBlockedRoutes(t *testing.T) {
	t.Helper()
	var others []routeCase
	for _, c := range capturedRoutes {
		if c.want != "tun" {
			others = append(others, c)
			continue
		}
		got, err := routeGet(c.q)
		switch {
		case errors.Is(err, unix.EHOSTUNREACH):
		case err == nil && got.Table == 15001 && got.Type == unix.RTN_UNREACHABLE:
		default:
			t.Errorf("blocked: %s (%v): routed to %v (%v), want unreachable in table 15001", c.name, c.q, got, err)
		}
	}
	checkRoutes(t, others)
}

// connectErr connects (blocking, bounded) and returns the error and how
// long the connect took.
func connectErr(dst netip.AddrPort) (error, time.Duration) {
	fam, sa := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Addr: dst.Addr().As16(), Port: int(dst.Port())})
	if dst.Addr().Is4() {
		fam, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}
	}
	fd, err := unix.Socket(fam, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err, 0
	}
	defer unix.Close(fd)
	// A connect that is not refused would wait for SYN retries: bound it.
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &unix.Timeval{Sec: 2})
	start := time.Now()
	err = unix.Connect(fd, sa)
	return err, time.Since(start)
}

// TestCaptureBlockUnblock: Block turns the capture table's routes into
// unreachable ones — captured connects fail at once, the rules and
// everything uncaptured stay as they were — and Unblock restores exactly
// what setup installed, after which captured packets reach the TUN again.
// Teardown of a blocked capture restores the namespace.
func TestCaptureBlockUnblock(t *testing.T) {
	newNetns(t)
	podNet(t)
	dev := openTun(t)
	before := dumpState(t)
	c, err := SetupCapture(captureConfig(t), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	installed := dumpState(t)

	for round := 0; round < 2; round++ { // the second Block is over a blocked table
		if err := c.Block(); err != nil {
			t.Fatalf("block (round %d): %v", round, err)
		}
	}
	blocked := dumpState(t)
	expectLines(t, "blocked ipv4 table 15001", filterLines(blocked.Routes4, "table 15001 "),
		[]string{"table 15001 type 7 default metric 2147483647 proto 109 scope 0"})
	expectLines(t, "blocked ipv6 table 15001", filterLines(blocked.Routes6, "table 15001 "),
		[]string{"table 15001 type 7 default dev lo metric 2147483647 proto 109 scope 0"})
	if d := diffState(netState{Rules4: installed.Rules4, Rules6: installed.Rules6, Sysctls: installed.Sysctls},
		netState{Rules4: blocked.Rules4, Rules6: blocked.Rules6, Sysctls: blocked.Sysctls}); d != "" {
		t.Errorf("Block changed more than the capture table's routes:\n%s", d)
	}
	checkBlockedRoutes(t)
	for _, dst := range []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:80"), netip.MustParseAddrPort("[2001:db8::1]:80")} {
		err, took := connectErr(dst)
		if !errors.Is(err, unix.EHOSTUNREACH) || took > 500*time.Millisecond {
			t.Errorf("blocked connect to %v: %v after %v, want EHOSTUNREACH at once", dst, err, took)
		}
	}
	if err := sendUDP(netip.MustParseAddrPort("192.0.2.1:53")); !errors.Is(err, unix.EHOSTUNREACH) {
		t.Errorf("blocked UDP send: %v, want EHOSTUNREACH", err)
	}
	// The proxy's own (marked) sockets are not affected.
	if err := connectNB(netip.MustParseAddrPort("192.0.2.1:443"), 0x539); err != nil {
		t.Errorf("marked connect while blocked: %v", err)
	}

	if err := c.Unblock(); err != nil {
		t.Fatalf("unblock: %v", err)
	}
	// What setup installed, and the unreachable routes behind the TUN's.
	unblocked := dumpState(t)
	expectLines(t, "unblocked ipv4 table 15001", filterLines(unblocked.Routes4, "table 15001 "), []string{
		"table 15001 type 1 default dev meshtun0 src 10.200.0.2 proto 109 scope 0",
		"table 15001 type 7 default metric 2147483647 proto 109 scope 0"})
	expectLines(t, "unblocked ipv6 table 15001", filterLines(unblocked.Routes6, "table 15001 "), []string{
		"table 15001 type 1 default dev meshtun0 src fd00:200::2 metric 1024 proto 109 scope 0",
		"table 15001 type 7 default dev lo metric 2147483647 proto 109 scope 0"})
	withoutTable := func(s netState) netState {
		drop := func(lines []string) []string {
			var out []string
			for _, l := range lines {
				if !strings.HasPrefix(l, "table 15001 ") {
					out = append(out, l)
				}
			}
			return out
		}
		return netState{s.Rules4, s.Rules6, drop(s.Routes4), drop(s.Routes6), s.Sysctls}
	}
	mustNotDiffer(t, "state after Unblock differs from the installed one beyond table 15001", withoutTable(installed), withoutTable(unblocked))
	if err := c.Unblock(); err != nil {
		t.Fatalf("second unblock: %v", err)
	}
	mustNotDiffer(t, "a second Unblock changed the state", unblocked, dumpState(t))
	checkRoutes(t, capturedRoutes)
	if err := connectNB(netip.MustParseAddrPort("192.0.2.1:444"), 0); err != nil {
		t.Fatal(err)
	}
	if proto, _, dst := readFlowPacket(t, dev); proto != unix.IPPROTO_TCP || dst != netip.MustParseAddrPort("192.0.2.1:444") {
		t.Errorf("after Unblock the first packet on the TUN is proto %d to %v, want the captured TCP connect", proto, dst)
	}

	// Teardown of a blocked capture restores the namespace exactly.
	if err := c.Block(); err != nil {
		t.Fatal(err)
	}
	if err := c.Teardown(); err != nil {
		t.Fatalf("teardown while blocked: %v", err)
	}
	mustNotDiffer(t, "state after teardown of a blocked capture differs from before setup", before, dumpState(t))
	if err := c.Block(); err == nil {
		t.Error("Block after Teardown succeeded")
	}
	if err := c.Unblock(); err == nil {
		t.Error("Unblock after Teardown succeeded")
	}
}

// TestCaptureFailsClosedWhenTunVanishes: once blocked and unblocked (as
// the agent does), capture whose TUN disappears without a Block — the
// agent holding it was killed — refuses captured flows instead of letting
// them out uncaptured.
func TestCaptureFailsClosedWhenTunVanishes(t *testing.T) {
	newNetns(t)
	podNet(t)
	dev, err := Open(DeviceConfig{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := SetupCapture(captureConfig(t), testLogger(t))
	if err != nil {
		dev.Close()
		t.Fatal(err)
	}
	defer c.Teardown()
	if err := c.Block(); err != nil {
		t.Fatal(err)
	}
	if err := c.Unblock(); err != nil {
		t.Fatal(err)
	}
	checkRoutes(t, capturedRoutes)
	dev.Close() // killed: no Block
	checkBlockedRoutes(t)
	if err, took := connectErr(netip.MustParseAddrPort("192.0.2.1:80")); !errors.Is(err, unix.EHOSTUNREACH) || took > 500*time.Millisecond {
		t.Errorf("connect with the TUN gone: %v after %v, want EHOSTUNREACH at once", err, took)
	}
	// Block without the TUN still works (nothing left to remove).
	if err := c.Block(); err != nil {
		t.Errorf("Block without the TUN: %v", err)
	}
}

// TestCaptureBlockedWithoutTun: a blocked capture outlives its TUN (an
// init container that exits), and the next setup, with a new TUN, replaces
// it by a clean capture that its teardown removes.
func TestCaptureBlockedWithoutTun(t *testing.T) {
	newNetns(t)
	podNet(t)
	before := dumpState(t)
	cfg := captureConfig(t)
	dev, err := Open(DeviceConfig{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := SetupCapture(cfg, testLogger(t))
	if err != nil {
		dev.Close()
		t.Fatal(err)
	}
	if err := c.Block(); err != nil {
		dev.Close()
		t.Fatal(err)
	}
	dev.Close() // the init container exits
	checkBlockedRoutes(t)

	openTun(t)
	c2, err := SetupCapture(cfg, testLogger(t))
	if err != nil {
		t.Fatalf("setup over a blocked capture: %v", err)
	}
	checkRoutes(t, capturedRoutes)
	if err := c2.Teardown(); err != nil {
		t.Fatal(err)
	}
	// The TUN is open again: compare without it.
	if d := diffState(withoutTun(before), withoutTun(dumpState(t))); d != "" {
		t.Fatalf("after the takeover and teardown:\n%s", d)
	}
}

// withoutTun drops the lines about the TUN device: a new one is open.
func withoutTun(s netState) netState {
	drop := func(lines []string) []string {
		var out []string
		for _, l := range lines {
			if !strings.Contains(l, "meshtun0") {
				out = append(out, l)
			}
		}
		return out
	}
	return netState{drop(s.Rules4), drop(s.Rules6), drop(s.Routes4), drop(s.Routes6), drop(s.Sysctls)}
}
