package upstream

import (
	"strings"

	"golang.org/x/sys/unix"
)

// setMark: darwin has no SO_MARK; laptop mode pins sockets to the
// outgoing interface instead (bindInterface).
func setMark(fd int, mark uint32) error { return nil }

// bindInterface pins the socket to an interface (IP_BOUND_IF /
// IPV6_BOUND_IF), so the kernel does not route it into the utun device
// even when its destination is in a captured CIDR.
func bindInterface(fd int, network string, index int) error {
	if strings.HasSuffix(network, "6") {
		return unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_BOUND_IF, index)
	}
	return unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_BOUND_IF, index)
}
