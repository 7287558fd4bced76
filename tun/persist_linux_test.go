package tun

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// tuntap reads the device's TUN attributes over netlink (sysfs shows the
// namespace it was mounted in, not the test's).
func tuntap(t *testing.T, name string) *netlink.Tuntap {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	tt, ok := l.(*netlink.Tuntap)
	if !ok {
		t.Fatalf("%s is a %s", name, l.Type())
	}
	return tt
}

// TestCreatePersistentThenAttach: the init container's persistent TUN
// outlives the process that made it, is owned as asked, and is attached
// and adopted as a plain device (no virtio-net header) whose file a child
// adopts again through OpenFile.
func TestCreatePersistentThenAttach(t *testing.T) {
	newNetns(t)
	node := filepath.Join(t.TempDir(), "tun")
	cfg := DeviceConfig{Name: "mtp0", MTU: 1500}
	if err := CreatePersistent(cfg, node, 0, -1); err == nil || !strings.Contains(err.Error(), "owner uid other than root") {
		t.Fatalf("ownerless persistent TUN: %v, want refused", err)
	}
	if err := CreatePersistent(cfg, node, 1337, 1337); err != nil {
		t.Fatal(err)
	}
	// No process holds it: still there, persistent, owned by 1337, up,
	// MTU set.
	tt := tuntap(t, "mtp0")
	if tt.Owner != 1337 || tt.Group != 1337 || tt.NonPersist || tt.MTU != 1500 || tt.Flags&netlink.TUNTAP_NO_PI == 0 {
		t.Fatalf("device: owner %d group %d non-persist %v mtu %d flags %#x; want 1337/1337, persistent, 1500, no_pi",
			tt.Owner, tt.Group, tt.NonPersist, tt.MTU, tt.Flags)
	}

	dev, err := Attach("mtp0", node, 1500)
	if err != nil {
		t.Fatal(err)
	}
	if off := dev.Offloads(); off.VNetHdr || off.BatchSize != 1 {
		t.Fatalf("attached device offloads %+v, want plain (batch 1, no virtio-net header)", off)
	}
	f := dev.File()
	if f == nil {
		t.Fatal("attached device has no file to hand to the proxy")
	}
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	child, err := OpenFile(fd, 1500)
	if err != nil {
		t.Fatalf("a child adopting the plain device: %v", err)
	}
	if child.Name() != "mtp0" || child.Offloads().BatchSize != 1 {
		t.Fatalf("adopted %s with %+v", child.Name(), child.Offloads())
	}
	child.Close()
	dev.Close()
	// Closing every holder leaves the persistent device in place.
	if tt := tuntap(t, "mtp0"); tt.Owner != 1337 {
		t.Fatalf("after close: owner %d", tt.Owner)
	}
	if _, err := Attach("nope0", node, 1500); err == nil || !strings.Contains(err.Error(), "no such device") {
		t.Fatalf("attach to a missing device: %v", err)
	}
}
