package netstack

import (
	"encoding/binary"
	"hash/maphash"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// ackHold is how long a pure ACK may wait for a packet of its flow to
// carry it instead. gVisor has no delayed ACK: it acknowledges every batch
// of received segments at once, so a request costs a TUN write for its
// ACK and another for the response, which would have carried that ACK a
// few tens of microseconds later. Linux's receiver delays an ACK up to
// 40 ms; 200 µs keeps well under any peer's retransmission timer (≥ 200
// ms) and keeps a peer whose Nagle waits for the ACK moving: Go's timers
// fire within about 1 ms when the process sleeps (its poller sleeps in
// whole milliseconds), still 40 times sooner than a Linux receiver.
const ackHold = 200 * time.Microsecond

// ackSlots is the size of the per-flow table (a power of two). A flow
// whose slot another flow took loses its history and has its next ACK
// written at once, which is always correct: the table bounds memory, not
// behaviour.
const ackSlots = 512

// ackDelay coalesces the pure ACKs the stack writes, per flow, the way a
// kernel receiver's delayed ACK does:
//
//   - A pure ACK (no payload; flags exactly ACK; no option but timestamps,
//     so no SACK blocks; a non-zero window) that acknowledges new data,
//     less than two full-sized segments beyond the last ACK written for
//     its flow, after a non-zero window, is held in the flow's slot.
//   - A later packet of the flow that carries a cumulative ACK at least as
//     far supersedes it (a data segment, a FIN, a RST, a newer ACK): the
//     held one is dropped. A packet that does not (no ACK flag, or a pure
//     ACK of the same number: a duplicate ACK, a window update) is written
//     after it, so nothing is lost and the flow's order is kept.
//   - An ACK that reaches two full-sized segments beyond the last written
//     one is written at once (Linux ACKs every second full segment), as is
//     any other ACK: duplicate ACKs and SACK blocks drive the peer's loss
//     recovery, window updates its flow control.
//   - Whatever is still held when the hold timer fires (ackHold after the
//     first hold since it last fired) is written then.
//
// Slots have a lock each; packets of a slot are queued for the device
// under it, so a flow's packets reach the device in the order the stack
// wrote them.
type ackDelay struct {
	slots   [ackSlots]ackSlot
	heldMap [ackSlots / 64]atomic.Uint64 // bit set: the slot holds an ACK
	seed    maphash.Seed
	ackNow  uint32 // bytes acknowledged beyond the last written ACK that send one at once

	// enqueue queues a packet for the device (the link's pending list),
	// taking its own reference; false once the link is closed. flush
	// writes what is queued.
	enqueue func(*stack.PacketBuffer) bool
	flush   func()

	armed  atomic.Bool
	timer  *time.Timer
	arm    func(time.Duration) // resets timer; tests replace it
	closed atomic.Bool

	// Counters, for tests and benchmarks.
	held       atomic.Uint64 // ACKs held
	superseded atomic.Uint64 // held ACKs dropped for a later packet of their flow
	expired    atomic.Uint64 // held ACKs written by the timer
}

type ackSlot struct {
	mu      sync.Mutex
	key     ackKey
	used    bool   // key names the flow the slot tracks
	known   bool   // sentAck/sentWnd are the flow's last written ACK
	sentAck uint32 // ACK number of the last packet written with ACK
	sentWnd uint16 // its raw window field
	heldAck uint32
	held    *stack.PacketBuffer // our reference
}

// ackKey is a TCP packet's addresses and ports as written (source is the
// stack's side).
type ackKey [36]byte

// tcpInfo is what ackDelay reads of an outgoing packet.
type tcpInfo struct {
	key     ackKey
	flags   header.TCPFlags
	ack     uint32
	wnd     uint16
	payload int
	onlyTS  bool // options are none, NOPs or a timestamp
}

func newAckDelay(mtu uint32, enqueue func(*stack.PacketBuffer) bool, flush func()) *ackDelay {
	d := &ackDelay{
		seed:    maphash.MakeSeed(),
		enqueue: enqueue,
		flush:   flush,
	}
	// Two full segments of the path, capped at a 1,500-byte path's: a
	// large-MTU TUN carries segments of up to 64 KiB, each of which then
	// gets its ACK at once, as a Linux receiver's GRO'd segments do.
	seg := min(mtu, 1500) - 72 // IPv6 + TCP + timestamps
	d.ackNow = 2 * seg
	d.timer = time.AfterFunc(time.Hour, d.fire)
	d.timer.Stop()
	d.arm = func(t time.Duration) { d.timer.Reset(t) }
	return d
}

// parseTCP reads the fields ackDelay needs from an outgoing packet; false
// for anything that is not a TCP segment with full headers.
func parseTCP(pkt *stack.PacketBuffer, info *tcpInfo) bool {
	if pkt.TransportProtocolNumber != header.TCPProtocolNumber {
		return false
	}
	nh := pkt.NetworkHeader().Slice()
	th := header.TCP(pkt.TransportHeader().Slice())
	if len(th) < header.TCPMinimumSize || len(nh) < header.IPv4MinimumSize {
		return false
	}
	switch header.IPVersion(nh) {
	case header.IPv4Version:
		clear(info.key[:])
		copy(info.key[0:4], nh[12:16])
		copy(info.key[16:20], nh[16:20])
	case header.IPv6Version:
		if len(nh) < header.IPv6MinimumSize {
			return false
		}
		copy(info.key[0:32], nh[8:40])
	default:
		return false
	}
	copy(info.key[32:36], th[0:4])
	info.flags = th.Flags()
	info.ack = binary.BigEndian.Uint32(th[8:12])
	info.wnd = binary.BigEndian.Uint16(th[14:16])
	info.payload = pkt.Data().Size()
	info.onlyTS = onlyTimestamps(th)
	return true
}

// onlyTimestamps reports whether th's options are only NOPs, an end, and
// a timestamp: a SACK block (or anything else) makes the ACK one to write.
func onlyTimestamps(th header.TCP) bool {
	off := int(th.DataOffset())
	if off < header.TCPMinimumSize || off > len(th) {
		return false
	}
	opts := th[header.TCPMinimumSize:off]
	for i := 0; i < len(opts); {
		switch opts[i] {
		case header.TCPOptionEOL:
			return true
		case header.TCPOptionNOP:
			i++
		case header.TCPOptionTS:
			if i+1 >= len(opts) || opts[i+1] != header.TCPOptionTSLength {
				return false
			}
			i += header.TCPOptionTSLength
		default:
			return false
		}
	}
	return true
}

// slotOf returns the index of k's slot.
func (d *ackDelay) slotOf(k *ackKey) uint32 {
	return uint32(maphash.Bytes(d.seed, k[:])) & (ackSlots - 1)
}

// seqAfter reports a > b in sequence-number space.
func seqAfter(a, b uint32) bool { return int32(a-b) > 0 }

// send queues pkt for the device, or holds it if it is a pure ACK worth
// holding. It reports false once the link is closed.
func (d *ackDelay) send(pkt *stack.PacketBuffer) bool {
	var info tcpInfo
	if !parseTCP(pkt, &info) {
		return d.enqueue(pkt)
	}
	i := d.slotOf(&info.key)
	s := &d.slots[i]
	s.mu.Lock()
	if !s.used || s.key != info.key {
		// Another flow's slot: its held ACK goes out now, and the slot
		// follows this flow, whose history it does not know.
		if s.held != nil {
			d.release(i, s, true)
		}
		s.key, s.used, s.known = info.key, true, false
	}
	hasAck := info.flags&header.TCPFlagAck != 0
	pure := info.flags == header.TCPFlagAck && info.payload == 0
	if pure && info.onlyTS && info.wnd != 0 && s.known && s.sentWnd != 0 &&
		seqAfter(info.ack, s.sentAck) && info.ack-s.sentAck < d.ackNow && !d.closed.Load() {
		if s.held != nil {
			s.held.DecRef()
			d.superseded.Add(1)
		} else {
			d.heldMap[i/64].Or(1 << (i % 64))
			if d.armed.CompareAndSwap(false, true) {
				d.arm(ackHold)
			}
		}
		pkt.IncRef()
		s.held, s.heldAck = pkt, info.ack
		d.held.Add(1)
		s.mu.Unlock()
		return true
	}
	if s.held != nil {
		// Superseded when this packet acknowledges as far and is not a
		// pure ACK of the same number, which the peer may count as a
		// duplicate: then both go, in order.
		supersedes := hasAck && !seqAfter(s.heldAck, info.ack) && !(pure && info.ack == s.heldAck)
		d.release(i, s, !supersedes)
	}
	ok := d.enqueue(pkt)
	if hasAck {
		s.known, s.sentAck, s.sentWnd = true, info.ack, info.wnd
	}
	if info.flags&header.TCPFlagRst != 0 {
		s.used, s.known = false, false // the flow is over
	}
	s.mu.Unlock()
	return ok
}

// release empties slot s (locked, index i), writing its held ACK first
// when write is set, else dropping it as superseded.
func (d *ackDelay) release(i uint32, s *ackSlot, write bool) {
	p := s.held
	s.held = nil
	d.heldMap[i/64].And(^(uint64(1) << (i % 64)))
	if write {
		if d.enqueue(p) {
			s.known, s.sentAck, s.sentWnd = true, s.heldAck, header.TCP(p.TransportHeader().Slice()).WindowSize()
		}
	} else {
		d.superseded.Add(1)
	}
	p.DecRef()
}

// fire is the hold timer: every held ACK is written. An ACK held after
// armed is cleared arms the timer again.
func (d *ackDelay) fire() {
	d.armed.Store(false)
	n := 0
	for w := range d.heldMap {
		for b := d.heldMap[w].Load(); b != 0; b &= b - 1 {
			i := uint32(w*64) + uint32(bits.TrailingZeros64(b))
			s := &d.slots[i]
			s.mu.Lock()
			if s.held != nil {
				d.release(i, s, true)
				n++
			}
			s.mu.Unlock()
		}
	}
	if n > 0 {
		d.expired.Add(uint64(n))
		d.flush()
	}
}

// close drops every held ACK; nothing is held afterwards.
func (d *ackDelay) close() {
	d.closed.Store(true)
	d.timer.Stop()
	for i := range d.slots {
		s := &d.slots[i]
		s.mu.Lock()
		if s.held != nil {
			s.held.DecRef()
			s.held = nil
			d.heldMap[i/64].And(^(uint64(1) << (i % 64)))
		}
		s.mu.Unlock()
	}
}
