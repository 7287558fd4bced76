//go:build !linux

package tun

import "errors"

var errPersistNotLinux = errors.New("tun: the least-privilege TUN hand-over (persistent device, attach by owner) is Linux only")

// CreatePersistent is Linux-only.
func CreatePersistent(cfg DeviceConfig, node string, uid, gid int) error { return errPersistNotLinux }

// Attach is Linux-only.
func Attach(name, node string, mtu int) (*Device, error) { return nil, errPersistNotLinux }
