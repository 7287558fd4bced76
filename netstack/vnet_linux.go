package netstack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// vnetHdrLen is sizeof(struct virtio_net_hdr), the header a TUN opened with
// IFF_VNET_HDR puts in front of every packet, in both directions.
const vnetHdrLen = 10

// virtio_net_hdr fields (linux/virtio_net.h).
const (
	vnetFlagNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM: checksum is partial
	vnetFlagDataValid = 2 // VIRTIO_NET_HDR_F_DATA_VALID: checksum verified

	vnetGSONone  = 0
	vnetGSOTCPv4 = 1
	vnetGSOTCPv6 = 4
)

// vnetHdr is a decoded virtio_net_hdr. The kernel's TUN uses the host's
// byte order for it (no TUNSETVNETLE/BE is set).
type vnetHdr struct {
	flags      uint8
	gsoType    uint8
	hdrLen     uint16
	gsoSize    uint16
	csumStart  uint16
	csumOffset uint16
}

func (h *vnetHdr) decode(b []byte) {
	h.flags = b[0]
	h.gsoType = b[1]
	h.hdrLen = binary.NativeEndian.Uint16(b[2:])
	h.gsoSize = binary.NativeEndian.Uint16(b[4:])
	h.csumStart = binary.NativeEndian.Uint16(b[6:])
	h.csumOffset = binary.NativeEndian.Uint16(b[8:])
}

// vnetIO reads packets for the stack from a TUN opened with IFF_VNET_HDR
// by reading its descriptor directly, instead of through wireguard-go's
// Read:
//
//   - Read lands each packet in a gVisor buffer view that becomes the
//     packet's payload; wireguard-go would read into its own buffer, copy
//     into ours, and the stack would copy again into a view (two copies of
//     every byte saved).
//   - Packets whose checksum the kernel marked partial (its own, never
//     computed: CHECKSUM_PARTIAL) or verified (DATA_VALID) are handed over
//     as validated; wireguard-go completes a partial checksum and
//     validChecksums would verify it again (two passes over every byte).
//   - A TCP super-packet the kernel sends (TSO) goes to the stack whole:
//     it is one valid large segment, as GRO would have built.
//
// Writes stay with wireguard-go (GRO on write). Writing the stack's views
// with writev and HostGSO (large segments, checksum left partial) was
// measured faster but broke flows whose packets the kernel forwards out of
// the pod (inbound capture: connections stalled or were reset), so it is
// not done.
//
// The device's other offloads are narrowed to TCP (TUNSETOFFLOAD without
// USO): UDP super-packets would need splitting here.
type vnetIO struct {
	f  *os.File
	rc syscall.RawConn

	// Read state, owned by the inbound goroutine.
	rhdr  [vnetHdrLen]byte
	rview *buffer.View // next read target after the head, a maximum-size pooled chunk
	riov  [3]unix.Iovec

	// Syscall results, in fields so that the RawConn callbacks (made
	// once) do not allocate a closure per packet.
	rn     int
	rerrno syscall.Errno
	readFn func(fd uintptr) bool
}

// tcpOffloads are the TUN offloads the raw path handles: checksum and TCP
// segmentation, no UDP segmentation.
const tcpOffloads = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6

// newVnetIO returns raw reads of dev's descriptor, or nil when dev is not
// a Linux TUN with a virtio-net header (then wireguard-go's Read is used). wireguard-go enables the header exactly when it batches.
func newVnetIO(dev wgtun.Device) (*vnetIO, error) {
	fd, ok := dev.(interface{ File() *os.File })
	if !ok || dev.BatchSize() <= 1 {
		return nil, nil
	}
	f := fd.File()
	if f == nil {
		return nil, nil
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("netstack: TUN descriptor: %w", err)
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		ierr = unix.IoctlSetInt(int(fd), unix.TUNSETOFFLOAD, tcpOffloads)
	}); err != nil {
		return nil, fmt.Errorf("netstack: TUN descriptor: %w", err)
	}
	if ierr != nil {
		return nil, fmt.Errorf("netstack: TUN offloads (TUNSETOFFLOAD): %w", ierr)
	}
	v := &vnetIO{f: f, rc: rc}
	v.readFn = func(fd uintptr) bool {
		// Raw: the descriptor is non-blocking, so the read never waits
		// (an empty device returns EAGAIN and the poller waits). The
		// runtime's syscall bookkeeping would wake its monitor thread
		// (sysmon) from its idle sleep on every packet after an idle
		// spell: a futex wake and a thread switch per request.
		r, _, e := unix.RawSyscall(unix.SYS_READV, fd, uintptr(unsafe.Pointer(&v.riov[0])), uintptr(len(v.riov)))
		v.rn, v.rerrno = int(r), e
		return e != unix.EAGAIN
	}
	return v, nil
}

