package netstack

import (
	"testing"

	"github.com/vishvananda/netlink"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// upTUN creates the TUN name in the calling thread's namespace (the test
// entered a fresh one), gives it the address cidr and brings it up. The
// caller closes it. wireguard-go's status goroutines block until their
// events are taken, so they are drained until the device closes.
func upTUN(t testing.TB, name string, mtu int, cidr string) wgtun.Device {
	t.Helper()
	dev, err := wgtun.CreateTUN(name, mtu)
	if err != nil {
		t.Fatalf("create TUN: %v", err)
	}
	go func() {
		for range dev.Events() {
		}
	}()
	link, err := netlink.LinkByName(name)
	if err != nil {
		dev.Close()
		t.Fatal(err)
	}
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		dev.Close()
		t.Fatal(err)
	}
	if err := netlink.AddrAdd(link, addr); err != nil {
		dev.Close()
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		dev.Close()
		t.Fatal(err)
	}
	return dev
}
