//go:build !linux

package tun

// Block is Linux-only.
func (c *Capture) Block() error { return errNotLinux }

// Unblock is Linux-only.
func (c *Capture) Unblock() error { return errNotLinux }
