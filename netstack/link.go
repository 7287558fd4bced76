package netstack

import (
	"errors"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/rs/zerolog"
	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
)

// tunOffset is the headroom left in front of every packet handed to the
// device. wireguard-go's Linux TUN writes its virtio-net header there
// (it needs at least 10 bytes); 16 keeps the IP header 8-byte aligned.
const tunOffset = 16

// outQueueLen bounds the packets gVisor may have pending for the device.
// A full list blocks the writing endpoint (backpressure) instead of
// dropping, which would turn into retransmissions.
const outQueueLen = 1024

// linkEndpoint bridges a wireguard-go tun.Device and a gVisor NIC.
//
// On a Linux TUN with a virtio-net header the device's descriptor is read
// and written directly (vnetIO): packets land in the stack's own buffers,
// checksums the kernel never computed are not computed here either, TCP
// super-packets reach the stack whole, and the stack's TCP endpoints send
// segments of up to 64 KiB with the checksum left partial (HostGSO), which
// the kernel splits only if they leave through a device that cannot take
// them whole. Other devices go through wireguard-go's Read and Write (GRO
// on write).
//
// Inbound (device → stack) runs on one goroutine that reads packets: on
// the raw path each goes to the stack as read (TCP super-packets whole);
// on the wireguard-go path vectors of split segments go through gVisor's
// GRO, flushed once per vector, so the stack sees few large segments. Outbound (stack → device)
// has no goroutine of its own: the stack goroutine that sends a packet
// writes it, together with whatever other goroutines queued meanwhile, in
// one vector, which lets wireguard-go coalesce consecutive segments of a
// flow (GRO on write). An idle link thus adds no goroutine hand-off to a
// packet's latency.
type linkEndpoint struct {
	dev   wgtun.Device
	raw   *vnetIO // nil: through wireguard-go's Read and Write
	mtu   atomic.Uint32
	batch int
	log   zerolog.Logger

	mu      sync.Mutex // guards started
	started bool
	// dispatcher is the NIC's, swapped by Attach (nil: detached). GRO
	// delivers through live, which reads it per packet: the NIC's removal
	// (Attach(nil)) races with the inbound goroutine, and GRO's own
	// Dispatcher field is not safe to change under it.
	dispatcher atomic.Pointer[dispatcherRef]

	gro         gro.GRO // owned by the inbound goroutine; delivers to live
	badChecksum atomic.Uint64

	acks *ackDelay // pure ACKs held per flow on the way out

	// Outbound combining writer: producers append to pending; whoever
	// holds writer drains pending to the device. No goroutine hand-off
	// when idle, vectors of up to batch packets under load.
	qmu     sync.Mutex
	qcond   *sync.Cond // signalled when pending shrinks (backpressure)
	pending []*stack.PacketBuffer
	writer  sync.Mutex // held by the goroutine writing to the device
	wbufs   [][]byte   // guarded by writer; wireguard-go path, made on first use
	wvec    [][]byte   // guarded by writer
	wpkts   []*stack.PacketBuffer

	done    chan struct{}
	closing sync.Once
	wg      sync.WaitGroup
}

var _ stack.LinkEndpoint = (*linkEndpoint)(nil)

func newLinkEndpoint(dev wgtun.Device, mtu uint32, log zerolog.Logger) *linkEndpoint {
	batch := dev.BatchSize()
	if batch < 1 {
		batch = 1
	}
	raw, err := newVnetIO(dev)
	if err != nil {
		log.Warn().Err(err).Msg("tun: no direct descriptor I/O; using wireguard-go's read and write")
		raw = nil
	}
	e := &linkEndpoint{
		dev:   dev,
		raw:   raw,
		batch: batch,
		log:   log,
		done:  make(chan struct{}),
	}
	e.qcond = sync.NewCond(&e.qmu)
	e.wpkts = make([]*stack.PacketBuffer, 0, batch)
	e.mtu.Store(mtu)
	e.gro.Init(true)
	e.gro.Dispatcher = (*liveDispatcher)(e)
	e.acks = newAckDelay(mtu, e.enqueue, e.flush)
	return e
}

