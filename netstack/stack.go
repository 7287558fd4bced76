// Package netstack terminates the flows captured by the TUN device in a
// userspace gVisor TCP/IP stack.
//
// The stack's only NIC is promiscuous and spoofing: it accepts packets for
// any destination and answers from any source, so a flow arrives at the
// Handler with the addresses the application used (no NAT, no
// SO_ORIGINAL_DST). Every TCP SYN and every new UDP 4-tuple becomes a call
// on the Handler, which decides what the flow becomes. Nothing in this
// package knows about listeners or clusters.
package netstack

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/meshtun/meshtun/internal/gopool"
)

const nicID tcpip.NICID = 1

// Config tunes the stack. Zero values take the documented defaults.
type Config struct {
	// MTU of the link; defaults to the device's MTU.
	MTU int

	// Inbound tells the flows to the pod (true: dst is one of the pod's
	// own addresses) from the pod's outbound flows, for the half-open
	// budgets below; nil counts every flow as outbound. It must agree with
	// the Handler's notion of direction (mesh.LocalAddrs.Contains).
	Inbound func(dst netip.Addr) bool

	// MaxHalfOpenInbound and MaxHalfOpenOutbound bound the TCP flows of
	// each direction whose SYN was admitted and whose handshake is not
	// complete (Linux's SYN backlog, one per direction). A SYN beyond is
	// answered with a SYN cookie (see admission.go). Default 1024 each.
	MaxHalfOpenInbound, MaxHalfOpenOutbound int

	// MaxHalfOpenPerSource bounds the inbound half-open flows of one
	// source (an IPv4 address, an IPv6 /64); beyond, its SYNs get cookies.
	// Default 64.
	MaxHalfOpenPerSource int

	// DialFirstMax: while fewer than this many outbound flows are
	// half-open, a new one is offered to the handler with
	// TCPRequest.DialFirst true; beyond, the handshake completes first.
	// Inbound flows are never offered (admission.go). Default 16.
	DialFirstMax int

	// SynAckRetries is how many times a SYN-ACK is retransmitted (after
	// 1 s, 2 s, 4 s, …) before a half-open flow is given up (Linux's
	// net.ipv4.tcp_synack_retries), 1..6. Default 2: given up after 7 s.
	// gVisor's own passive handshake would retransmit for 127 s.
	SynAckRetries int

	// MaxUDPFlows bounds concurrently tracked UDP 4-tuples. Default 16384.
	MaxUDPFlows int

	// UDPIdleTimeout ends a UDP flow with no traffic in either direction.
	// Default 60 s (Envoy's udp_proxy idle_timeout).
	UDPIdleTimeout time.Duration

	// TCP buffer ranges. Defaults (measured, see README "Tuning"): receive
	// 1 MiB default / 8 MiB max with auto-tuning, send 1 MiB / 6 MiB.
	TCPReceiveBufferDefault, TCPReceiveBufferMax int
	TCPSendBufferDefault, TCPSendBufferMax       int
}