// copyBelow is the packet size under which a read packet is copied into a
// view of its own size and the maximum-size read view is kept for the next
// read: a small packet (an ACK, a request) then pins at most twice its
// size in the receive queue instead of 64 KiB.
const copyBelow = buffer.MaxChunkSize / 4

// headLen is how much of a read packet goes into a small view of its own,
// ahead of the large one: more than any IP header plus TCP header, so the
// stack's header parsing touches only it. gVisor copies the whole chunk
// under a header it parses while another reference to it exists (which
// the IPv4 endpoint always holds): 128 bytes instead of 64 KiB per packet.
const headLen = 128

// errVnetBadPacket marks a read packet that is dropped (malformed, or an
// offload the raw path did not ask for).
var errVnetBadPacket = errors.New("netstack: malformed TUN packet")

// read reads one packet. It returns the packet ready for the stack (the
// caller owns the reference) and its network protocol, or
// errVnetBadPacket or errBadChecksum for a packet to drop, or the device's
// error.
func (v *vnetIO) read() (*stack.PacketBuffer, tcpip.NetworkProtocolNumber, error) {
	if v.rview == nil {
		v.rview = buffer.NewViewSize(buffer.MaxChunkSize)
	}
	head := buffer.NewViewSize(headLen)
	// The views are fresh and unshared: writing into their bytes is safe.
	hdata, data := head.AsSlice(), v.rview.AsSlice()
	v.riov[0] = iovec(v.rhdr[:])
	v.riov[1] = iovec(hdata)
	v.riov[2] = iovec(data)
	err := v.rc.Read(v.readFn)
	n, errno := v.rn, v.rerrno
	clear(v.riov[1:]) // no pointers into packet memory kept
	if err == nil && errno != 0 {
		switch errno {
		case unix.EBADFD:
			err = os.ErrClosed
		default:
			err = os.NewSyscallError("readv", errno)
		}
	}
	if err == nil && n <= vnetHdrLen {
		err = errVnetBadPacket
	}
	if err != nil {
		head.Release()
		return nil, 0, err
	}
	n -= vnetHdrLen
	var h vnetHdr
	h.decode(v.rhdr[:])
	hn := min(n, headLen)
	first, rest := hdata[:hn], data[:n-hn]
	var proto tcpip.NetworkProtocolNumber
	switch header.IPVersion(first) {
	case header.IPv4Version:
		proto = header.IPv4ProtocolNumber
	case header.IPv6Version:
		proto = header.IPv6ProtocolNumber
	default:
		head.Release()
		return nil, 0, errVnetBadPacket
	}
	validated := false
	switch h.gsoType {
	case vnetGSONone:
		validated = h.flags&(vnetFlagNeedsCsum|vnetFlagDataValid) != 0
	case vnetGSOTCPv4, vnetGSOTCPv6:
		// A TSO super-packet: the kernel's own segment, its IP header
		// covering the whole, its TCP checksum partial.
		validated = true
	default:
		head.Release()
		return nil, 0, errVnetBadPacket
	}
	if !validated && !validChecksumsSplit(first, rest) {
		head.Release()
		return nil, 0, errBadChecksum
	}
	head.CapLength(hn)
	b := buffer.MakeWithView(head)
	switch {
	case len(rest) == 0:
	case len(rest) < copyBelow:
		// Small: copied into a view of its own size; the large view is
		// kept for the next read.
		b.Append(buffer.NewViewWithData(rest))
	default:
		v.rview.CapLength(len(rest))
		b.Append(v.rview)
		v.rview = nil
	}
	p := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: b})
	p.NetworkProtocolNumber = proto
	p.RXChecksumValidated = true
	return p, proto, nil
}

// errBadChecksum marks a read packet dropped for a bad checksum.
var errBadChecksum = errors.New("netstack: bad checksum")

func iovec(b []byte) unix.Iovec {
	v := unix.Iovec{Base: &b[0]}
	v.SetLen(len(b))
	return v
}
