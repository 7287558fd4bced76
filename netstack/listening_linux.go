package netstack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// inet_diag's request for one socket (linux/inet_diag.h: struct
// inet_diag_req_v2 and its inet_diag_sockid); x/sys/unix does not carry
// them.
type inetDiagSockID struct {
	sport, dport [2]byte // network byte order
	src, dst     [16]byte
	ifindex      uint32
	cookie       [2]uint32
}

type inetDiagReqV2 struct {
	family, protocol, ext, pad uint8
	states                     uint32
	id                         inetDiagSockID
}

const (
	sizeofInetDiagReqV2 = int(unsafe.Sizeof(inetDiagReqV2{}))
	tcpListen           = 10 // TCP_LISTEN in include/net/tcp_states.h
	// inetDiagNoCookie (INET_DIAG_NOCOOKIE) in both words: match any
	// socket, not one identified by an earlier answer.
	inetDiagNoCookie = ^uint32(0)
)

// listeningOS asks the kernel for the socket an arriving SYN to dst would
// find: a non-dump SOCK_DIAG_BY_FAMILY request with dst as the local end
// and no remote end, which the kernel answers with inet_lookup (the exact
// established match fails, then the listener lookup). ENOENT means none.
// One netlink socket per call: the kernel answers within sendto, so the
// call never waits, and nothing is shared between goroutines.
func listeningOS(dst netip.AddrPort) (bool, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return false, fmt.Errorf("netlink sock_diag socket: %w", err)
	}
	defer unix.Close(fd)

	var b [unix.SizeofNlMsghdr + sizeofInetDiagReqV2]byte
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(b[6:], unix.NLM_F_REQUEST)
	binary.NativeEndian.PutUint32(b[8:], 1) // sequence
	r := (*inetDiagReqV2)(unsafe.Pointer(&b[unix.SizeofNlMsghdr]))
	r.protocol = unix.IPPROTO_TCP
	r.states = 1 << tcpListen
	r.id.cookie = [2]uint32{inetDiagNoCookie, inetDiagNoCookie}
	binary.BigEndian.PutUint16(r.id.sport[:], dst.Port())
	if a := dst.Addr(); a.Is4() {
		r.family = unix.AF_INET
		a4 := a.As4()
		copy(r.id.src[:], a4[:])
	} else {
		r.family = unix.AF_INET6
		r.id.src = a.As16()
	}
	if err := unix.Sendto(fd, b[:], 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return false, fmt.Errorf("netlink sock_diag request for %v: %w", dst, err)
	}

	// The answer: an inet_diag_msg (idiag_family, idiag_state, …) or an
	// NLMSG_ERROR carrying -errno.
	var rb [512]byte
	n, _, err := unix.Recvfrom(fd, rb[:], 0)
	if err != nil {
		return false, fmt.Errorf("netlink sock_diag answer for %v: %w", dst, err)
	}
	if n < unix.SizeofNlMsghdr+4 {
		return false, fmt.Errorf("netlink sock_diag answer for %v: %d bytes", dst, n)
	}
	switch typ := binary.NativeEndian.Uint16(rb[4:]); typ {
	case unix.NLMSG_ERROR:
		errno := unix.Errno(-int32(binary.NativeEndian.Uint32(rb[unix.SizeofNlMsghdr:])))
		if errors.Is(errno, unix.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("netlink sock_diag for %v: %w", dst, errno)
	case unix.SOCK_DIAG_BY_FAMILY:
		return rb[unix.SizeofNlMsghdr+1] == tcpListen, nil
	default:
		return false, fmt.Errorf("netlink sock_diag for %v: unexpected message type %d", dst, typ)
	}
}
