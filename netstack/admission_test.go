package netstack

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// rawTUN is a TUN device the test writes raw IP packets into and reads the
// stack's packets from: what a spoofing client needs, which a userspace
// client stack (newPeer) cannot be.
type rawTUN struct {
	in     chan []byte
	out    chan []byte
	closed chan struct{}
	once   sync.Once
}

func newRawTUN() *rawTUN {
	return &rawTUN{in: make(chan []byte, 1024), out: make(chan []byte, 4096), closed: make(chan struct{})}
}

func (d *rawTUN) File() *os.File                { return nil }
func (d *rawTUN) MTU() (int, error)             { return 1500, nil }
func (d *rawTUN) Name() (string, error)         { return "raw", nil }
func (d *rawTUN) Events() <-chan wgtun.Event    { return nil }
func (d *rawTUN) BatchSize() int                { return 1 }
func (d *rawTUN) Close() error                  { d.once.Do(func() { close(d.closed) }); return nil }
func (d *rawTUN) send(t *testing.T, pkt []byte) { t.Helper(); d.in <- pkt }
func (d *rawTUN) Write(bufs [][]byte, off int) (int, error) {
	for _, b := range bufs {
		select {
		case d.out <- bytes.Clone(b[off:]):
		case <-d.closed:
			return 0, os.ErrClosed
		}
	}
	return len(bufs), nil
}

func (d *rawTUN) Read(bufs [][]byte, sizes []int, off int) (int, error) {
	select {
	case p := <-d.in:
		sizes[0] = copy(bufs[0][off:], p)
		return 1, nil
	case <-d.closed:
		return 0, os.ErrClosed
	}
}

// seg is a TCP/IPv4 segment as the test sees it.
type seg struct {
	src, dst netip.AddrPort
	flags    header.TCPFlags
	seq, ack uint32
	payload  []byte
}

func (s seg) encode() []byte {
	var opts []byte
	if s.flags&header.TCPFlagSyn != 0 {
		opts = []byte{header.TCPOptionMSS, 4, 0x05, 0xb4} // MSS 1460
	}
	tcpLen := header.TCPMinimumSize + len(opts)
	b := make([]byte, header.IPv4MinimumSize+tcpLen+len(s.payload))
	src, dst := tcpip.AddrFrom4(s.src.Addr().As4()), tcpip.AddrFrom4(s.dst.Addr().As4())
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst})
	ip.SetChecksum(^ip.CalculateChecksum())
	t := header.TCP(b[header.IPv4MinimumSize:])
	t.Encode(&header.TCPFields{SrcPort: s.src.Port(), DstPort: s.dst.Port(), SeqNum: s.seq, AckNum: s.ack,
		DataOffset: uint8(tcpLen), Flags: s.flags, WindowSize: 65535})
	copy(t[header.TCPMinimumSize:], opts)
	copy(t[tcpLen:], s.payload)
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(tcpLen+len(s.payload)))
	xsum = checksum.Checksum(s.payload, xsum)
	t.SetChecksum(^t.CalculateChecksum(xsum))
	return b
}

func decode(b []byte) (seg, bool) {
	ip := header.IPv4(b)
	if len(b) < header.IPv4MinimumSize || ip.TransportProtocol() != header.TCPProtocolNumber {
		return seg{}, false
	}
	t := header.TCP(b[ip.HeaderLength():])
	return seg{
		src:     netip.AddrPortFrom(netip.AddrFrom4(ip.SourceAddress().As4()), t.SourcePort()),
		dst:     netip.AddrPortFrom(netip.AddrFrom4(ip.DestinationAddress().As4()), t.DestinationPort()),
		flags:   t.Flags(),
		seq:     t.SequenceNumber(),
		ack:     t.AckNumber(),
		payload: bytes.Clone(t.Payload()),
	}, true
}

// expect returns the next segment from the stack to client that match
// accepts, skipping others.
func (d *rawTUN) expect(t *testing.T, what string, client netip.AddrPort, match func(seg) bool) seg {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case b := <-d.out:
			if s, ok := decode(b); ok && s.dst == client && match(s) {
				return s
			}
		case <-deadline:
			t.Fatalf("%s: no segment to %v within 10 s", what, client)
		}
	}
}

func isSynAck(s seg) bool { return s.flags == header.TCPFlagSyn|header.TCPFlagAck }

// handshake completes a handshake from client to server: SYN, the stack's
// SYN-ACK, ACK. It returns the SYN-ACK.
func (d *rawTUN) handshake(t *testing.T, client, server netip.AddrPort) seg {
	t.Helper()
	d.send(t, seg{src: client, dst: server, flags: header.TCPFlagSyn, seq: 1000}.encode())
	sa := d.expect(t, "SYN-ACK", client, isSynAck)
	if sa.ack != 1001 {
		t.Fatalf("SYN-ACK to %v acks %d, want 1001", client, sa.ack)
	}
	d.send(t, seg{src: client, dst: server, flags: header.TCPFlagAck, seq: 1001, ack: sa.seq + 1}.encode())
	return sa
}

