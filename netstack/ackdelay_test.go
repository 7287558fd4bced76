package netstack

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// aseg describes a TCP segment the stack writes, for the tests.
type aseg struct {
	flow    int // index into ackTestFlows
	flags   header.TCPFlags
	ack     uint32
	wnd     uint16
	payload int
	sack    bool // a SACK block after the timestamp
}

func (s aseg) String() string {
	return fmt.Sprintf("flow%d %s ack=%d wnd=%d len=%d sack=%v", s.flow, s.flags, s.ack, s.wnd, s.payload, s.sack)
}

var ackTestFlows = []struct{ src, dst netip.AddrPort }{
	{netip.MustParseAddrPort("192.0.2.10:80"), netip.MustParseAddrPort("10.0.0.2:40000")},
	{netip.MustParseAddrPort("[2001:db8::10]:443"), netip.MustParseAddrPort("[fd00::2]:40001")},
}

// makeAseg builds s as gVisor hands it to the link: IP and TCP headers
// pushed, a timestamp option, the payload as data.
func makeAseg(t testing.TB, s aseg, src, dst netip.AddrPort) *stack.PacketBuffer {
	t.Helper()
	opts := []byte{header.TCPOptionNOP, header.TCPOptionNOP, header.TCPOptionTS, header.TCPOptionTSLength, 0, 0, 0, 1, 0, 0, 0, 2}
	if s.sack {
		opts = append(opts, header.TCPOptionNOP, header.TCPOptionNOP, header.TCPOptionSACK, 10, 0, 0, 0x10, 0, 0, 0, 0x20, 0)
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: header.IPv6MinimumSize + header.TCPMinimumSize + len(opts),
		Payload:            buffer.MakeWithData(make([]byte, s.payload)),
	})
	thLen := header.TCPMinimumSize + len(opts)
	th := header.TCP(pkt.TransportHeader().Push(thLen))
	th.Encode(&header.TCPFields{
		SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: 5000, AckNum: s.ack,
		DataOffset: uint8(thLen), Flags: s.flags, WindowSize: s.wnd,
	})
	copy(th[header.TCPMinimumSize:], opts)
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	if src.Addr().Is4() {
		ip := header.IPv4(pkt.NetworkHeader().Push(header.IPv4MinimumSize))
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(header.IPv4MinimumSize + thLen + s.payload), TTL: 64,
			Protocol: uint8(header.TCPProtocolNumber),
			SrcAddr:  tcpip.AddrFrom4(src.Addr().As4()), DstAddr: tcpip.AddrFrom4(dst.Addr().As4()),
		})
		pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	} else {
		ip := header.IPv6(pkt.NetworkHeader().Push(header.IPv6MinimumSize))
		ip.Encode(&header.IPv6Fields{
			PayloadLength: uint16(thLen + s.payload), TransportProtocol: header.TCPProtocolNumber, HopLimit: 64,
			SrcAddr: tcpip.AddrFrom16(src.Addr().As16()), DstAddr: tcpip.AddrFrom16(dst.Addr().As16()),
		})
		pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
	}
	return pkt
}

// ackRig runs an ackDelay whose device is a list and whose timer is
// fired by hand.
type ackRig struct {
	t       *testing.T
	d       *ackDelay
	written []aseg
	arms    []time.Duration
	flushes int
	closed  bool
}

func newAckRig(t *testing.T) *ackRig {
	r := &ackRig{t: t}
	r.d = newAckDelay(65535, r.enqueue, func() { r.flushes++ })
	r.d.arm = func(d time.Duration) { r.arms = append(r.arms, d) }
	t.Cleanup(r.d.close)
	return r
}

// enqueue records the segment written, read back from its bytes.
func (r *ackRig) enqueue(pkt *stack.PacketBuffer) bool {
	if r.closed {
		return false
	}
	var info tcpInfo
	if !parseTCP(pkt, &info) {
		r.t.Fatalf("the link was handed a packet that is not TCP")
	}
	flow := -1
	for i, f := range ackTestFlows {
		var k tcpInfo
		p := makeAseg(r.t, aseg{}, f.src, f.dst)
		parseTCP(p, &k)
		p.DecRef()
		if k.key == info.key {
			flow = i
		}
	}
	th := header.TCP(pkt.TransportHeader().Slice())
	r.written = append(r.written, aseg{flow: flow, flags: info.flags, ack: info.ack, wnd: info.wnd,
		payload: info.payload, sack: !info.onlyTS && len(th) > header.TCPMinimumSize+12})
	return true
}