type dispatcherRef struct{ d stack.NetworkDispatcher }

// liveDispatcher is the stack.NetworkDispatcher GRO delivers to: the
// endpoint's current dispatcher, or nothing once detached.
type liveDispatcher linkEndpoint

func (l *liveDispatcher) current() stack.NetworkDispatcher {
	if r := (*linkEndpoint)(l).dispatcher.Load(); r != nil {
		return r.d
	}
	return nil
}

// DeliverNetworkPacket implements stack.NetworkDispatcher.
func (l *liveDispatcher) DeliverNetworkPacket(p tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if d := l.current(); d != nil {
		d.DeliverNetworkPacket(p, pkt)
	}
}

// DeliverLinkPacket implements stack.NetworkDispatcher.
func (l *liveDispatcher) DeliverLinkPacket(p tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if d := l.current(); d != nil {
		d.DeliverLinkPacket(p, pkt)
	}
}

// MTU implements stack.LinkEndpoint.
func (e *linkEndpoint) MTU() uint32 { return e.mtu.Load() }

// SetMTU implements stack.LinkEndpoint.
func (e *linkEndpoint) SetMTU(mtu uint32) { e.mtu.Store(mtu) }

// MaxHeaderLength implements stack.LinkEndpoint: a TUN carries bare IP.
func (*linkEndpoint) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.LinkEndpoint.
func (*linkEndpoint) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.LinkEndpoint.
func (*linkEndpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.LinkEndpoint.
//
// RX checksum offload is claimed because the NIC overwrites each packet's
// RXChecksumValidated with this capability: without it, segments merged by
// GRO (whose checksums are stale by design) would be dropped. The claim is
// made true by validChecksums, run on every packet before GRO. TX checksums
// are computed by the stack, except for TCP segments under HostGSO (see
// writeHdr): other packets reach the kernel as they are.
func (*linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// GSOMaxSize implements stack.GSOEndpoint: on the raw path a TCP segment
// may fill an IP packet.
func (e *linkEndpoint) GSOMaxSize() uint32 {
	if e.raw == nil {
		return 0
	}
	return 1<<16 - 1
}

// SupportedGSO implements stack.GSOEndpoint: HostGSO on the raw path
// (vnetIO.write hands segmentation and the checksum to the kernel).
func (e *linkEndpoint) SupportedGSO() stack.SupportedGSO {
	if e.raw == nil {
		return stack.GSONotSupported
	}
	return stack.HostGSOSupported
}

// ARPHardwareType implements stack.LinkEndpoint.
func (*linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.LinkEndpoint.
func (*linkEndpoint) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.LinkEndpoint.
func (*linkEndpoint) ParseHeader(*stack.PacketBuffer) bool { return true }

// SetOnCloseAction implements stack.LinkEndpoint. The action gVisor installs
// removes the NIC, which closes this endpoint again; the device's lifetime
// belongs to its owner, so there is nothing to run here.
func (e *linkEndpoint) SetOnCloseAction(func()) {}

// IsAttached implements stack.LinkEndpoint.
func (e *linkEndpoint) IsAttached() bool {
	return e.dispatcher.Load() != nil
}

// Attach implements stack.LinkEndpoint. It may run while the inbound
// goroutine delivers (the NIC's removal calls Attach(nil)).
func (e *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	if d == nil {
		e.dispatcher.Store(nil)
		return
	}
	e.dispatcher.Store(&dispatcherRef{d: d})
}

// start begins reading the device, once the NIC is fully configured and
// enabled: packets read earlier would be dropped by a disabled NIC.
func (e *linkEndpoint) start() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.dispatcher.Load() == nil || e.started {
		return
	}
	e.started = true
	go e.inboundLoop()
}

// Wait implements stack.LinkEndpoint. The inbound goroutine is blocked in
// the device's Read and ends when the device's owner closes it, after the
// stack is gone; the outbound path has no goroutine.
func (e *linkEndpoint) Wait() {}

// Close implements stack.LinkEndpoint. It stops the outbound goroutine; the
// inbound one ends when the device is closed by its owner.
func (e *linkEndpoint) Close() {
	e.closing.Do(func() {
		close(e.done)
		e.qmu.Lock()
		for _, p := range e.pending {
			p.DecRef()
		}
		e.pending = nil
		e.qcond.Broadcast()
		e.qmu.Unlock()
		// After the broadcast: a sender waiting for room holds its slot.
		e.acks.close()
	})
}

// WritePackets implements stack.LinkWriter. Each packet is appended to
// the pending list (a pure ACK may be held instead, see ackDelay); if no
// other goroutine is writing to the device, this one becomes the writer
// and drains the list, its own packets included. When the list is full,
// producers wait (backpressure, not drops).
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		if !e.acks.send(pkt) {
			break
		}
		n++
	}
	e.flush()
	if n == 0 && pkts.Len() > 0 {
		return 0, &tcpip.ErrClosedForSend{}
	}
	return n, nil
}

