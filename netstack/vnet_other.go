//go:build !linux

package netstack

import (
	"errors"

	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// vnetIO is Linux's raw virtio-net-header path; elsewhere the device is
// always used through wireguard-go's Read and Write.
type vnetIO struct{}

func newVnetIO(wgtun.Device) (*vnetIO, error) { return nil, nil }

var (
	errVnetBadPacket = errors.New("netstack: malformed TUN packet")
	errBadChecksum   = errors.New("netstack: bad checksum")
)

func (*vnetIO) read() (*stack.PacketBuffer, tcpip.NetworkProtocolNumber, error) {
	return nil, 0, errors.New("netstack: no raw TUN path on this platform")
}

func (*vnetIO) write(*stack.PacketBuffer) error {
	return errors.New("netstack: no raw TUN path on this platform")
}