func (r *ackRig) send(s aseg) {
	f := ackTestFlows[s.flow]
	pkt := makeAseg(r.t, s, f.src, f.dst)
	if !r.d.send(pkt) {
		r.t.Fatalf("send %v: link closed", s)
	}
	pkt.DecRef() // the stack's reference
}

func (r *ackRig) heldCount() int {
	n := 0
	for i := range r.d.slots {
		if r.d.slots[i].held != nil {
			n++
		}
	}
	return n
}

const (
	synAck = header.TCPFlagSyn | header.TCPFlagAck
	ack    = header.TCPFlagAck
	pshAck = header.TCPFlagPsh | header.TCPFlagAck
	finAck = header.TCPFlagFin | header.TCPFlagAck
	rstAck = header.TCPFlagRst | header.TCPFlagAck
)

// TestAckDelayRules walks the coalescing rules: which pure ACKs are held,
// which packets supersede a held one (it is dropped), which are written
// after it (both go, in the stack's order), and what the timer writes.
func TestAckDelayRules(t *testing.T) {
	open := aseg{flags: synAck, ack: 1001, wnd: 1000}
	for _, tc := range []struct {
		name    string
		segs    []aseg
		fire    bool  // fire the hold timer at the end
		want    []int // indexes into segs written, in order
		held    int   // slots holding an ACK at the end
		dropped uint64
	}{
		{name: "ACK of new data held, then carried by the response",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 1000}, {flags: pshAck, ack: 1065, wnd: 1000, payload: 64}},
			want: []int{0, 2}, dropped: 1},
		{name: "held ACK written by the timer",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 1000}},
			fire: true, want: []int{0, 1}},
		{name: "held ACK waits for the timer",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 1000}},
			want: []int{0}, held: 1},
		{name: "a newer ACK replaces the held one",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 1000}, {flags: ack, ack: 1129, wnd: 1000}},
			fire: true, want: []int{0, 2}, dropped: 1},
		{name: "two full segments beyond the last written ACK: written at once",
			segs: []aseg{open, {flags: ack, ack: 2449, wnd: 1000}, {flags: ack, ack: 3897, wnd: 1000}},
			want: []int{0, 2}, dropped: 1},
		{name: "a large segment's ACK is written at once",
			segs: []aseg{open, {flags: ack, ack: 1001 + 65000, wnd: 1000}},
			want: []int{0, 1}},
		{name: "first ACK of a flow with no history is written",
			segs: []aseg{{flags: ack, ack: 1065, wnd: 1000}},
			want: []int{0}},
		{name: "duplicate ACK (same number) is written",
			segs: []aseg{open, {flags: ack, ack: 1001, wnd: 1000}},
			want: []int{0, 1}},
		{name: "an ACK of the held number with a newer window replaces it (the peer never saw the held one)",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 1000}, {flags: ack, ack: 1065, wnd: 3000}},
			fire: true, want: []int{0, 2}, dropped: 1},
		{name: "ACK with SACK blocks is written, after the held one",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 1000}, {flags: ack, ack: 1065, wnd: 1000, sack: true}},
			want: []int{0, 1, 2}},
		{name: "ACK with SACK blocks beyond the held one supersedes it",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 1000}, {flags: ack, ack: 1129, wnd: 1000, sack: true}},
			want: []int{0, 2}, dropped: 1},
		{name: "zero window is written",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 0}},
			want: []int{0, 1}},
		{name: "window update from zero is written",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 0}, {flags: ack, ack: 1129, wnd: 500}},
			want: []int{0, 1, 2}},
		{name: "FIN supersedes the held ACK",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 1000}, {flags: finAck, ack: 1065, wnd: 1000}},
			want: []int{0, 2}, dropped: 1},
		{name: "RST supersedes the held ACK and ends the flow's history",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 1000}, {flags: rstAck, ack: 1065}, {flags: ack, ack: 1200, wnd: 1000}},
			want: []int{0, 2, 3}, dropped: 1},
		{name: "RST without ACK goes after the held ACK",
			segs: []aseg{open, {flags: ack, ack: 1065, wnd: 1000}, {flags: header.TCPFlagRst}},
			want: []int{0, 1, 2}},
		{name: "flows are independent; each keeps its order",
			segs: []aseg{open, {flow: 1, flags: synAck, ack: 7001, wnd: 1000},
				{flags: ack, ack: 1065, wnd: 1000}, {flow: 1, flags: ack, ack: 7100, wnd: 1000},
				{flow: 1, flags: pshAck, ack: 7100, wnd: 1000, payload: 10}, {flags: ack, ack: 1065, wnd: 1000, sack: true}},
			want: []int{0, 1, 4, 2, 5}, dropped: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newAckRig(t)
			for _, s := range tc.segs {
				r.send(s)
			}
			if tc.fire {
				r.d.fire()
			}
			var want []aseg
			for _, i := range tc.want {
				want = append(want, tc.segs[i])
			}
			if fmt.Sprint(r.written) != fmt.Sprint(want) {
				t.Errorf("written:\n  %v\nwant:\n  %v", r.written, want)
			}
			if got := r.heldCount(); got != tc.held {
				t.Errorf("%d ACKs held at the end, want %d", got, tc.held)
			}
			if got := r.d.superseded.Load(); got != tc.dropped {
				t.Errorf("%d held ACKs dropped as superseded, want %d", got, tc.dropped)
			}
		})
	}
}

