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

// vnetIO moves packets between the stack and a TUN opened with
// IFF_VNET_HDR by reading and writing its descriptor directly, instead of
// through wireguard-go's Read and Write:
//
//   - Read lands each packet in a gVisor buffer view that becomes the
//     packet's payload; wireguard-go would read into its own buffer, copy
//     into ours, and the stack would copy again into a view (two copies of
//     every byte saved).
//
//   - Packets whose checksum the kernel marked partial (its own, never
//     computed: CHECKSUM_PARTIAL) or verified (DATA_VALID) are handed over
//     as validated; wireguard-go completes a partial checksum and
//     validChecksums would verify it again (two passes over every byte).
//
//   - A TCP super-packet the kernel sends (TSO) goes to the stack whole:
//     it is one valid large segment, as GRO would have built.
//
//   - Write sends the packet's views with writev (no copy into a
//     contiguous buffer) behind a virtio header that carries the stack's
//     GSO request and partial checksum (writeHdr): one write per 64 KiB
//     segment instead of one per MTU-sized one, and no checksum pass.
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

	// Write state, guarded by the link's writer mutex.
	whdr    [vnetHdrLen]byte
	wiov    []unix.Iovec
	wn      int
	werrno  syscall.Errno
	writeFn func(fd uintptr) bool
}

// tcpOffloads are the TUN offloads the raw path handles: checksum and TCP
// segmentation, no UDP segmentation.
const tcpOffloads = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6

// newVnetIO returns raw I/O on dev's descriptor, or nil when dev is not a
// Linux TUN with a virtio-net header (then wireguard-go's Read and Write
// are used). wireguard-go enables the header exactly when it batches.
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
	v.wiov = make([]unix.Iovec, 0, 8)
	v.writeFn = func(fd uintptr) bool {
		// Raw as well: a TUN write never waits (the kernel takes the
		// packet or drops it), and the runtime's syscall entry woke
		// sysmon from its idle sleep here once per response. A woken
		// sysmon polls every 20 µs for its next millisecond (about 50
		// thread switches while the proxy idles between requests):
		// with the upstream read, 30% of the proxy's CPU at a fixed
		// 1,000 req/s.
		r, _, e := unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&v.wiov[0])), uintptr(len(v.wiov)))
		v.wn, v.werrno = int(r), e
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

func (h *vnetHdr) encode(b []byte) {
	b[0] = h.flags
	b[1] = h.gsoType
	binary.NativeEndian.PutUint16(b[2:], h.hdrLen)
	binary.NativeEndian.PutUint16(b[4:], h.gsoSize)
	binary.NativeEndian.PutUint16(b[6:], h.csumStart)
	binary.NativeEndian.PutUint16(b[8:], h.csumOffset)
}

// writeHdr is the virtio header for a packet the stack sends. A TCP
// segment of an endpoint with HostGSO carries only the pseudo-header sum
// in its checksum field (CHECKSUM_PARTIAL): the header says where the
// kernel completes it, which it does only if the packet leaves the host
// through a device without checksum offload.
//
// The header asks for segmentation (gso_type, gso_size) only when the
// payload is larger than one segment. The kernel decides whether a packet
// from a TUN is a GSO one by its length past a 20-byte TCP header, options
// counted as payload; one with a TCP option (gVisor always sends
// timestamps) and a payload of one full segment is then marked GSO, and
// forwarding it out of the host's namespace (a veth, where GSO from a TUN
// is re-validated in validate_xmit_skb) makes tcp_gso_segment refuse it
// (payload ≤ gso_size): the packet is dropped, its retransmission (one
// segment again) too, and the flow stalls until the stack resets it.
// Locally delivered packets never reach that check.
func writeHdr(pkt *stack.PacketBuffer) vnetHdr {
	g := pkt.GSOOptions
	if (g.Type != stack.GSOTCPv4 && g.Type != stack.GSOTCPv6) || !g.NeedsCsum {
		// The stack computed every checksum.
		return vnetHdr{gsoType: vnetGSONone}
	}
	l3 := len(pkt.NetworkHeader().Slice())
	l4 := len(pkt.TransportHeader().Slice())
	h := vnetHdr{
		flags:      vnetFlagNeedsCsum,
		gsoType:    vnetGSONone,
		csumStart:  uint16(l3),
		csumOffset: g.CsumOffset,
		hdrLen:     uint16(l3 + l4),
	}
	if g.MSS > 0 && pkt.Data().Size() > int(g.MSS) {
		h.gsoSize = g.MSS
		if g.Type == stack.GSOTCPv4 {
			h.gsoType = vnetGSOTCPv4
		} else {
			h.gsoType = vnetGSOTCPv6
		}
	}
	return h
}

// write writes one packet with its virtio header (writeHdr). Called with
// the link's writer mutex held.
func (v *vnetIO) write(pkt *stack.PacketBuffer) error {
	h := writeHdr(pkt)
	h.encode(v.whdr[:])
	v.wiov = append(v.wiov[:0], iovec(v.whdr[:]))
	total := vnetHdrLen
	vl, skip := pkt.AsViewList()
	for view := vl.Front(); view != nil; view = view.Next() {
		s := view.AsSlice()
		if skip >= len(s) {
			skip -= len(s)
			continue
		}
		s = s[skip:]
		skip = 0
		v.wiov = append(v.wiov, iovec(s))
		total += len(s)
	}
	err := v.rc.Write(v.writeFn)
	n, errno := v.wn, v.werrno
	clear(v.wiov) // no pointers into packet memory kept
	if err != nil {
		return err
	}
	if errno != 0 {
		if errno == unix.EBADFD {
			return os.ErrClosed
		}
		return os.NewSyscallError("writev", errno)
	}
	if n != total {
		return fmt.Errorf("netstack: TUN write of %d bytes wrote %d", total, n)
	}
	return nil
}

func iovec(b []byte) unix.Iovec {
	v := unix.Iovec{Base: &b[0]}
	v.SetLen(len(b))
	return v
}