// enqueue appends pkt (with a reference of its own) to the pending list,
// waiting while the list is full; false once the endpoint is closed.
func (e *linkEndpoint) enqueue(pkt *stack.PacketBuffer) bool {
	e.qmu.Lock()
	defer e.qmu.Unlock()
	for len(e.pending) >= outQueueLen && !isClosed(e.done) {
		e.qcond.Wait()
	}
	if isClosed(e.done) {
		return false
	}
	pkt.IncRef()
	e.pending = append(e.pending, pkt)
	return true
}

// flush writes pending packets while this goroutine can hold the writer
// role. After releasing it, pending is checked again: a producer that
// appended while the role was held, and failed to take it, relies on that.
func (e *linkEndpoint) flush() {
	for e.writer.TryLock() {
		for e.writeBatch() {
		}
		e.writer.Unlock()
		e.qmu.Lock()
		more := len(e.pending) > 0 && !isClosed(e.done)
		e.qmu.Unlock()
		if !more {
			return
		}
	}
}

// writeBatch takes up to one vector of pending packets and writes it.
// It reports whether it wrote anything. Called with writer held.
func (e *linkEndpoint) writeBatch() bool {
	e.qmu.Lock()
	k := min(len(e.pending), e.batch)
	e.wpkts = append(e.wpkts[:0], e.pending[:k]...)
	rest := copy(e.pending, e.pending[k:])
	clear(e.pending[rest:])
	e.pending = e.pending[:rest]
	if k > 0 {
		e.qcond.Broadcast()
	}
	e.qmu.Unlock()
	if k == 0 {
		return false
	}
	if e.raw != nil {
		for _, pkt := range e.wpkts {
			// A packet the kernel refuses is lost as on a wire (below).
			_ = e.raw.write(pkt)
			pkt.DecRef()
		}
		clear(e.wpkts)
		return true
	}
	if e.wbufs == nil {
		// Made on first use, so that an idle proxy holds no batch buffers,
		// and off the Go heap (batchBufs): on the heap their virtual size
		// counts as live and raises the collector's target. Released when
		// the endpoint is collected, since a writer may hold them until then.
		var release func()
		e.wbufs, release = batchBufs(e.batch, tunOffset+int(e.mtu.Load()))
		runtime.AddCleanup(e, func(f func()) { f() }, release)
		e.wvec = make([][]byte, 0, e.batch)
	}
	e.wvec = e.wvec[:0]
	for i, pkt := range e.wpkts {
		n := tunOffset + copyPacket(e.wbufs[i][tunOffset:], pkt)
		e.wvec = append(e.wvec, e.wbufs[i][:n])
		pkt.DecRef()
	}
	clear(e.wpkts)
	// A packet the kernel refuses (e.g. its route is gone) is lost as on a
	// wire and TCP recovers; a closed device ends the stack anyway. Not
	// logged: this is per packet.
	_, _ = e.dev.Write(e.wvec, tunOffset)
	return true
}

