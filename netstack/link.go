package netstack

import (
	"errors"
	"os"
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

// outQueueLen bounds the packets gVisor may have queued for the device.
// A full queue blocks the writing TCP endpoint (backpressure) instead of
// dropping, which a drop-based queue would turn into retransmissions.
const outQueueLen = 1024

// linkEndpoint bridges a wireguard-go tun.Device and a gVisor NIC.
//
// Inbound (device → stack) runs on one goroutine that reads vectors of up
// to BatchSize packets (wireguard-go has already split the kernel's TSO
// super-packets) and passes them through gVisor's GRO, flushed once per
// vector, so the stack sees few large segments. Outbound (stack → device)
// goes through a bounded queue drained by one goroutine that writes vectors,
// which lets wireguard-go coalesce consecutive segments of a flow (GRO on
// write) into one virtio super-packet.
type linkEndpoint struct {
	dev   wgtun.Device
	mtu   atomic.Uint32
	batch int
	log   zerolog.Logger

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher
	started    bool

	gro         gro.GRO // owned by the inbound goroutine
	badChecksum atomic.Uint64

	outQ    chan *stack.PacketBuffer
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
	e := &linkEndpoint{
		dev:   dev,
		batch: batch,
		log:   log,
		outQ:  make(chan *stack.PacketBuffer, outQueueLen),
		done:  make(chan struct{}),
	}
	e.mtu.Store(mtu)
	e.gro.Init(true)
	return e
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
// are computed by the stack: packets the device does not coalesce reach the
// kernel as they are.
func (*linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
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
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// Attach implements stack.LinkEndpoint. The first attach starts the two
// device goroutines.
func (e *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dispatcher = d
	e.gro.Dispatcher = d
	if d == nil || e.started {
		return
	}
	e.started = true
	e.wg.Add(1)
	go e.inboundLoop()
	go e.outboundLoop()
}

// Wait implements stack.LinkEndpoint: it waits for the outbound goroutine.
// The inbound one is blocked in the device's Read and ends when the
// device's owner closes it, after the stack is gone.
func (e *linkEndpoint) Wait() { e.wg.Wait() }

// Close implements stack.LinkEndpoint. It stops the outbound goroutine; the
// inbound one ends when the device is closed by its owner.
func (e *linkEndpoint) Close() {
	e.closing.Do(func() {
		close(e.done)
	})
}

// WritePackets implements stack.LinkWriter. It only queues: the outbound
// goroutine batches the writes to the device.
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		pkt.IncRef()
		select {
		case e.outQ <- pkt:
			n++
		case <-e.done:
			pkt.DecRef()
			if n == 0 {
				return 0, &tcpip.ErrClosedForSend{}
			}
			return n, nil
		}
	}
	return n, nil
}

// inboundLoop reads packet vectors from the device and injects them into
// the stack.
func (e *linkEndpoint) inboundLoop() {
	mtu := int(e.mtu.Load())
	bufs := make([][]byte, e.batch)
	sizes := make([]int, e.batch)
	for i := range bufs {
		// Virtual size batch×MTU, but only the bytes actually written are
		// touched: small segments use a page each, big ones are few.
		bufs[i] = make([]byte, tunOffset+mtu)
	}
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
		e.mu.RLock()
		d := e.dispatcher
		e.mu.RUnlock()
		if d == nil {
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
	e.gro.Enqueue(pkt)
	pkt.DecRef()
}

// outboundLoop drains the queue in vectors of up to BatchSize packets.
func (e *linkEndpoint) outboundLoop() {
	defer e.wg.Done()
	mtu := int(e.mtu.Load())
	bufs := make([][]byte, e.batch)
	for i := range bufs {
		bufs[i] = make([]byte, tunOffset+mtu)
	}
	vec := make([][]byte, 0, e.batch)
	pkts := make([]*stack.PacketBuffer, 0, e.batch)
	for {
		select {
		case pkt := <-e.outQ:
			pkts = append(pkts, pkt)
		case <-e.done:
			e.drainQueue()
			return
		}
	fill:
		for len(pkts) < e.batch {
			select {
			case pkt := <-e.outQ:
				pkts = append(pkts, pkt)
			default:
				break fill
			}
		}
		vec = vec[:0]
		for i, pkt := range pkts {
			n := tunOffset + copyPacket(bufs[i][tunOffset:], pkt)
			vec = append(vec, bufs[i][:n])
			pkt.DecRef()
		}
		clear(pkts)
		pkts = pkts[:0]
		if _, err := e.dev.Write(vec, tunOffset); err != nil {
			if errors.Is(err, os.ErrClosed) {
				e.drainQueue()
				return
			}
			// A packet the kernel refuses (e.g. a route gone) is lost
			// like on a wire; TCP recovers. Not logged per packet.
			continue
		}
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

func (e *linkEndpoint) drainQueue() {
	for {
		select {
		case pkt := <-e.outQ:
			pkt.DecRef()
		default:
			return
		}
	}
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