func (c *Config) setDefaults(dev wgtun.Device) error {
	if c.MTU == 0 {
		mtu, err := dev.MTU()
		if err != nil {
			return fmt.Errorf("netstack: reading device MTU: %w", err)
		}
		c.MTU = mtu
	}
	if c.MTU < 1280 || c.MTU > 65535 {
		return fmt.Errorf("netstack: MTU %d out of range 1280..65535", c.MTU)
	}
	if c.MaxHalfOpenInbound <= 0 {
		c.MaxHalfOpenInbound = 1024
	}
	if c.MaxHalfOpenOutbound <= 0 {
		c.MaxHalfOpenOutbound = 1024
	}
	if c.MaxHalfOpenPerSource <= 0 {
		c.MaxHalfOpenPerSource = 64
	}
	if c.DialFirstMax <= 0 {
		c.DialFirstMax = 16
	}
	if c.SynAckRetries < 0 || c.SynAckRetries > 6 {
		return fmt.Errorf("netstack: SynAckRetries %d out of range 1..6", c.SynAckRetries)
	}
	if c.SynAckRetries == 0 {
		c.SynAckRetries = 2
	}
	if c.MaxUDPFlows <= 0 {
		c.MaxUDPFlows = 16384
	}
	if c.UDPIdleTimeout <= 0 {
		c.UDPIdleTimeout = 60 * time.Second
	}
	if c.TCPReceiveBufferDefault <= 0 {
		c.TCPReceiveBufferDefault = 1 << 20
	}
	if c.TCPReceiveBufferMax <= 0 {
		c.TCPReceiveBufferMax = 8 << 20
	}
	if c.TCPSendBufferDefault <= 0 {
		c.TCPSendBufferDefault = 1 << 20
	}
	if c.TCPSendBufferMax <= 0 {
		c.TCPSendBufferMax = 6 << 20
	}
	return nil
}

// Stack is a gVisor stack attached to a TUN device.
type Stack struct {
	cfg     Config
	log     zerolog.Logger
	handler Handler
	ipstack *stack.Stack
	link    *linkEndpoint

	udpFlows atomic.Int64

	adm          *admission
	cookies      *cookieJar
	fwd          *tcp.Forwarder
	synAckWindow time.Duration

	closeOnce sync.Once
}

// New builds the stack on dev and starts serving flows to h. The caller
// keeps ownership of dev: Close the Stack first, then the device.
func New(dev wgtun.Device, h Handler, cfg Config, log zerolog.Logger) (*Stack, error) {
	if h == nil {
		return nil, errors.New("netstack: nil Handler")
	}
	if err := cfg.setDefaults(dev); err != nil {
		return nil, err
	}
	s := &Stack{cfg: cfg, log: log, handler: h, adm: newAdmission(&cfg)}
	// gVisor sends the first SYN-ACK at once and retransmits after 1 s,
	// then doubling: the n-th retransmit is answered within 2^(n+1)-1 s.
	s.synAckWindow = time.Duration(1<<(cfg.SynAckRetries+1)-1) * time.Second
	s.ipstack = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	if err := s.tune(); err != nil {
		s.ipstack.Destroy()
		return nil, err
	}

	// Handlers go in before the NIC exists so no early SYN is answered
	// with a RST by the default "no endpoint" path.
	// The forwarder's own bound is never reached: admission reserves
	// less (admission.go).
	s.fwd = tcp.NewForwarder(s.ipstack, 0, cfg.MaxHalfOpenInbound+cfg.MaxHalfOpenOutbound+1, s.onTCP)
	s.ipstack.SetTransportProtocolHandler(tcp.ProtocolNumber, s.handleTCP)
	udpFwd := udp.NewForwarder(s.ipstack, s.onUDP)
	s.ipstack.SetTransportProtocolHandler(udp.ProtocolNumber, udpFwd.HandlePacket)

	s.link = newLinkEndpoint(dev, uint32(cfg.MTU), log)
	// The NIC starts disabled: a packet already queued in the TUN (a SYN
	// sent while a restarted proxy was down) must meet promiscuous mode,
	// spoofing and the routes, not a half-configured NIC that drops it.
	if err := s.ipstack.CreateNICWithOptions(nicID, synAckLink{s.link}, stack.NICOptions{Name: "tun", Disabled: true}); err != nil {
		s.ipstack.Destroy()
		return nil, fmt.Errorf("netstack: create NIC: %s", err)
	}
	// Accept every destination (promiscuous) and answer from it (spoofing):
	// this is what keeps the original addresses intact.
	if err := s.ipstack.SetPromiscuousMode(nicID, true); err != nil {
		s.Close()
		return nil, fmt.Errorf("netstack: promiscuous mode: %s", err)
	}
	if err := s.ipstack.SetSpoofing(nicID, true); err != nil {
		s.Close()
		return nil, fmt.Errorf("netstack: spoofing: %s", err)
	}
	s.ipstack.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	// The cookie listeners bind on the NIC, so they come after it, and
	// before it is enabled, so no SYN finds admission without them.
	cj, err := newCookieJar(s.ipstack)
	if err != nil {
		s.Close()
		return nil, err
	}
	s.cookies = cj
	cj.run(s.onCookieFlow)
	if err := s.ipstack.EnableNIC(nicID); err != nil {
		s.Close()
		return nil, fmt.Errorf("netstack: enable NIC: %s", err)
	}
	s.link.start()
	return s, nil
}