// TestAckDelayTimerBound: the first hold arms the timer for ackHold; the
// timer writes every held ACK (all flows) and a hold after it arms it
// again, so no ACK waits longer than ackHold for the timer.
func TestAckDelayTimerBound(t *testing.T) {
	r := newAckRig(t)
	r.send(aseg{flags: synAck, ack: 1001, wnd: 1000})
	r.send(aseg{flow: 1, flags: synAck, ack: 7001, wnd: 1000})
	if len(r.arms) != 0 {
		t.Fatalf("timer armed with nothing held: %v", r.arms)
	}
	r.send(aseg{flags: ack, ack: 1065, wnd: 1000})
	r.send(aseg{flow: 1, flags: ack, ack: 7100, wnd: 1000})
	if len(r.arms) != 1 || r.arms[0] != ackHold {
		t.Fatalf("timer arms %v, want one of %v", r.arms, ackHold)
	}
	if r.heldCount() != 2 {
		t.Fatalf("%d ACKs held, want 2", r.heldCount())
	}
	r.d.fire()
	if r.heldCount() != 0 || len(r.written) != 4 || r.flushes != 1 {
		t.Fatalf("after the timer: %d held, %d written, %d flushes; want 0, 4, 1", r.heldCount(), len(r.written), r.flushes)
	}
	if got := r.d.expired.Load(); got != 2 {
		t.Errorf("expired = %d, want 2", got)
	}
	r.send(aseg{flags: ack, ack: 1129, wnd: 1000})
	if len(r.arms) != 2 {
		t.Fatalf("a hold after the timer fired did not arm it again: %v", r.arms)
	}
	// The timer firing with nothing held writes nothing and flushes nothing.
	r.send(aseg{flags: pshAck, ack: 1129, wnd: 1000, payload: 1})
	r.d.fire()
	if len(r.written) != 5 || r.flushes != 1 {
		t.Errorf("empty fire: %d written, %d flushes; want 5, 1", len(r.written), r.flushes)
	}
}

