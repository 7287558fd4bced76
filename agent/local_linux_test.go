package agent

import (
	"net"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// TestHostIPIsTheDefaultRoutesSource: in a namespace whose first interface
// that is up is not the default route's, INSTANCE_IP is the default
// route's address (its preferred source when it names one).
func TestHostIPIsTheDefaultRoutesSource(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root (a network namespace)")
		}
		t.Skip("needs root (a network namespace)")
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	ns, err := netns.New()
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ns.Close()
		defer orig.Close()
		if err := netns.Set(orig); err != nil {
			t.Errorf("back to the original namespace: %v (thread left locked)", err)
			return
		}
		runtime.UnlockOSThread()
	})
	addLink := func(name, cidr string) netlink.Link {
		t.Helper()
		// A veth pair, both ends up (a carrier): the kernel every test
		// host has builds veth, not always dummy.
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
			t.Fatalf("veth %s: %v", name, err)
		}
		peer, err := netlink.LinkByName(name + "p")
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(peer); err != nil {
			t.Fatal(err)
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		a, err := netlink.ParseAddr(cidr)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.AddrAdd(l, a); err != nil {
			t.Fatalf("%s %s: %v", name, cidr, err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
		return l
	}
	// ha0 comes first in the interface list, up with a global address:
	// what the first-interface-that-is-up rule would pick.
	addLink("ha0", "10.61.0.2/24")
	d1 := addLink("ha1", "10.62.0.2/24")
	a, _ := netlink.ParseAddr("10.62.0.3/24")
	if err := netlink.AddrAdd(d1, a); err != nil {
		t.Fatal(err)
	}
	if got := hostIP(); got != "10.61.0.2" {
		t.Errorf("no default route: hostIP = %q, want the first interface's 10.61.0.2", got)
	}
	def := &netlink.Route{LinkIndex: d1.Attrs().Index, Gw: net.ParseIP("10.62.0.1")}
	if err := netlink.RouteAdd(def); err != nil {
		t.Fatalf("default route: %v", err)
	}
	if got := hostIP(); got != "10.62.0.2" {
		t.Errorf("default via ha1: hostIP = %q, want ha1's primary 10.62.0.2", got)
	}
	def.Src = net.ParseIP("10.62.0.3")
	if err := netlink.RouteReplace(def); err != nil {
		t.Fatalf("default route src: %v", err)
	}
	if got := hostIP(); got != "10.62.0.3" {
		t.Errorf("default via ha1 src 10.62.0.3: hostIP = %q, want 10.62.0.3", got)
	}
	env := strings.Join(LocalEnviron([]string{"POD_NAME=me"}), " ")
	if want := "INSTANCE_IP=10.62.0.3"; !strings.Contains(env, want) {
		t.Errorf("LocalEnviron = %s, want %s", env, want)
	}
}