// tune sets the TCP options: SACK on; RACK loss detection kept (the gVisor
// default — turning it off costs up to 5× on reordering paths, see
// tailscale#20893); Nagle off, as a proxy must not add latency; buffer
// ranges with receive auto-tuning.
func (s *Stack) tune() error {
	opts := []tcpip.SettableTransportProtocolOption{
		ptr(tcpip.TCPSACKEnabled(true)),
		ptr(tcpip.TCPDelayEnabled(false)),
		ptr(tcpip.TCPModerateReceiveBufferOption(true)),
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: s.cfg.TCPReceiveBufferDefault, Max: s.cfg.TCPReceiveBufferMax},
		&tcpip.TCPSendBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: s.cfg.TCPSendBufferDefault, Max: s.cfg.TCPSendBufferMax},
	}
	for _, o := range opts {
		if err := s.ipstack.SetTransportProtocolOption(tcp.ProtocolNumber, o); err != nil {
			return fmt.Errorf("netstack: TCP option %T: %s", o, err)
		}
	}
	return nil
}

func ptr[T any](v T) *T { return &v }

// Close stops the stack: every flow's endpoint is released. The device is
// left to its owner.
func (s *Stack) Close() {
	s.closeOnce.Do(func() {
		if s.cookies != nil {
			s.cookies.close()
		}
		s.link.Close()
		s.ipstack.Close()
		s.ipstack.Destroy()
	})
}

// Stats are the stack's flow counters, for the admin endpoint and tests.
type Stats struct {
	TCPForwardDropped uint64 // SYNs dropped by gVisor's forwarder bound (admission keeps below it)
	UDPFlowsActive    int64

	// Half-open TCP flows holding a slot, by direction (gauges).
	TCPHalfOpenInbound, TCPHalfOpenOutbound int64
	// SYNs answered with a cookie because their direction's budget, or
	// their source's share of it, was spent.
	TCPSynOverBudget, TCPSynOverSourceCap uint64
	// SYN cookies sent, ACKs that carried a valid one (a connection was
	// made), and ACKs whose cookie was invalid or expired (answered RST).
	TCPSynCookiesSent, TCPSynCookiesRecv, TCPSynCookiesFailed uint64
	// Half-open flows given up after SynAckRetries retransmits.
	TCPSynAckTimeouts uint64
}

// Stats returns a snapshot of the counters.
func (s *Stack) Stats() Stats {
	tcpStats := s.ipstack.Stats().TCP
	return Stats{
		TCPForwardDropped:   tcpStats.ForwardMaxInFlightDrop.Value(),
		UDPFlowsActive:      s.udpFlows.Load(),
		TCPHalfOpenInbound:  s.adm.halfOpen[dirInbound].Load(),
		TCPHalfOpenOutbound: s.adm.halfOpen[dirOutbound].Load(),
		TCPSynOverBudget:    s.adm.overBudget.Load(),
		TCPSynOverSourceCap: s.adm.overSource.Load(),
		TCPSynCookiesSent:   tcpStats.ListenOverflowSynCookieSent.Value(),
		TCPSynCookiesRecv:   tcpStats.ListenOverflowSynCookieRcvd.Value(),
		TCPSynCookiesFailed: tcpStats.ListenOverflowInvalidSynCookieRcvd.Value(),
		TCPSynAckTimeouts:   s.adm.timeouts.Load(),
	}
}

