package netstack

import (
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

// synAckPacket reports whether pkt is a TCP SYN-ACK.
func synAckPacket(pkt *stack.PacketBuffer) bool {
	if pkt.TransportProtocolNumber != header.TCPProtocolNumber {
		return false
	}
	th := header.TCP(pkt.TransportHeader().Slice())
	return len(th) >= header.TCPMinimumSize &&
		th.Flags()&(header.TCPFlagSyn|header.TCPFlagAck|header.TCPFlagRst) == header.TCPFlagSyn|header.TCPFlagAck
}
