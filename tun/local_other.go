//go:build !linux && !darwin

package tun

import (
	"errors"

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