func flowID(id stack.TransportEndpointID) FlowID {
	return FlowID{
		Src: netip.AddrPortFrom(addrFrom(id.RemoteAddress), id.RemotePort),
		Dst: netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort),
	}
}

func addrFrom(a tcpip.Address) netip.Addr {
	switch a.Len() {
	case 4:
		return netip.AddrFrom4(a.As4())
	case 16:
		return netip.AddrFrom16(a.As16())
	}
	return netip.Addr{}
}

// handleTCP is the stack's handler for TCP segments that match no
// endpoint: SYNs go through admission (admission.go) to the forwarder or
// to a SYN cookie; an ACK may carry a cookie; anything else is left to
// the stack, which answers it with a RST.
func (s *Stack) handleTCP(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	th := header.TCP(pkt.TransportHeader().Slice())
	if len(th) < header.TCPMinimumSize {
		return false
	}
	switch flags := th.Flags(); {
	case flags&(header.TCPFlagSyn|header.TCPFlagAck|header.TCPFlagRst) == header.TCPFlagSyn:
	case flags&(header.TCPFlagSyn|header.TCPFlagRst) == 0 && flags&header.TCPFlagAck != 0:
		return s.cookies.ack(id, pkt)
	default:
		return false
	}
	switch s.adm.admit(id) {
	case admitDrop:
		return true
	case admitCookie:
		s.cookies.synCookie(id, pkt)
		return true
	}
	if !s.fwd.HandlePacket(id, pkt) {
		s.adm.release(id) // not a valid SYN after all (checksum)
		return false
	}
	return true
}

// onTCP runs on the goroutine gVisor's forwarder starts for each SYN
// admission let through. It hands the flow to a worker goroutine
// (gopool) at once: the handler runs for the flow's life through deep
// call chains (gVisor's endpoint creation, the upstream dial, the
// splice), and on the forwarder's fresh goroutine each flow grew its
// stack anew; a worker keeps the stack the last flow grew.
func (s *Stack) onTCP(r *tcp.ForwarderRequest) {
	gopool.Go(func() { s.serveTCP(r) })
}

// serveTCP runs the handler on one forwarded SYN.
func (s *Stack) serveTCP(r *tcp.ForwarderRequest) {
	tid := r.ID()
	adm, _ := s.adm.lookup(tid)
	req := &TCPRequest{ID: flowID(tid), fr: r, tid: tid, s: s, dialFirst: adm.dialFirst}
	s.handler.HandleTCP(req)
	// A handler that returned without deciding refuses the flow rather
	// than leaving the client's SYN unanswered.
	req.Refuse()
}

// onCookieFlow runs on a cookie listener's accept loop for each flow a
// SYN cookie established: the handler gets it already accepted.
func (s *Stack) onCookieFlow(ep tcpip.Endpoint, wq *waiter.Queue) {
	info, ok := ep.Info().(*stack.TransportEndpointInfo)
	if !ok {
		ep.Abort()
		return
	}
	req := &TCPRequest{ID: flowID(info.ID), ep: ep, wq: wq}
	gopool.Go(func() {
		s.handler.HandleTCP(req)
		req.Refuse()
	})
}

// onUDP runs synchronously in the stack's receive path for the first
// packet of a 4-tuple: it creates the connected endpoint at once, so that
// the next packets of the flow find it, and hands the flow off.
func (s *Stack) onUDP(r *udp.ForwarderRequest) bool {
	if s.udpFlows.Add(1) > int64(s.cfg.MaxUDPFlows) {
		s.udpFlows.Add(-1)
		return true // dropped, like a full conntrack table
	}
	id := flowID(r.ID())
	var wq waiter.Queue
	ep, err := r.CreateEndpoint(&wq)
	if err != nil {
		s.udpFlows.Add(-1)
		return true
	}
	f := newUDPFlow(id, newEndpointConn(ep, &wq, "udp", id), s.cfg.UDPIdleTimeout, func() { s.udpFlows.Add(-1) })
	go s.handler.HandleUDP(f)
	return true
}

