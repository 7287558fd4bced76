//go:build !linux

package tun

import (
	"errors"
	"net/netip"

	"github.com/rs/zerolog"
)

var errNotLinux = errors.New("capture: sidecar capture is only supported on Linux")

// SetupCapture is Linux-only.
func SetupCapture(cfg CaptureConfig, log zerolog.Logger) (*Capture, error) { return nil, errNotLinux }

// PodAddrs is Linux-only.
func PodAddrs(iface string, ips []netip.Addr) (string, []netip.Addr, error) {
	return "", nil, errNotLinux
}

// Teardown is Linux-only.
func (c *Capture) Teardown() error { return errNotLinux }

// CleanupStale is Linux-only.
func CleanupStale(stateDir string, log zerolog.Logger) error { return nil }
