package netstack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
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

// diagSockets keeps up to two netlink sockets between probes, lock-free
// (a slot holds fd+1, 0 when empty): opening and closing one costs about
// 8 µs of a probe's 11 (BenchmarkListenProbe), and two cover the two
// cores of a pod's proxy; a probe that finds both taken opens one of its
// own. They stay open for the process's life.
var diagSockets [2]atomic.Int32

// diagSeq numbers the requests, so an answer is known to be this one's.
var diagSeq atomic.Uint32

func getDiagSocket() (int, error) {
	for i := range diagSockets {
		if v := diagSockets[i].Swap(0); v != 0 {
			return int(v - 1), nil
		}
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return -1, fmt.Errorf("netlink sock_diag socket: %w", err)
	}
	return fd, nil
}

func putDiagSocket(fd int) {
	for i := range diagSockets {
		if diagSockets[i].CompareAndSwap(0, int32(fd+1)) {
			return
		}
	}
	unix.Close(fd)
}

// listeningOS asks the kernel for the socket an arriving SYN to dst would
// find: a non-dump SOCK_DIAG_BY_FAMILY request with dst as the local end
// and no remote end, which the kernel answers with inet_lookup (the exact
// established match fails, then the listener lookup). ENOENT means none.
// The kernel answers within the write with exactly one message (the
// socket, or an error), so the read never waits and the socket is clean
// for the next probe; after any failure it is closed, not reused.
func listeningOS(dst netip.AddrPort) (listening bool, err error) {
	fd, err := getDiagSocket()
	if err != nil {
		return false, err
	}
	defer func() {
		if err != nil {
			unix.Close(fd)
			return
		}
		putDiagSocket(fd)
	}()

	var b [unix.SizeofNlMsghdr + sizeofInetDiagReqV2]byte
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(b[6:], unix.NLM_F_REQUEST)
	seq := diagSeq.Add(1)
	binary.NativeEndian.PutUint32(b[8:], seq)
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
	if _, err := unix.Write(fd, b[:]); err != nil { // to the kernel: an unconnected netlink socket sends to port 0
		return false, fmt.Errorf("netlink sock_diag request for %v: %w", dst, err)
	}

	// The answer: an inet_diag_msg (idiag_family, idiag_state, …) or an
	// NLMSG_ERROR carrying -errno.
	var rb [512]byte
	n, err := unix.Read(fd, rb[:])
	if err != nil {
		return false, fmt.Errorf("netlink sock_diag answer for %v: %w", dst, err)
	}
	if n < unix.SizeofNlMsghdr+4 {
		return false, fmt.Errorf("netlink sock_diag answer for %v: %d bytes", dst, n)
	}
	if got := binary.NativeEndian.Uint32(rb[8:]); got != seq {
		return false, fmt.Errorf("netlink sock_diag answer for %v: sequence %d, want %d", dst, got, seq)
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
