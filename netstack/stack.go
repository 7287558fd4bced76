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
)

const nicID tcpip.NICID = 1

// Config tunes the stack. Zero values take the documented defaults.
type Config struct {
	// MTU of the link; defaults to the device's MTU.
	MTU int

	// MaxInFlightTCP bounds the connections being set up at once (SYN
	// received, handler not yet decided). Further SYNs are dropped and
	// retransmitted by the client. Default 4096.
	MaxInFlightTCP int

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
	if c.MaxInFlightTCP <= 0 {
		c.MaxInFlightTCP = 4096
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
	s := &Stack{cfg: cfg, log: log, handler: h}
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
	tcpFwd := tcp.NewForwarder(s.ipstack, 0, cfg.MaxInFlightTCP, s.onTCP)
	s.ipstack.SetTransportProtocolHandler(tcp.ProtocolNumber, tcpFwd.HandlePacket)
	udpFwd := udp.NewForwarder(s.ipstack, s.onUDP)
	s.ipstack.SetTransportProtocolHandler(udp.ProtocolNumber, udpFwd.HandlePacket)

	s.link = newLinkEndpoint(dev, uint32(cfg.MTU), log)
	// The NIC starts disabled: a packet already queued in the TUN (a SYN
	// sent while a restarted proxy was down) must meet promiscuous mode,
	// spoofing and the routes, not a half-configured NIC that drops it.
	if err := s.ipstack.CreateNICWithOptions(nicID, s.link, stack.NICOptions{Name: "tun", Disabled: true}); err != nil {
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
		s.link.Close()
		s.ipstack.Close()
		s.ipstack.Destroy()
	})
}

// Stats are the stack's flow counters, for the admin endpoint and tests.
type Stats struct {
	TCPForwardDropped uint64 // SYNs dropped: too many connections in setup
	UDPFlowsActive    int64
}

// Stats returns a snapshot of the counters.
func (s *Stack) Stats() Stats {
	return Stats{
		TCPForwardDropped: s.ipstack.Stats().TCP.ForwardMaxInFlightDrop.Value(),
		UDPFlowsActive:    s.udpFlows.Load(),
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

// onTCP runs on the goroutine gVisor's forwarder starts for each SYN.
func (s *Stack) onTCP(r *tcp.ForwarderRequest) {
	req := &TCPRequest{ID: flowID(r.ID()), fr: r}
	s.handler.HandleTCP(req)
	// A handler that returned without deciding refuses the flow rather
	// than leaving the client's SYN unanswered.
	req.Refuse()
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

// TCPRequest is a TCP connection whose SYN has arrived and whose handshake
// waits for the handler's decision.
type TCPRequest struct {
	ID FlowID

	mu   sync.Mutex
	fr   *tcp.ForwarderRequest
	done bool
}

// Accept completes the handshake and returns the flow.
func (r *TCPRequest) Accept() (Conn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return nil, errors.New("netstack: flow already accepted or refused")
	}
	r.done = true
	var wq waiter.Queue
	ep, err := r.fr.CreateEndpoint(&wq)
	r.fr.Complete(false)
	if err != nil {
		return nil, fmt.Errorf("netstack: accept %v→%v: %w", r.ID.Src, r.ID.Dst, translateError(err))
	}
	return newEndpointConn(ep, &wq, "tcp", r.ID), nil
}

// Refuse answers the SYN with a RST, as a closed port would. It does
// nothing once the request was accepted or refused.
func (r *TCPRequest) Refuse() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.done {
		return
	}
	r.done = true
	r.fr.Complete(true)
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
