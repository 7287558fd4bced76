package netstack

import (
	"net"
	"net/netip"
)

// Handler receives every flow the stack terminates. Implementations decide
// what a flow becomes (a passthrough splice, a listener's filter chain, …);
// the stack only guarantees that the addresses are the ones the application
// used, untouched by NAT.
//
// Both methods are called on a goroutine of their own, one per flow, so a
// handler may block (dial upstream, sniff the first bytes) without stalling
// the stack.
type Handler interface {
	// HandleTCP is called once per new TCP connection, when its SYN arrives
	// (under a SYN flood, when the ACK of a SYN cookie completes its
	// handshake). The handler must call exactly one of req.Accept or
	// req.Refuse, and may connect upstream before Accept only if
	// req.DialFirst() says so.
	HandleTCP(req *TCPRequest)

	// HandleUDP is called once per new UDP 4-tuple. The flow is closed by
	// the stack after its idle timeout, or by the handler with Close.
	HandleUDP(flow *UDPFlow)
}

// HandlerFunc pairs adapt two functions to a Handler.
type HandlerFuncs struct {
	TCP func(*TCPRequest)
	UDP func(*UDPFlow)
}

// HandleTCP implements Handler; with no TCP func the flow is refused.
func (h HandlerFuncs) HandleTCP(r *TCPRequest) {
	if h.TCP == nil {
		r.Refuse()
		return
	}
	h.TCP(r)
}

// HandleUDP implements Handler; with no UDP func the flow is closed.
func (h HandlerFuncs) HandleUDP(f *UDPFlow) {
	if h.UDP == nil {
		f.Close()
		return
	}
	h.UDP(f)
}

// FlowID is a flow's original 4-tuple as the client sent it.
type FlowID struct {
	Src netip.AddrPort // the client (the application for outbound, the remote peer for inbound)
	Dst netip.AddrPort // the address the client connected to
}

// Conn is a terminated TCP flow. It is a net.Conn whose LocalAddr is the
// original destination and RemoteAddr the original source, with the
// half-close and reset operations a proxy needs to mirror the upstream side.
type Conn interface {
	net.Conn
	// CloseWrite sends FIN: the peer reads EOF, and may still send.
	CloseWrite() error
	// CloseRead stops reading; data that arrives afterwards is discarded.
	CloseRead() error
	// Reset aborts the connection with a RST.
	Reset()
}
