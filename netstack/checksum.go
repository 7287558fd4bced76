package netstack

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// validChecksums reports whether a raw IP packet read from the device has
// a valid IPv4 header checksum and a valid TCP or UDP checksum.
//
// The kernel hands the TUN forwarded packets whose transport checksum was
// never verified, so it is checked here once, before GRO, instead of by
// the stack after it (see linkEndpoint.Capabilities). Packets this cannot
// parse (IPv6 extension headers, IPv4 fragments, other protocols) are let
// through for the stack's own parsing to accept or reject.
func validChecksums(b []byte) bool { return validChecksumsSplit(b, nil) }

// validChecksumsSplit is validChecksums for a packet held in two parts,
// head followed by rest; the IP header must be within head.
func validChecksumsSplit(head, rest []byte) bool {
	b := head
	var (
		proto    uint8
		src, dst tcpip.Address
		l4       []byte
		l4len    int
	)
	switch header.IPVersion(b) {
	case header.IPv4Version:
		if len(b) < header.IPv4MinimumSize {
			return false
		}
		ip := header.IPv4(b)
		ihl := int(ip.HeaderLength())
		tot := int(ip.TotalLength())
		if ihl < header.IPv4MinimumSize || tot < ihl || tot > len(b)+len(rest) || ihl > len(b) {
			return false
		}
		if checksum.Checksum(b[:ihl], 0) != 0xffff {
			return false
		}
		if ip.FragmentOffset() != 0 || ip.Flags()&header.IPv4FlagMoreFragments != 0 {
			return true
		}
		proto = ip.Protocol()
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
		l4, l4len = b[ihl:min(tot, len(b))], tot-ihl
	case header.IPv6Version:
		if len(b) < header.IPv6MinimumSize {
			return false
		}
		ip := header.IPv6(b)
		end := header.IPv6MinimumSize + int(ip.PayloadLength())
		if end > len(b)+len(rest) {
			return false
		}
		proto = ip.NextHeader()
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
		l4, l4len = b[header.IPv6MinimumSize:min(end, len(b))], end-header.IPv6MinimumSize
	default:
		return false
	}
	// The transport header is within head too (the caller's head is
	// longer than any IP header plus a TCP or UDP header), or the packet
	// is too short.
	var tp tcpip.TransportProtocolNumber
	switch proto {
	case uint8(header.TCPProtocolNumber):
		if len(l4) < header.TCPMinimumSize {
			return false
		}
		tp = header.TCPProtocolNumber
	case uint8(header.UDPProtocolNumber):
		if len(l4) < header.UDPMinimumSize {
			return false
		}
		if binary.BigEndian.Uint16(l4[6:]) == 0 {
			// IPv4 UDP without checksum is legal; over IPv6 it is not.
			return src.Len() == 4
		}
		tp = header.UDPProtocolNumber
	default:
		return true
	}
	pseudo := header.PseudoHeaderChecksum(tp, src, dst, uint16(l4len))
	if len(l4) == l4len {
		return checksum.Checksum(l4, pseudo) == 0xffff
	}
	var cs checksum.Checksumer
	cs.Add(l4)
	cs.Add(rest[:l4len-len(l4)])
	return checksum.Combine(pseudo, cs.Checksum()) == 0xffff
}