// TCPRequest is a TCP connection whose SYN has arrived. Usually its
// handshake waits for the handler's decision; a connection a SYN cookie
// let in (the stack was under a SYN flood) arrives with its handshake
// already complete, and DialFirst is false.
type TCPRequest struct {
	ID FlowID

	mu   sync.Mutex
	done bool

	// A handshake pending: the forwarder's request and the admission
	// slots it holds.
	fr        *tcp.ForwarderRequest
	tid       stack.TransportEndpointID
	s         *Stack
	dialFirst bool

	// A handshake a cookie completed.
	ep tcpip.Endpoint
	wq *waiter.Queue
}

// DialFirst reports whether the handler may connect upstream before it
// accepts, so that a refused or silent upstream reaches the client as a
// refused connect (RST) or no answer, as the original destination's own
// would. It is true only for an outbound flow (from the pod's own
// applications) while few outbound flows are half-open. Otherwise the
// handler must Accept before any upstream work: the SYN may be spoofed,
// and only the completed handshake proves that a client exists (a kernel
// listener, and Envoy behind it, always work this way). An inbound flow
// sent to its original destination may still be refused first when
// nothing listens there (ListenProbe).
func (r *TCPRequest) DialFirst() bool { return r.dialFirst }

// Accept completes the handshake and returns the flow.
func (r *TCPRequest) Accept() (Conn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return nil, errors.New("netstack: flow already accepted or refused")
	}
	r.done = true
	if r.fr == nil {
		return newEndpointConn(r.ep, r.wq, "tcp", r.ID), nil
	}
	var wq waiter.Queue
	// The forwarder's handshake returns on the first event on wq: it is
	// woken when the SYN-ACK retransmits are spent, and finds itself not
	// connected and aborts.
	var gaveUp atomic.Bool
	t := time.AfterFunc(r.s.synAckWindow, func() {
		gaveUp.Store(true)
		wq.Notify(waiter.WritableEvents)
	})
	ep, err := r.fr.CreateEndpoint(&wq)
	t.Stop()
	r.fr.Complete(false)
	r.s.adm.release(r.tid)
	if err != nil {
		if gaveUp.Load() {
			r.s.adm.timeouts.Add(1)
		}
		return nil, fmt.Errorf("netstack: accept %v→%v: %w", r.ID.Src, r.ID.Dst, translateError(err))
	}
	return newEndpointConn(ep, &wq, "tcp", r.ID), nil
}

// Refuse answers the SYN with a RST, as a closed port would; a flow
// whose handshake a cookie completed is reset. It does nothing once the
// request was accepted or refused.
func (r *TCPRequest) Refuse() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return
	}
	r.done = true
	if r.fr == nil {
		newEndpointConn(r.ep, r.wq, "tcp", r.ID).Reset()
		return
	}
	r.fr.Complete(true)
	r.s.adm.release(r.tid)
}

// Unflushed counts the TCP connections whose data the peer has not all
// acknowledged yet: our FIN (and what precedes it) is still in flight
// (FIN-WAIT-1, CLOSING, LAST-ACK), or the connection is still open. A
// proxy about to exit waits for it to reach 0, or bytes it already
// accepted for a client would die with the process.
func (s *Stack) Unflushed() int {
	n := 0
	for _, ep := range s.ipstack.RegisteredEndpoints() {
		te, ok := ep.(*tcp.Endpoint)
		if !ok {
			continue
		}
		switch te.EndpointState() {
		case tcp.StateEstablished, tcp.StateSynRecv, tcp.StateFinWait1, tcp.StateClosing,
			tcp.StateLastAck, tcp.StateCloseWait:
			n++
		}
	}
	return n
}
