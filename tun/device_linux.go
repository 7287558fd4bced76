package tun

import (
	"errors"
	"fmt"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// addrGenModeNone is IN6_ADDR_GEN_MODE_NONE (linux/if_link.h).
const addrGenModeNone = 1

// Open creates the TUN device, brings it up and adds its addresses. A
// device of the same name left by a crashed run is deleted first.
func Open(cfg DeviceConfig) (*Device, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if old, err := netlink.LinkByName(cfg.Name); err == nil {
		if old.Type() != "tuntap" {
			return nil, fmt.Errorf("tun: %s exists and is a %s device, not a TUN", cfg.Name, old.Type())
		}
		if err := netlink.LinkDel(old); err != nil {
			return nil, fmt.Errorf("tun: deleting stale %s: %w", cfg.Name, err)
		}
	}
	if err := ensureNode(tunNode); err != nil {
		return nil, err
	}
	dev, err := wgtun.CreateTUN(cfg.Name, cfg.MTU)
	if err != nil {
		return nil, fmt.Errorf("tun: create %s: %w", cfg.Name, err)
	}
	d := &Device{dev: dev, name: cfg.Name, mtu: cfg.MTU}
	if err := d.configure(cfg); err != nil {
		dev.Close()
		return nil, err
	}
	return d, nil
}

func (d *Device) configure(cfg DeviceConfig) error {
	link, err := netlink.LinkByName(d.name)
	if err != nil {
		return fmt.Errorf("tun: %s: %w", d.name, err)
	}
	d.index = link.Attrs().Index
	// No IPv6 link-local address: without one the kernel runs no DAD and
	// sends no router solicitations into the stack. Nothing needs one; a
	// kernel without IPv6 has nothing to switch off.
	if err := netlink.LinkSetIP6AddrGenMode(link, addrGenModeNone); err != nil &&
		!errors.Is(err, unix.EAFNOSUPPORT) && !errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("tun: %s: IPv6 address generation: %w", d.name, err)
	}
	for _, p := range cfg.Addrs {
		a := &netlink.Addr{IPNet: prefixToIPNet(p)}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(link, a); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("tun: %s: address %v: %w", d.name, p, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("tun: %s: set up: %w", d.name, err)
	}
	return nil
}

// OpenFile adopts an open TUN device by file descriptor, inherited from
// the process that created it (meshtun agent keeps the device so that
// capture, whose routes point at it, outlives a proxy restart). The
// device keeps the addresses and flags its creator gave it; mtu is what
// the stack is told.
func OpenFile(fd int, mtu int) (*Device, error) {
	if fd < 0 {
		return nil, fmt.Errorf("tun: file descriptor %d: must be 0 or more", fd)
	}
	if mtu < 1280 || mtu > 65535 {
		return nil, fmt.Errorf("tun: MTU %d: want 1280..65535", mtu)
	}
	// The poller needs a non-blocking descriptor; the creator's may not be.
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("tun: file descriptor %d: %w", fd, err)
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("tun-fd-%d", fd))
	// A plain device (no virtio-net header) is the least-privilege
	// hand-over (Attach): adopt it as it is, without the offload and MTU
	// set-up that needs CAP_NET_ADMIN.
	if ifr, err := unix.NewIfreq(""); err == nil && unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr) == nil && ifr.Uint16()&unix.IFF_VNET_HDR == 0 {
		return adoptPlain(f, ifr.Name(), mtu), nil
	}
	dev, err := wgtun.CreateTUNFromFile(f, mtu)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("tun: file descriptor %d is not a usable TUN device: %w", fd, err)
	}
	name, err := dev.Name()
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("tun: file descriptor %d: %w", fd, err)
	}
	d := &Device{dev: dev, name: name, mtu: mtu}
	if link, err := netlink.LinkByName(name); err == nil {
		d.index = link.Attrs().Index
	}
	return d, nil
}

// adoptPlain is OpenFile for a plain TUN named name.
func adoptPlain(f *os.File, name string, mtu int) *Device {
	d := &Device{dev: newPlain(f, name, mtu), name: name, mtu: mtu}
	if link, err := netlink.LinkByName(name); err == nil {
		d.index = link.Attrs().Index
	}
	return d
}