// seen is one request the test handler got.
type seen struct {
	id        FlowID
	dialFirst bool
	accepted  bool // the handshake completed (Accept returned a flow)
}

// greeter accepts every flow, says "hi" and closes; it reports each
// request on got once Accept returned.
func greeter(got chan<- seen) HandlerFuncs {
	return HandlerFuncs{TCP: func(r *TCPRequest) {
		c, err := r.Accept()
		got <- seen{id: r.ID, dialFirst: r.DialFirst(), accepted: err == nil}
		if err != nil {
			return
		}
		c.Write([]byte("hi"))
		c.Close()
	}}
}

func newRawStack(t *testing.T, h Handler, cfg Config) (*rawTUN, *Stack) {
	t.Helper()
	dev := newRawTUN()
	s, err := New(dev, h, cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		dev.Close()
	})
	return dev, s
}

var (
	podAddr = netip.MustParseAddr("10.1.0.5")
	isPod   = func(a netip.Addr) bool { return a == podAddr }
)

func spoofed(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}), uint16(20000+i))
}

// TestSynFloodBudgets: a spoofed flood at the pod takes the inbound
// budget and no more; beyond it SYNs are answered with cookies; the
// pod's outbound connects keep their own budget and dial first; a real
// inbound client still connects, through a cookie, and its handler is
// told not to dial first; the flood's half-open flows are given up after
// the SYN-ACK retries, and an ACK with a bad cookie is reset.
func TestSynFloodBudgets(t *testing.T) {
	got := make(chan seen, 64)
	dev, s := newRawStack(t, greeter(got), Config{
		Inbound: isPod, MaxHalfOpenInbound: 4, MaxHalfOpenOutbound: 4,
		MaxHalfOpenPerSource: 100, DialFirstMax: 2, SynAckRetries: 1,
	})
	app := netip.AddrPortFrom(podAddr, 80)

	const flood = 10
	for i := range flood {
		dev.send(t, seg{src: spoofed(i), dst: app, flags: header.TCPFlagSyn, seq: 7}.encode())
	}
	xdstest.Eventually(t, 5*time.Second, "4 half-open inbound flows and 6 cookies", func() bool {
		st := s.Stats()
		return st.TCPHalfOpenInbound == 4 && st.TCPSynOverBudget == flood-4 && st.TCPSynCookiesSent == flood-4
	})
	answered := map[netip.AddrPort]bool{}
	for len(answered) < flood {
		select {
		case b := <-dev.out:
			if sa, ok := decode(b); ok && isSynAck(sa) {
				answered[sa.dst] = true
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("SYN-ACKs to %d of the %d spoofed sources", len(answered), flood)
		}
	}

	// The pod's own outbound connect: its budget is untouched, so it is
	// stateful and may dial first.
	local := netip.AddrPortFrom(podAddr, 40000)
	remote := netip.MustParseAddrPort("198.51.100.7:443")
	dev.handshake(t, local, remote)
	out := <-got
	if out.id.Src != local || out.id.Dst != remote || !out.dialFirst || !out.accepted {
		t.Fatalf("outbound flow during the flood: %+v, want %v→%v accepted with DialFirst", out, local, remote)
	}
	dev.expect(t, "outbound greeting", local, func(s seg) bool { return string(s.payload) == "hi" })

	// A real client at the pod: the budget is spent, so a cookie answers,
	// and its ACK makes the connection.
	client := netip.MustParseAddrPort("192.0.2.99:5555")
	dev.handshake(t, client, app)
	in := <-got
	if in.id.Src != client || in.id.Dst != app || in.dialFirst || !in.accepted {
		t.Fatalf("inbound flow during the flood: %+v, want %v→%v accepted without DialFirst", in, client, app)
	}
	dev.expect(t, "inbound greeting", client, func(s seg) bool { return string(s.payload) == "hi" })
	if st := s.Stats(); st.TCPSynCookiesRecv != 1 {
		t.Fatalf("cookies received %d, want 1", st.TCPSynCookiesRecv)
	}

	// An ACK whose cookie is wrong makes nothing and is reset.
	liar := netip.MustParseAddrPort("192.0.2.100:6666")
	dev.send(t, seg{src: liar, dst: app, flags: header.TCPFlagAck, seq: 1001, ack: 12345}.encode())
	dev.expect(t, "RST to a bad cookie", liar, func(s seg) bool { return s.flags&header.TCPFlagRst != 0 })
	if st := s.Stats(); st.TCPSynCookiesFailed != 1 {
		t.Fatalf("invalid cookies %d, want 1", st.TCPSynCookiesFailed)
	}

	// The spoofed half-open flows are given up after 1 retransmit (3 s);
	// none was offered for dial-first, not even the first two (below
	// DialFirstMax): they are inbound.
	for range 4 {
		r := <-got
		if r.accepted {
			t.Fatalf("a spoofed flow was accepted: %+v", r)
		}
		if r.dialFirst {
			t.Errorf("an inbound flood flow was offered DialFirst: %+v", r)
		}
	}
	st := s.Stats()
	if st.TCPHalfOpenInbound != 0 || st.TCPHalfOpenOutbound != 0 || st.TCPSynAckTimeouts != 4 {
		t.Fatalf("after the flood: %+v, want no half-open flow and 4 SYN-ACK timeouts", st)
	}
}

// TestSynPerSourceCap: one source flooding takes only its share of the
// inbound budget; another source still gets a stateful slot (and a
// retransmitted SYN does not take a second one).
func TestSynPerSourceCap(t *testing.T) {
	got := make(chan seen, 64)
	dev, s := newRawStack(t, greeter(got), Config{
		Inbound: isPod, MaxHalfOpenInbound: 100, MaxHalfOpenPerSource: 3, SynAckRetries: 1,
	})
	app := netip.AddrPortFrom(podAddr, 80)
	flooder := netip.MustParseAddr("203.0.113.50")
	for i := range 10 {
		dev.send(t, seg{src: netip.AddrPortFrom(flooder, uint16(30000+i)), dst: app, flags: header.TCPFlagSyn, seq: 7}.encode())
	}
	xdstest.Eventually(t, 5*time.Second, "the flooder holding its 3 slots, 7 SYNs over its cap", func() bool {
		st := s.Stats()
		return st.TCPHalfOpenInbound == 3 && st.TCPSynOverSourceCap == 7 && st.TCPSynCookiesSent == 7
	})

	other := netip.MustParseAddrPort("192.0.2.7:4444")
	syn := seg{src: other, dst: app, flags: header.TCPFlagSyn, seq: 1000}.encode()
	dev.send(t, syn)
	sa := dev.expect(t, "SYN-ACK to the other source", other, isSynAck)
	dev.send(t, syn) // retransmitted: the same flow, no second slot
	xdstest.Eventually(t, 5*time.Second, "the other source's stateful slot", func() bool {
		return s.Stats().TCPHalfOpenInbound == 4
	})
	dev.send(t, seg{src: other, dst: app, flags: header.TCPFlagAck, seq: 1001, ack: sa.seq + 1}.encode())
	dev.expect(t, "greeting to the other source", other, func(s seg) bool { return string(s.payload) == "hi" })
	for {
		r := <-got
		if r.id.Src == other {
			if !r.accepted || r.dialFirst {
				t.Fatalf("other source's flow: %+v, want accepted, without DialFirst (inbound, even with few half-open)", r)
			}
			break
		}
	}
	if st := s.Stats(); st.TCPSynOverSourceCap != 7 || st.TCPSynCookiesRecv != 0 {
		t.Fatalf("stats %+v: the other source went over a cap or through a cookie", st)
	}
}

// TestSlotSpreads: the per-source slots of distinct IPv4 sources and of
// distinct IPv6 /64s spread over the table, and addresses in one /64
// share a slot.
func TestSlotSpreads(t *testing.T) {
	a := newAdmission(&Config{MaxHalfOpenPerSource: 1})
	slots := map[uint16]bool{}
	for i := range 1000 {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], 0xcb000000+uint32(i))
		slots[a.slot(tcpip.AddrFrom4(b))] = true
	}
	if len(slots) < 800 {
		t.Fatalf("1,000 IPv4 sources fell into %d slots of %d: the hash does not spread", len(slots), sourceSlots)
	}
	v6 := func(prefix, host uint64) tcpip.Address {
		var b [16]byte
		binary.BigEndian.PutUint64(b[:8], prefix)
		binary.BigEndian.PutUint64(b[8:], host)
		return tcpip.AddrFrom16(b)
	}
	if a.slot(v6(0x20010db800000001, 1)) != a.slot(v6(0x20010db800000001, 0xffff)) {
		t.Error("two addresses of one /64 are counted apart")
	}
	if a.slot(v6(0x20010db800000001, 1)) == a.slot(v6(0x20010db800000002, 1)) &&
		a.slot(v6(0x20010db800000003, 1)) == a.slot(v6(0x20010db800000004, 1)) {
		t.Error("distinct /64s share slots")
	}
}

