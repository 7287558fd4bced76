//go:build !linux

package tun

import (
	"fmt"

	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Open creates the TUN device (utun on darwin), gives it cfg.Addrs and
// brings it up (configureDevice). Laptop mode's routes are the capture
// code's.
func Open(cfg DeviceConfig) (*Device, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	dev, err := wgtun.CreateTUN(cfg.Name, cfg.MTU)
	if err != nil {
		return nil, fmt.Errorf("tun: create %s: %w", cfg.Name, err)
	}
	name, err := dev.Name()
	if err != nil {
		name = cfg.Name
	}
	if err := configureDevice(name, cfg.Addrs); err != nil {
		dev.Close()
		return nil, err
	}
	return &Device{dev: dev, name: name, mtu: cfg.MTU}, nil
}

// OpenFile adopts an inherited TUN file descriptor (Linux only: the
// agent's fd hand-over is a sidecar feature).
func OpenFile(fd int, mtu int) (*Device, error) {
	return nil, fmt.Errorf("tun: --tun-fd is supported on Linux only")
}