// TestAckDelaySlotTakenOver: a flow whose slot another flow takes has
// its held ACK written first, and its next ACK (history lost) is written.
func TestAckDelaySlotTakenOver(t *testing.T) {
	r := newAckRig(t)
	slotOf := func(src, dst netip.AddrPort) uint32 {
		var info tcpInfo
		p := makeAseg(t, aseg{}, src, dst)
		parseTCP(p, &info)
		p.DecRef()
		return r.d.slotOf(&info.key)
	}
	a := ackTestFlows[0]
	want := slotOf(a.src, a.dst)
	var other netip.AddrPort
	for port := uint16(1); port != 0; port++ {
		other = netip.AddrPortFrom(a.dst.Addr(), port)
		if port != a.dst.Port() && slotOf(a.src, other) == want {
			break
		}
	}
	ackTestFlows = append(ackTestFlows, struct{ src, dst netip.AddrPort }{a.src, other})
	t.Cleanup(func() { ackTestFlows = ackTestFlows[:2] })
	r.send(aseg{flags: synAck, ack: 1001, wnd: 1000})
	r.send(aseg{flags: ack, ack: 1065, wnd: 1000})
	r.send(aseg{flow: 2, flags: synAck, ack: 9001, wnd: 1000})
	r.send(aseg{flags: ack, ack: 1129, wnd: 1000})
	want2 := []aseg{{flags: synAck, ack: 1001, wnd: 1000}, {flags: ack, ack: 1065, wnd: 1000},
		{flow: 2, flags: synAck, ack: 9001, wnd: 1000}, {flags: ack, ack: 1129, wnd: 1000}}
	if fmt.Sprint(r.written) != fmt.Sprint(want2) {
		t.Errorf("written:\n  %v\nwant:\n  %v", r.written, want2)
	}
}

// TestAckDelayClose: close drops what is held, and nothing is held after.
func TestAckDelayClose(t *testing.T) {
	r := newAckRig(t)
	r.send(aseg{flags: synAck, ack: 1001, wnd: 1000})
	r.send(aseg{flags: ack, ack: 1065, wnd: 1000})
	r.d.close()
	r.closed = true
	if r.heldCount() != 0 {
		t.Fatal("an ACK is still held after close")
	}
	f := ackTestFlows[0]
	pkt := makeAseg(t, aseg{flags: ack, ack: 1129, wnd: 1000}, f.src, f.dst)
	defer pkt.DecRef()
	if r.d.send(pkt) {
		t.Error("send after close reported the packet queued")
	}
	if r.heldCount() != 0 {
		t.Error("an ACK was held after close")
	}
}

// TestAckDelayNonTCP: other packets pass straight through.
func TestAckDelayNonTCP(t *testing.T) {
	var got int
	d := newAckDelay(1500, func(*stack.PacketBuffer) bool { got++; return true }, func() {})
	defer d.close()
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: header.IPv4MinimumSize, Payload: buffer.MakeWithData(make([]byte, 8))})
	defer pkt.DecRef()
	ip := header.IPv4(pkt.NetworkHeader().Push(header.IPv4MinimumSize))
	ip.Encode(&header.IPv4Fields{TotalLength: 28, Protocol: uint8(header.UDPProtocolNumber)})
	pkt.TransportProtocolNumber = header.UDPProtocolNumber
	if !d.send(pkt) || got != 1 {
		t.Fatalf("UDP packet: queued %d times, want 1", got)
	}
}

func BenchmarkAckDelaySend(b *testing.B) {
	var n int
	d := newAckDelay(65535, func(*stack.PacketBuffer) bool { n++; return true }, func() {})
	d.arm = func(time.Duration) {}
	defer d.close()
	f := ackTestFlows[0]
	pkts := []*stack.PacketBuffer{
		makeAseg(b, aseg{flags: ack, ack: 1065, wnd: 1000}, f.src, f.dst),
		makeAseg(b, aseg{flags: pshAck, ack: 1065, wnd: 1000, payload: 64}, f.src, f.dst),
	}
	ackField := func(p *stack.PacketBuffer, v uint32) {
		binary.BigEndian.PutUint32(p.TransportHeader().Slice()[8:12], v)
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		a := uint32(1000 + 64*i)
		ackField(pkts[0], a)
		ackField(pkts[1], a)
		d.send(pkts[0])
		d.send(pkts[1])
	}
	for _, p := range pkts {
		p.DecRef()
	}
}
