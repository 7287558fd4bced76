package netstack

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// A SYN-ACK is not written to the device by the goroutine that sends it.
//
// gVisor sends a passive open's SYN-ACK (tcp.Forwarder's CreateEndpoint,
// and the handshake's retransmit timer) with the new endpoint's lock
// held, taken with a plain Lock rather than as a "user" of the endpoint.
// Our link writes synchronously, so that lock was held across the TUN
// write, during which the kernel answers the SYN-ACK at once: the
// client's ACK is often queued before the write returns. A TCP processor
// goroutine that finds an endpoint locked this way re-queues it and tries
// again without yielding; with one Go processor (--concurrency 1, the
// default) it then holds the only P while the lock's owner, back from its
// syscall, waits for one, until the runtime preempts the spinner after
// 10 ms. That was the connect row's tail and most of its gVisor CPU.
// Handing the SYN-ACK's write to a goroutine of its own lets the sender
// release the lock first; it costs a goroutine start per connection.

// synAckLink is the link endpoint the NIC writes through: a batch that
// holds a SYN-ACK is written by a goroutine of its own (with references
// of its own on the packets, which the caller may release on return);
// anything else is written by the caller, as linkEndpoint does.
type synAckLink struct{ *linkEndpoint }

// WritePackets implements stack.LinkEndpoint.
func (l synAckLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	for _, pkt := range pkts.AsSlice() {
		if !synAckPacket(pkt) {
			continue
		}
		var own stack.PacketBufferList
		for _, p := range pkts.AsSlice() {
			own.PushBack(p.IncRef())
		}
		go func() {
			l.linkEndpoint.WritePackets(own)
			own.DecRef()
		}()
		return own.Len(), nil
	}
	return l.linkEndpoint.WritePackets(pkts)
}

// synAckPacket reports whether pkt is a TCP SYN-ACK.
func synAckPacket(pkt *stack.PacketBuffer) bool {
	if pkt.TransportProtocolNumber != header.TCPProtocolNumber {
		return false
	}
	th := header.TCP(pkt.TransportHeader().Slice())
	return len(th) >= header.TCPMinimumSize &&
		th.Flags()&(header.TCPFlagSyn|header.TCPFlagAck|header.TCPFlagRst) == header.TCPFlagSyn|header.TCPFlagAck
}