func flowKey(src, dst netip.AddrPort) stack.TransportEndpointID {
	return stack.TransportEndpointID{
		LocalAddress: tcpip.AddrFrom4(dst.Addr().As4()), LocalPort: dst.Port(),
		RemoteAddress: tcpip.AddrFrom4(src.Addr().As4()), RemotePort: src.Port(),
	}
}

// BenchmarkAdmit is admission's cost per SYN on the normal path: admit,
// lookup and release of one flow. It must not allocate.
func BenchmarkAdmit(b *testing.B) {
	a := newAdmission(&Config{MaxHalfOpenInbound: 1024, MaxHalfOpenOutbound: 1024, MaxHalfOpenPerSource: 64, DialFirstMax: 16,
		Inbound: func(a netip.Addr) bool { return a == podAddr }})
	id := flowKey(netip.MustParseAddrPort("203.0.113.9:40000"), netip.AddrPortFrom(podAddr, 80))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		id.RemotePort = uint16(i)
		if a.admit(id) != admitForward {
			b.Fatal("not admitted")
		}
		a.lookup(id)
		a.release(id)
	}
}

// TestCookieFlowEcho: a flow let in by a SYN cookie (its direction's
// budget held by a flow the handler has not decided) is a working
// connection for IPv4 and IPv6: 1 MiB echoes intact, and the handler is
// told it was not offered for dial-first.
func TestCookieFlowEcho(t *testing.T) {
	for _, dst := range []string{"192.0.2.10", "2001:db8::10"} {
		t.Run(dst, func(t *testing.T) {
			hold := make(chan struct{})
			dialFirst := make(chan bool, 1)
			h := HandlerFuncs{TCP: func(r *TCPRequest) {
				if r.ID.Dst.Port() == 1 {
					<-hold // keeps the only outbound half-open slot
					return
				}
				dialFirst <- r.DialFirst()
				c, err := r.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				io.Copy(c, c)
				c.CloseWrite()
			}}
			tnet, s := newPeer(t, h, Config{MaxHalfOpenOutbound: 1})
			defer close(hold)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			go tnet.DialContext(ctx, "tcp", net.JoinHostPort(dst, "1"))
			xdstest.Eventually(t, 5*time.Second, "the held flow's slot", func() bool { return s.Stats().TCPHalfOpenOutbound == 1 })

			c, err := tnet.DialContext(ctx, "tcp", net.JoinHostPort(dst, "2"))
			if err != nil {
				t.Fatalf("dial through a cookie: %v", err)
			}
			defer c.Close()
			payload := make([]byte, 1<<20)
			rand.Read(payload)
			go func() {
				c.Write(payload)
				c.(interface{ CloseWrite() error }).CloseWrite()
			}()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil || !bytes.Equal(got, payload) {
				t.Fatalf("echo through a cookie flow: %d of %d bytes, err %v", len(got), len(payload), err)
			}
			if <-dialFirst {
				t.Error("a cookie flow was offered for dial-first")
			}
			// gVisor counts every segment that reaches the cookie
			// listener with a valid cookie: the handshake's ACK, and on a
			// loaded machine the first data segment too when it arrives
			// before the new connection is registered.
			if st := s.Stats(); st.TCPSynCookiesSent != 1 || st.TCPSynCookiesRecv < 1 {
				t.Errorf("cookies sent %d, received %d; want 1 and at least 1", st.TCPSynCookiesSent, st.TCPSynCookiesRecv)
			}
		})
	}
}

