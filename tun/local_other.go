//go:build !linux && !darwin

package tun

import (
	"errors"
	"net/netip"

	"github.com/rs/zerolog"
)

// Local is laptop-mode capture; only Linux and darwin have it.
type Local struct{}

// SetupLocal is not implemented on this OS.
func SetupLocal(cfg LocalConfig, log zerolog.Logger) (*Local, error) {
	return nil, errors.New("local capture: supported on Linux and darwin only")
}

// Teardown does nothing.
func (l *Local) Teardown() error { return nil }

// DefaultInterface is not implemented on this OS.
func DefaultInterface() (int, error) { return 0, errors.New("not supported on this OS") }

// configureDevice brings nothing up: the OS brings its TUN devices up, and
// addresses on the device are supported on Linux and darwin only.
func configureDevice(name string, addrs []netip.Prefix) error {
	if len(addrs) > 0 {
		return errors.New("tun: addresses on the device: supported on Linux and darwin only")
	}
	return nil
}
