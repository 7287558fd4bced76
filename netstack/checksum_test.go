package netstack

import (
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// buildPacket returns an IPv4 or IPv6 packet carrying a TCP or UDP segment
// with correct checksums.
func buildPacket(v6 bool, proto tcpip.TransportProtocolNumber, payload []byte) []byte {
	l4len := header.UDPMinimumSize
	if proto == header.TCPProtocolNumber {
		l4len = header.TCPMinimumSize
	}
	iplen := header.IPv4MinimumSize
	if v6 {
		iplen = header.IPv6MinimumSize
	}
	b := make([]byte, iplen+l4len+len(payload))
	var src, dst tcpip.Address
	if v6 {
		src, dst = tcpip.AddrFrom16Slice(clientV6.AsSlice()), tcpip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: 1})
		header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(l4len + len(payload)), TransportProtocol: proto, HopLimit: 64, SrcAddr: src, DstAddr: dst})
	} else {
		src, dst = tcpip.AddrFrom4Slice(clientV4.AsSlice()), tcpip.AddrFrom4([4]byte{192, 0, 2, 1})
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(proto), SrcAddr: src, DstAddr: dst})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	l4 := b[iplen:]
	copy(l4[l4len:], payload)
	pseudo := header.PseudoHeaderChecksum(proto, src, dst, uint16(len(l4)))
	if proto == header.TCPProtocolNumber {
		t := header.TCP(l4)
		t.Encode(&header.TCPFields{SrcPort: 1234, DstPort: 80, SeqNum: 1, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagAck, WindowSize: 1000})
		t.SetChecksum(^checksum.Checksum(l4, pseudo))
	} else {
		u := header.UDP(l4)
		u.Encode(&header.UDPFields{SrcPort: 1234, DstPort: 53, Length: uint16(len(l4))})
		u.SetChecksum(^checksum.Checksum(l4, pseudo))
	}
	return b
}

func TestValidChecksums(t *testing.T) {
	payload := []byte("meshtun checksum test payload, odd length!")
	for _, tc := range []struct {
		name  string
		v6    bool
		proto tcpip.TransportProtocolNumber
	}{
		{"tcp4", false, header.TCPProtocolNumber},
		{"udp4", false, header.UDPProtocolNumber},
		{"tcp6", true, header.TCPProtocolNumber},
		{"udp6", true, header.UDPProtocolNumber},
	} {
		t.Run(tc.name, func(t *testing.T) {
			good := buildPacket(tc.v6, tc.proto, payload)
			if !validChecksums(good) {
				t.Fatal("valid packet rejected")
			}
			bad := append([]byte(nil), good...)
			bad[len(bad)-3] ^= 0x40 // corrupt the payload
			if validChecksums(bad) {
				t.Fatal("packet with corrupted payload accepted")
			}
			if validChecksums(good[:len(good)-10]) {
				t.Fatal("truncated packet accepted")
			}
		})
	}
	hdr := buildPacket(false, header.TCPProtocolNumber, payload)
	hdr[8]-- // TTL changed without fixing the header checksum
	if validChecksums(hdr) {
		t.Fatal("IPv4 header with bad checksum accepted")
	}
	if validChecksums([]byte{0x45, 0}) || validChecksums(nil) || validChecksums([]byte{0x10, 1, 2}) {
		t.Fatal("garbage accepted")
	}
}

func BenchmarkValidChecksums64K(b *testing.B) {
	pkt := buildPacket(false, header.TCPProtocolNumber, make([]byte, 65000))
	b.SetBytes(int64(len(pkt)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if !validChecksums(pkt) {
			b.Fatal("invalid")
		}
	}
}

// TestValidChecksumsSplit: a packet held in two parts (the raw TUN path's
// head view and the rest) checks like the contiguous packet, at every
// split point after the transport header, odd ones included, and a
// flipped payload byte in either part fails.
func TestValidChecksumsSplit(t *testing.T) {
	payload := make([]byte, 1001)
	for i := range payload {
		payload[i] = byte(i*7 + 3)
	}
	for _, v6 := range []bool{false, true} {
		for _, proto := range []tcpip.TransportProtocolNumber{header.TCPProtocolNumber, header.UDPProtocolNumber} {
			b := buildPacket(v6, proto, payload)
			hdr := len(b) - len(payload)
			for _, cut := range []int{hdr, hdr + 1, hdr + 77, hdr + 500, len(b) - 1, len(b)} {
				if !validChecksumsSplit(b[:cut], b[cut:]) {
					t.Errorf("v6=%v proto=%d cut=%d: valid packet rejected", v6, proto, cut)
				}
				for _, flip := range []int{hdr + 10, len(b) - 2} {
					bad := append([]byte(nil), b...)
					bad[flip] ^= 0x40
					if validChecksumsSplit(bad[:cut], bad[cut:]) {
						t.Errorf("v6=%v proto=%d cut=%d: corrupted byte %d accepted", v6, proto, cut, flip)
					}
				}
			}
		}
	}
}
