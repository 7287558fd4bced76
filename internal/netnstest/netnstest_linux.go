// Package netnstest runs a test goroutine inside a network namespace of its
// own, for the unit tests that need a real TUN device, routes or netlink
// without touching the host's network (tun, netstack).
package netnstest

import (
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
)

// Require stops a test that needs namespaces and /dev/net/tun where they
// are not available: a failure under CI=true (CI must not go green by
// skipping), a skip elsewhere.
func Require(t testing.TB) {
	t.Helper()
	reason := ""
	if os.Geteuid() != 0 {
		reason = "needs root (network namespaces, TUN)"
	} else if _, err := os.Stat("/dev/net/tun"); err != nil {
		reason = fmt.Sprintf("no TUN support: %v", err)
	}
	if reason == "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal(reason)
	}
	t.Skip(reason)
}

// Enter locks the test goroutine to its thread and moves the thread into a
// fresh network namespace until the test ends. Everything the test does on
// this goroutine (netlink calls, /proc/sys, TUN creation) happens in that
// namespace; goroutines it starts do not, unless they lock a thread
// entered the same way. Cleanups run after the test's own (LIFO), so
// devices are closed before the thread leaves the namespace; if it cannot
// go back, it stays locked and dies with the goroutine.
func Enter(t testing.TB) {
	t.Helper()
	Require(t)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("current netns: %v", err)
	}
	ns, err := netns.New()
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() {
		ns.Close()
		if err := netns.Set(orig); err != nil {
			t.Errorf("back to the original netns: %v (thread left locked)", err)
			orig.Close()
			return
		}
		orig.Close()
		runtime.UnlockOSThread()
	})
}
