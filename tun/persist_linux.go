package tun

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// The least-privilege split (the sidecar container runs as an unprivileged
// user with no capabilities, as Istio's istio-proxy does): the init
// container, root with CAP_NET_ADMIN, creates a persistent TUN owned by the
// sidecar's user and installs capture through it; the sidecar then attaches
// to the existing device, which the kernel allows its owner without any
// capability (drivers/net/tun.c, tun_not_capable). The device is plain —
// no virtio-net header, no offloads — because the offload set-up
// wireguard-go does on adoption (SIOCSIFMTU, among others) needs
// CAP_NET_ADMIN; the price is one packet per read and write. While no
// process holds the device the kernel drops what is routed to it: capture
// fails closed.

// tunFlags are the flags of a persistent plain TUN.
const tunFlags = unix.IFF_TUN | unix.IFF_NO_PI

// CreatePersistent creates the TUN named cfg.Name as a persistent device
// owned by uid (and gid when gid >= 0), gives it cfg's MTU and addresses
// and brings it up. A device of that name left by an earlier run is
// deleted first. An owner is required: an ownerless persistent TUN may be
// attached by any user that can open the clone device, who would then read
// the pod's traffic. node is the clone device to open (created when
// missing, as in a container).
func CreatePersistent(cfg DeviceConfig, node string, uid, gid int) error {
	if err := cfg.setDefaults(); err != nil {
		return err
	}
	if uid <= 0 {
		return fmt.Errorf("tun: persistent %s: an owner uid other than root is required (got %d)", cfg.Name, uid)
	}
	if old, err := netlink.LinkByName(cfg.Name); err == nil {
		if old.Type() != "tuntap" {
			return fmt.Errorf("tun: %s exists and is a %s device, not a TUN", cfg.Name, old.Type())
		}
		if err := netlink.LinkDel(old); err != nil {
			return fmt.Errorf("tun: deleting stale %s: %w", cfg.Name, err)
		}
	}
	if err := ensureNode(node); err != nil {
		return err
	}
	fd, err := unix.Open(node, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("tun: open %s: %w", node, err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(cfg.Name)
	if err != nil {
		return fmt.Errorf("tun: %s: %w", cfg.Name, err)
	}
	ifr.SetUint16(tunFlags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("tun: create %s: %w", cfg.Name, err)
	}
	del := func() {
		_ = unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 0)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOWNER, uid); err != nil {
		return fmt.Errorf("tun: %s: owner %d: %w", cfg.Name, uid, err)
	}
	if gid >= 0 {
		if err := unix.IoctlSetInt(fd, unix.TUNSETGROUP, gid); err != nil {
			return fmt.Errorf("tun: %s: group %d: %w", cfg.Name, gid, err)
		}
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		return fmt.Errorf("tun: %s: persist: %w", cfg.Name, err)
	}
	link, err := netlink.LinkByName(cfg.Name)
	if err == nil {
		err = netlink.LinkSetMTU(link, cfg.MTU)
	}
	if err != nil {
		del()
		return fmt.Errorf("tun: %s: MTU %d: %w", cfg.Name, cfg.MTU, err)
	}
	d := &Device{name: cfg.Name, mtu: cfg.MTU}
	if err := d.configure(cfg); err != nil {
		del()
		return err
	}
	return nil
}

// Attach opens the existing TUN named name through the clone device node,
// as its owner: no capability is needed. A device owned by another user
// is refused by the kernel (EPERM), and the error says whose it is.
func Attach(name, node string, mtu int) (*Device, error) {
	if mtu < 1280 || mtu > 65535 {
		return nil, fmt.Errorf("tun: MTU %d: want 1280..65535", mtu)
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("tun: attach %s: no such device (the init container creates it: meshtun agent --capture-only --tun-owner UID): %w", name, err)
	}
	f, err := os.OpenFile(node, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("tun: attach %s: open %s: %w", name, node, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		f.Close()
		return nil, err
	}
	ifr.SetUint16(tunFlags)
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) { ierr = unix.IoctlIfreq(int(fd), unix.TUNSETIFF, ifr) }); err != nil {
		ierr = err
	}
	if ierr != nil {
		f.Close()
		if errors.Is(ierr, unix.EPERM) {
			return nil, fmt.Errorf("tun: attach %s as uid %d: %w: the device is owned by another user (%s); the init container's --tun-owner must be this user", name, os.Getuid(), ierr, ownerOf(name))
		}
		return nil, fmt.Errorf("tun: attach %s: %w", name, ierr)
	}
	pd := newPlain(f, name, mtu)
	return &Device{dev: pd, name: name, mtu: mtu, index: link.Attrs().Index}, nil
}

// ownerOf names the device's owner and group, for errors.
func ownerOf(name string) string {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return "owner unknown"
	}
	if tt, ok := l.(*netlink.Tuntap); ok {
		return fmt.Sprintf("owner uid %d, group %d", tt.Owner, tt.Group)
	}
	return "owner unknown"
}

// plainDevice is a TUN without the virtio-net header: one packet per read
// and per write, nothing to negotiate, so it needs no capability. It
// implements wireguard-go's tun.Device for the stack's link endpoint.
type plainDevice struct {
	f      *os.File
	name   string
	mtu    int
	events chan wgtun.Event
	once   sync.Once
}

func newPlain(f *os.File, name string, mtu int) *plainDevice {
	d := &plainDevice{f: f, name: name, mtu: mtu, events: make(chan wgtun.Event, 1)}
	d.events <- wgtun.EventUp
	return d
}

func (d *plainDevice) File() *os.File             { return d.f }
func (d *plainDevice) MTU() (int, error)          { return d.mtu, nil }
func (d *plainDevice) Name() (string, error)      { return d.name, nil }
func (d *plainDevice) Events() <-chan wgtun.Event { return d.events }
func (d *plainDevice) BatchSize() int             { return 1 }

// Read reads one packet into bufs[0][offset:].
func (d *plainDevice) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := d.f.Read(bufs[0][offset:])
	if err != nil {
		return 0, err
	}
	sizes[0] = n
	return 1, nil
}

// Write writes each packet of bufs (from offset) as one packet.
func (d *plainDevice) Write(bufs [][]byte, offset int) (int, error) {
	for i, b := range bufs {
		if _, err := d.f.Write(b[offset:]); err != nil {
			return i, err
		}
	}
	return len(bufs), nil
}

func (d *plainDevice) Close() error {
	var err error
	d.once.Do(func() {
		err = d.f.Close()
		close(d.events)
	})
	return err
}