// inboundLoop reads packet vectors from the device and injects them into
// the stack.
func (e *linkEndpoint) inboundLoop() {
	if e.raw != nil {
		e.rawInboundLoop()
		return
	}
	mtu := int(e.mtu.Load())
	// Virtual size batch×MTU, but only the bytes actually written are
	// touched: small segments use a page each, big ones are few. Off the
	// Go heap (batchBufs); deliver copies out of them, so they are free
	// once the loop returns.
	bufs, release := batchBufs(e.batch, tunOffset+mtu)
	defer release()
	sizes := make([]int, e.batch)
	for {
		n, err := e.dev.Read(bufs, sizes, tunOffset)
		if err != nil {
			if errors.Is(err, os.ErrClosed) || isClosed(e.done) {
				return
			}
			if errors.Is(err, wgtun.ErrTooManySegments) {
				// The vector was too short for a super-packet: the
				// segments that fit were returned; the kernel's TCP
				// retransmits the rest.
				e.log.Debug().Err(err).Msg("tun read")
			} else {
				e.log.Error().Err(err).Msg("tun read failed; stopping inbound path")
				return
			}
		}
		if e.dispatcher.Load() == nil {
			continue
		}
		for i := 0; i < n; i++ {
			e.deliver(bufs[i][tunOffset : tunOffset+sizes[i]])
		}
		e.gro.Flush()
	}
}

// deliver hands one raw IP packet to GRO (and thereby to the stack).
func (e *linkEndpoint) deliver(b []byte) {
	if len(b) == 0 {
		return
	}
	var proto tcpip.NetworkProtocolNumber
	switch header.IPVersion(b) {
	case header.IPv4Version:
		proto = header.IPv4ProtocolNumber
	case header.IPv6Version:
		proto = header.IPv6ProtocolNumber
	default:
		return
	}
	if !validChecksums(b) {
		e.badChecksum.Add(1)
		return
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		Payload: buffer.MakeWithData(b),
	})
	pkt.NetworkProtocolNumber = proto
	// Checked above: GRO and the stack need not check again.
	pkt.RXChecksumValidated = true
	e.gro.Enqueue(pkt)
	pkt.DecRef()
}

// rawInboundLoop is inboundLoop on the raw path: one packet per read,
// delivered at once. GRO is skipped: the kernel already hands over TCP
// super-packets whole, so it would merge nothing, and holding a packet
// until the device runs dry costs a read syscall per packet.
func (e *linkEndpoint) rawInboundLoop() {
	for {
		pkt, proto, err := e.raw.read()
		if err != nil {
			switch {
			case err == errBadChecksum:
				e.badChecksum.Add(1)
				continue
			case err == errVnetBadPacket:
				continue
			case errors.Is(err, os.ErrClosed) || isClosed(e.done):
				return
			}
			e.log.Error().Err(err).Msg("tun read failed; stopping inbound path")
			return
		}
		if d := (*liveDispatcher)(e).current(); d != nil {
			d.DeliverNetworkPacket(proto, pkt)
		}
		pkt.DecRef()
	}
}

// copyPacket copies the packet's bytes (network header onwards) into dst
// without the per-call slice AsSlices would allocate.
func copyPacket(dst []byte, pkt *stack.PacketBuffer) int {
	vl, skip := pkt.AsViewList()
	n := 0
	for v := vl.Front(); v != nil; v = v.Next() {
		s := v.AsSlice()
		if skip > 0 {
			if skip >= len(s) {
				skip -= len(s)
				continue
			}
			s = s[skip:]
			skip = 0
		}
		n += copy(dst[n:], s)
	}
	return n
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
