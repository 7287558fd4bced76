//go:build linux

package integration

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math/big"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	privOnce   sync.Once
	privReason string // why the tests cannot run here; "" when they can
)

// requireRoot stops the test when the machine cannot run it: it fails
// under CI=true (CI must never go green by skipping) and skips elsewhere.
// On a machine that can, it also requires $MESHTUN_BIN before any
// namespace is built.
func requireRoot(t *testing.T) {
	t.Helper()
	privOnce.Do(func() { privReason = checkPrivileges() })
	if privReason == "" {
		meshtunBin(t)
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("integration test cannot run under CI: %s", privReason)
	}
	t.Skipf("integration test skipped: %s", privReason)
}

func checkPrivileges() string {
	if os.Geteuid() != 0 {
		return "needs root (network namespaces, veth, TUN)"
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		return fmt.Sprintf("no TUN support: %v", err)
	}
	name := "mtprobe" + randHex(3)
	if _, err := run("ip", "netns", "add", name); err != nil {
		return fmt.Sprintf("cannot create a network namespace: %v", err)
	}
	if _, err := run("ip", "netns", "del", name); err != nil {
		return fmt.Sprintf("cannot delete network namespace %s: %v", name, err)
	}
	return ""
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// topology is a pod namespace and a services namespace joined by veth:
//
//	pod eth0 10.X.0.2/24 fd00:X::2/64 ── services vethS 10.X.0.1/24 fd00:X::1/64
//	                                    services lo: 10.X.1.10, 10.X.1.11, fd00:X:1::10, fd00:X:1::11
//
// The pod's default routes (and explicit routes to the service addresses)
// go via the services side. IPv6 DAD is off everywhere, so addresses are
// usable at once.
type topology struct {
	Pod, Services string // namespace names
	PodIface      string // "eth0"
	SvcIface      string // the veth end in Services

	PodV4, PodV6 netip.Addr // the pod's addresses
	GwV4, GwV6   netip.Addr // the services side of the veth
	SvcV4, SvcV6 netip.Addr // service addresses on the services loopback
	// Svc2V4, Svc2V6 are second service addresses, for exclusion tests.
	Svc2V4, Svc2V6 netip.Addr

	// StateDir is the proxies' --state-dir: per topology, so a proxy
	// killed by a test leaves no record behind on the host.
	StateDir string
}

// ap formats ip:port the way the access log does ("[v6]:port" for IPv6).
func ap(ip netip.Addr, port uint16) string { return netip.AddrPortFrom(ip, port).String() }

// newTopology builds a fresh topology with unique names; t.Cleanup
// deletes it (and with it the veth pair).
func newTopology(t *testing.T) *topology {
	t.Helper()
	suffix := randHex(3)
	xb, _ := rand.Int(rand.Reader, big.NewInt(200))
	x := int(xb.Int64()) + 20 // 10.20.x.x .. 10.219.x.x
	pfx6 := fmt.Sprintf("fd00:%d", x)
	tp := &topology{StateDir: t.TempDir(),
		Pod:      "mt" + suffix + "-pod",
		Services: "mt" + suffix + "-svc",
		PodIface: "eth0",
		SvcIface: "vs" + suffix, // 8 chars
		PodV4:    netip.MustParseAddr(fmt.Sprintf("10.%d.0.2", x)),
		PodV6:    netip.MustParseAddr(pfx6 + "::2"),
		GwV4:     netip.MustParseAddr(fmt.Sprintf("10.%d.0.1", x)),
		GwV6:     netip.MustParseAddr(pfx6 + "::1"),
		SvcV4:    netip.MustParseAddr(fmt.Sprintf("10.%d.1.10", x)),
		SvcV6:    netip.MustParseAddr(pfx6 + ":1::10"),
		Svc2V4:   netip.MustParseAddr(fmt.Sprintf("10.%d.1.11", x)),
		Svc2V6:   netip.MustParseAddr(pfx6 + ":1::11"),
	}
	for _, ns := range []string{tp.Pod, tp.Services} {
		if _, err := run("ip", "netns", "add", ns); err != nil {
			t.Fatalf("topology: %v", err)
		}
		t.Cleanup(func() {
			if _, err := run("ip", "netns", "del", ns); err != nil {
				t.Errorf("topology cleanup: %v", err)
			}
		})
	}
	ipn := func(ns string, args ...string) []string { return append([]string{"ip", "-n", ns}, args...) }
	steps := [][]string{
		// DAD off before any interface exists, so every interface inherits it.
		{"ip", "netns", "exec", tp.Pod, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"},
		{"ip", "netns", "exec", tp.Services, "sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"},
		ipn(tp.Pod, "link", "set", "lo", "up"),
		ipn(tp.Services, "link", "set", "lo", "up"),
		ipn(tp.Pod, "link", "add", tp.PodIface, "type", "veth", "peer", "name", tp.SvcIface, "netns", tp.Services),
		{"ip", "netns", "exec", tp.Pod, "sysctl", "-q", "-w", "net.ipv6.conf." + tp.PodIface + ".accept_dad=0"},
		{"ip", "netns", "exec", tp.Services, "sysctl", "-q", "-w", "net.ipv6.conf." + tp.SvcIface + ".accept_dad=0"},
		ipn(tp.Pod, "addr", "add", tp.PodV4.String()+"/24", "dev", tp.PodIface),
		ipn(tp.Pod, "addr", "add", tp.PodV6.String()+"/64", "dev", tp.PodIface, "nodad"),
		ipn(tp.Services, "addr", "add", tp.GwV4.String()+"/24", "dev", tp.SvcIface),
		ipn(tp.Services, "addr", "add", tp.GwV6.String()+"/64", "dev", tp.SvcIface, "nodad"),
		ipn(tp.Services, "addr", "add", tp.SvcV4.String()+"/32", "dev", "lo"),
		ipn(tp.Services, "addr", "add", tp.Svc2V4.String()+"/32", "dev", "lo"),
		ipn(tp.Services, "addr", "add", tp.SvcV6.String()+"/128", "dev", "lo", "nodad"),
		ipn(tp.Services, "addr", "add", tp.Svc2V6.String()+"/128", "dev", "lo", "nodad"),
		ipn(tp.Pod, "link", "set", tp.PodIface, "up"),
		ipn(tp.Services, "link", "set", tp.SvcIface, "up"),
		ipn(tp.Pod, "-4", "route", "add", "default", "via", tp.GwV4.String()),
		ipn(tp.Pod, "-6", "route", "add", "default", "via", tp.GwV6.String()),
		ipn(tp.Pod, "-4", "route", "add", tp.SvcV4.String()+"/32", "via", tp.GwV4.String()),
		ipn(tp.Pod, "-4", "route", "add", tp.Svc2V4.String()+"/32", "via", tp.GwV4.String()),
		ipn(tp.Pod, "-6", "route", "add", tp.SvcV6.String()+"/128", "via", tp.GwV6.String()),
		ipn(tp.Pod, "-6", "route", "add", tp.Svc2V6.String()+"/128", "via", tp.GwV6.String()),
	}
	for _, s := range steps {
		if _, err := run(s[0], s[1:]...); err != nil {
			t.Fatalf("topology: %v", err)
		}
	}
	// Both veth ends must be up with a carrier before traffic is sent.
	deadline := time.Now().Add(5 * time.Second)
	for _, end := range [][2]string{{tp.Pod, tp.PodIface}, {tp.Services, tp.SvcIface}} {
		for {
			out, err := run("ip", "-n", end[0], "-o", "link", "show", end[1])
			if err == nil && strings.Contains(out, "LOWER_UP") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("topology: %s/%s has no carrier after 5s: %s %v", end[0], end[1], out, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return tp
}
