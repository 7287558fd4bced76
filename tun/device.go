// Package tun owns the TUN device and the capture that routes a pod's
// traffic into it.
//
// The device comes from wireguard-go, opened with the virtio-net header so
// the kernel hands over TSO super-packets (split on Read) and accepts
// coalesced ones (GRO on Write). Capture is policy routing programmed over
// netlink: no iptables, no NAT, so every flow reaches the stack with its
// original addresses. Everything capture changes is recorded before it is
// changed, so teardown — or the next setup after a crash — restores it.
package tun

import (
	"fmt"
	"net/netip"
	"os"

	wgtun "golang.zx2c4.com/wireguard/tun"
)

// DeviceConfig describes the TUN device.
type DeviceConfig struct {
	Name  string         // default "meshtun0"
	MTU   int            // default 65535; 1280..65535
	Addrs []netip.Prefix // optional addresses on the device
}

func (c *DeviceConfig) setDefaults() error {
	if c.Name == "" {
		c.Name = "meshtun0"
	}
	if len(c.Name) > 15 {
		return fmt.Errorf("tun: name %q: longer than 15 bytes", c.Name)
	}
	if c.MTU == 0 {
		c.MTU = 65535
	}
	if c.MTU < 1280 || c.MTU > 65535 {
		return fmt.Errorf("tun: MTU %d: want 1280..65535", c.MTU)
	}
	return nil
}

// OffloadInfo says which kernel offloads the device negotiated.
type OffloadInfo struct {
	VNetHdr   bool // virtio-net header in use
	TSO       bool // kernel TSO super-packets split on Read
	GRO       bool // segments coalesced on Write
	BatchSize int  // packets per Read/Write vector
}

// Device is an open TUN device.
type Device struct {
	dev   wgtun.Device
	name  string
	mtu   int
	index int
}

// Dev returns the wireguard-go device for the stack's link endpoint.
func (d *Device) Dev() wgtun.Device { return d.dev }

// Name is the interface name.
func (d *Device) Name() string { return d.name }

// MTU is the configured MTU.
func (d *Device) MTU() int { return d.mtu }

// Index is the interface index (0 where the OS has none).
func (d *Device) Index() int { return d.index }

// Offloads reports the negotiated offloads. wireguard-go enables the
// virtio-net header (and with it TSO and GRO) exactly when it batches.
func (d *Device) Offloads() OffloadInfo {
	b := d.dev.BatchSize()
	v := b > 1
	return OffloadInfo{VNetHdr: v, TSO: v, GRO: v, BatchSize: b}
}

// File is the device's open file, for handing the device to a child
// process (exec.Cmd.ExtraFiles): meshtun agent keeps the device open, so
// the interface and the capture routes through it survive a proxy that
// exits, and each new proxy adopts it (tun.OpenFile). Handing it over puts
// the shared descriptor in blocking mode (os.File.Fd); the adopter sets it
// back. Nil where the platform's device has no file.
func (d *Device) File() *os.File {
	if f, ok := d.dev.(interface{ File() *os.File }); ok {
		return f.File()
	}
	return nil
}

// Close closes the device; the kernel removes the interface and its routes.
func (d *Device) Close() error { return d.dev.Close() }