// TestDialFirstOnlyOutbound: outbound flows are offered dial-first while
// fewer than DialFirstMax outbound flows are half-open, and not beyond;
// inbound flows never, however few are half-open.
func TestDialFirstOnlyOutbound(t *testing.T) {
	a := newAdmission(&Config{MaxHalfOpenInbound: 8, MaxHalfOpenOutbound: 8, MaxHalfOpenPerSource: 8, DialFirstMax: 2, Inbound: isPod})
	remote := netip.MustParseAddrPort("198.51.100.7:443")
	var out []bool
	for i := range 3 {
		id := flowKey(netip.AddrPortFrom(podAddr, uint16(40000+i)), remote)
		if a.admit(id) != admitForward {
			t.Fatalf("outbound SYN %d not admitted", i)
		}
		adm, _ := a.lookup(id)
		out = append(out, adm.dialFirst)
	}
	if !out[0] || !out[1] || out[2] {
		t.Errorf("outbound dial-first %v, want [true true false] (DialFirstMax 2)", out)
	}
	id := flowKey(netip.MustParseAddrPort("192.0.2.1:5000"), netip.AddrPortFrom(podAddr, 80))
	if a.admit(id) != admitForward {
		t.Fatal("inbound SYN not admitted")
	}
	if adm, _ := a.lookup(id); adm.dialFirst {
		t.Error("the first inbound SYN was offered dial-first")
	}
}
