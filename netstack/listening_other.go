//go:build !linux

package netstack

import (
	"errors"
	"net/netip"
)

// listeningOS has no probe outside Linux: the answer is "unknown", and
// inbound flows are accepted before they are dialed.
func listeningOS(netip.AddrPort) (bool, error) {
	return false, errors.New("no listening-socket probe on this platform")
}
