package netstack

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// cookieJar answers the SYNs admission turns away with SYN cookies.
//
// gVisor implements SYN cookies only in a listening endpoint's accept
// path, and keeps them unexported; the Forwarder has none. So the stack
// holds one listening endpoint per IP version, bound where no flow ever
// goes (192.0.0.8, RFC 7600's dummy IPv4 address, and 100::8 in the
// discard-only prefix of RFC 6666), and with TCPAlwaysUseSynCookies set,
// which only listening endpoints read. A SYN over budget is queued to it
// directly (the TCP protocol's QueuePacket, the demuxer's own hand-off),
// whatever its destination: the endpoint answers with a SYN-ACK whose
// sequence number is the cookie and forgets the SYN. The client's ACK
// finds no endpoint and comes back to the stack's handler, which queues it
// to the listener as well while cookies may be outstanding; a valid cookie
// creates an established endpoint with the original 4-tuple, which the
// accept loop hands to the Handler like any flow, already accepted. An
// invalid one is answered with a RST, as the stack answers any stray ACK.
//
// What a cookie cannot carry is lost, as on Linux without timestamps: the
// window scale (such a flow's window stays under 64 KiB) and an MSS other
// than 536, 1300, 1440 or 1460.
type cookieJar struct {
	proto interface {
		QueuePacket(ep stack.TransportEndpoint, id stack.TransportEndpointID, pkt *stack.PacketBuffer)
	}
	v4, v6 *cookieListener

	// lastSent is when a SYN was last queued for a cookie (monotonic
	// nanoseconds since start); ACKs for unknown connections go to the
	// listeners only while a cookie that old can still be valid.
	start    time.Time
	lastSent atomic.Int64
	sent     atomic.Bool

	wg sync.WaitGroup
}

// cookieValidity bounds the age of a cookie gVisor still accepts: its
// timestamp counts 64 s periods and a cookie is valid for 2 more.
const cookieValidity = 3 * 64 * time.Second

// cookieBacklog bounds the cookie flows whose ACK arrived and that the
// accept loop has not taken yet. The loop takes them at once; the bound
// only matters if the handler side stalls, and then ACKs are dropped and
// retransmitted by the clients, as on a full kernel accept queue.
const cookieBacklog = 1024

type cookieListener struct {
	ep    tcpip.Endpoint
	tcpEP stack.TransportEndpoint
	wq    waiter.Queue
}

func newCookieJar(s *stack.Stack) (*cookieJar, error) {
	opt := tcpip.TCPAlwaysUseSynCookies(true)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &opt); err != nil {
		return nil, fmt.Errorf("netstack: TCP option %T: %s", opt, err)
	}
	proto, ok := s.TransportProtocolInstance(tcp.ProtocolNumber).(interface {
		QueuePacket(ep stack.TransportEndpoint, id stack.TransportEndpointID, pkt *stack.PacketBuffer)
	})
	if !ok {
		return nil, fmt.Errorf("netstack: gVisor's TCP protocol has no QueuePacket: SYN cookies unavailable")
	}
	j := &cookieJar{proto: proto, start: time.Now()}
	var err error
	if j.v4, err = newCookieListener(s, ipv4.ProtocolNumber, tcpip.AddrFrom4([4]byte{192, 0, 0, 8})); err != nil {
		return nil, err
	}
	v6 := [16]byte{0x01, 0x00, 15: 0x08} // 100::8
	if j.v6, err = newCookieListener(s, ipv6.ProtocolNumber, tcpip.AddrFrom16(v6)); err != nil {
		j.v4.ep.Close()
		return nil, err
	}
	return j, nil
}

func newCookieListener(s *stack.Stack, proto tcpip.NetworkProtocolNumber, addr tcpip.Address) (*cookieListener, error) {
	l := &cookieListener{}
	ep, terr := s.NewEndpoint(tcp.ProtocolNumber, proto, &l.wq)
	if terr != nil {
		return nil, fmt.Errorf("netstack: SYN cookie listener: %s", terr)
	}
	if proto == ipv6.ProtocolNumber {
		ep.SocketOptions().SetV6Only(true)
	}
	if terr := ep.Bind(tcpip.FullAddress{NIC: nicID, Addr: addr, Port: 9}); terr != nil {
		ep.Close()
		return nil, fmt.Errorf("netstack: SYN cookie listener: bind %s: %s", addr, terr)
	}
	if terr := ep.Listen(cookieBacklog); terr != nil {
		ep.Close()
		return nil, fmt.Errorf("netstack: SYN cookie listener: listen: %s", terr)
	}
	l.ep = ep
	l.tcpEP = ep.(stack.TransportEndpoint)
	return l, nil
}

func (j *cookieJar) listener(id stack.TransportEndpointID) *cookieListener {
	if id.LocalAddress.Len() == 16 {
		return j.v6
	}
	return j.v4
}

// synCookie answers the SYN in pkt with a cookie.
func (j *cookieJar) synCookie(id stack.TransportEndpointID, pkt *stack.PacketBuffer) {
	j.lastSent.Store(int64(time.Since(j.start)))
	j.sent.Store(true)
	j.proto.QueuePacket(j.listener(id).tcpEP, id, pkt)
}

// ack takes an ACK that matched no endpoint if it may carry a cookie.
func (j *cookieJar) ack(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	if !j.sent.Load() || time.Since(j.start)-time.Duration(j.lastSent.Load()) > cookieValidity {
		return false
	}
	j.proto.QueuePacket(j.listener(id).tcpEP, id, pkt)
	return true
}

// run hands every connection a cookie completed to deliver, until the
// listeners close.
func (j *cookieJar) run(deliver func(tcpip.Endpoint, *waiter.Queue)) {
	for _, l := range []*cookieListener{j.v4, j.v6} {
		j.wg.Add(1)
		go func() {
			defer j.wg.Done()
			l.accept(deliver)
		}()
	}
}

func (l *cookieListener) accept(deliver func(tcpip.Endpoint, *waiter.Queue)) {
	entry, ch := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	l.wq.EventRegister(&entry)
	defer l.wq.EventUnregister(&entry)
	for {
		ep, wq, err := l.ep.Accept(nil)
		if err == nil {
			deliver(ep, wq)
			continue
		}
		if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
			return // closed
		}
		<-ch
	}
}

// close stops the listeners and waits for their accept loops.
func (j *cookieJar) close() {
	j.v4.ep.Close()
	j.v6.ep.Close()
	j.wg.Wait()
}
