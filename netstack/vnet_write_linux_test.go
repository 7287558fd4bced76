package netstack

import (
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// testMSS and testMSS6 are the segment payloads of the hand-built
// packets: a 1500-byte MTU less IPv4 (IPv6), TCP and the timestamp
// option, as gVisor computes them from the peer's MSS.
const (
	testMSS  = 1448
	testMSS6 = 1428
)

// hostGSOPacket builds a TCP segment the way a gVisor endpoint with
// HostGSO hands it to the link: timestamp option, the pseudo-header sum
// in the checksum field (CHECKSUM_PARTIAL) and the endpoint's GSO options,
// whatever the payload's size.
func hostGSOPacket(t *testing.T, src, dst tcpip.Address, payload int) *stack.PacketBuffer {
	t.Helper()
	data := make([]byte, payload)
	for i := range data {
		data[i] = byte(i)
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: header.IPv6MinimumSize + header.TCPMinimumSize + 12,
		Payload:            buffer.MakeWithData(data),
	})
	tcp := header.TCP(pkt.TransportHeader().Push(header.TCPMinimumSize + 12))
	tcp.Encode(&header.TCPFields{
		SrcPort: 40000, DstPort: 9090, SeqNum: 1, AckNum: 1,
		DataOffset: header.TCPMinimumSize + 12,
		Flags:      header.TCPFlagAck | header.TCPFlagPsh, WindowSize: 512,
	})
	copy(tcp[header.TCPMinimumSize:], []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2})
	tcp.SetChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(len(tcp)+payload)))
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	gso := stack.GSO{NeedsCsum: true, CsumOffset: header.TCPChecksumOffset, MSS: testMSS6, MaxSize: 1<<16 - 1}
	if src.Len() == 4 {
		ip := header.IPv4(pkt.NetworkHeader().Push(header.IPv4MinimumSize))
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(pkt.Size()), TTL: 64, Protocol: uint8(header.TCPProtocolNumber),
			SrcAddr: src, DstAddr: dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
		gso.Type, gso.L3HdrLen, gso.MSS = stack.GSOTCPv4, header.IPv4MinimumSize, testMSS
	} else {
		ip := header.IPv6(pkt.NetworkHeader().Push(header.IPv6MinimumSize))
		ip.Encode(&header.IPv6Fields{
			PayloadLength: uint16(pkt.Size() - header.IPv6MinimumSize), TransportProtocol: header.TCPProtocolNumber,
			HopLimit: 64, SrcAddr: src, DstAddr: dst,
		})
		pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
		gso.Type, gso.L3HdrLen = stack.GSOTCPv6, header.IPv6MinimumSize
	}
	pkt.GSOOptions = gso
	return pkt
}

// TestWriteHdr checks the virtio header of the stack's packets: a segment
// of one MSS or less is sent with its checksum partial but no GSO request
// (the kernel would count its TCP options as payload, call it GSO, and
// refuse to segment it when forwarding), a larger one with GSO of the
// right IP version, and a packet the stack checksummed itself with a bare
// header.
func TestWriteHdr(t *testing.T) {
	v4s, v4d := tcpip.AddrFrom4([4]byte{10, 0, 0, 2}), tcpip.AddrFrom4([4]byte{10, 0, 1, 2})
	v6s, v6d := tcpip.AddrFrom16([16]byte{0xfd, 15: 2}), tcpip.AddrFrom16([16]byte{0xfd, 1, 15: 2})
	for _, c := range []struct {
		name     string
		src, dst tcpip.Address
		payload  int
		gsoType  uint8
		l3       uint16
	}{
		{"v4 one segment", v4s, v4d, testMSS, vnetGSONone, 20},
		{"v4 less than a segment", v4s, v4d, 100, vnetGSONone, 20},
		{"v4 pure ACK", v4s, v4d, 0, vnetGSONone, 20},
		{"v4 one byte over", v4s, v4d, testMSS + 1, vnetGSOTCPv4, 20},
		{"v4 64 KiB", v4s, v4d, 1<<16 - 1 - 161, vnetGSOTCPv4, 20},
		{"v6 one segment", v6s, v6d, testMSS6, vnetGSONone, 40},
		{"v6 one byte over", v6s, v6d, testMSS6 + 1, vnetGSOTCPv6, 40},
		{"v6 three segments", v6s, v6d, 3 * testMSS6, vnetGSOTCPv6, 40},
	} {
		t.Run(c.name, func(t *testing.T) {
			pkt := hostGSOPacket(t, c.src, c.dst, c.payload)
			defer pkt.DecRef()
			h := writeHdr(pkt)
			if h.flags != vnetFlagNeedsCsum || h.csumStart != c.l3 || h.csumOffset != header.TCPChecksumOffset {
				t.Errorf("checksum: flags %d start %d offset %d, want NEEDS_CSUM at %d+%d",
					h.flags, h.csumStart, h.csumOffset, c.l3, header.TCPChecksumOffset)
			}
			if h.hdrLen != c.l3+32 {
				t.Errorf("hdr_len %d, want %d (IP + TCP with options)", h.hdrLen, c.l3+32)
			}
			if h.gsoType != c.gsoType {
				t.Fatalf("gso_type %d, want %d", h.gsoType, c.gsoType)
			}
			want := uint16(0)
			switch c.gsoType {
			case vnetGSOTCPv4:
				want = testMSS
			case vnetGSOTCPv6:
				want = testMSS6
			}
			if h.gsoSize != want {
				t.Errorf("gso_size %d, want %d", h.gsoSize, want)
			}
		})
	}

	// A packet the stack checksummed (no HostGSO on its endpoint: a SYN,
	// a RST, UDP) goes with a bare header.
	pkt := hostGSOPacket(t, v4s, v4d, 10)
	defer pkt.DecRef()
	pkt.GSOOptions = stack.GSO{}
	if h := writeHdr(pkt); h != (vnetHdr{}) {
		t.Errorf("header of a checksummed packet %+v, want all zero", h)
	}
}

// TestHostGSOWritesForwarded writes segments as a HostGSO endpoint makes
// them into a TUN whose kernel forwards them out of a veth, as it does
// the stack's replies to an inbound flow from outside the pod, and checks
// the veth sends them on and drops none. A one-segment packet marked GSO
// (the old header) was dropped there by validate_xmit_skb, each time it
// was retransmitted too: inbound captured flows stalled.
func TestHostGSOWritesForwarded(t *testing.T) {
	inNetns(t)
	dev, err := wgtun.CreateTUN("mtgso0", 65535)
	if err != nil {
		t.Fatalf("create TUN: %v", err)
	}
	t.Cleanup(func() { dev.Close() })
	go func() {
		for range dev.Events() {
		}
	}()
	v, err := newVnetIO(dev)
	if err != nil || v == nil {
		t.Fatalf("raw TUN I/O: %v %v", v, err)
	}
	tun, err := netlink.LinkByName("mtgso0")
	if err != nil {
		t.Fatal(err)
	}
	out := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "mtgv0", MTU: 1500}, PeerName: "mtgv1"}
	if err := netlink.LinkAdd(out); err != nil {
		t.Fatalf("veth: %v", err)
	}
	peer, err := netlink.LinkByName("mtgv1")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []struct {
		link netlink.Link
		addr string
	}{{tun, "10.97.0.1/24"}, {tun, "fd97::1/64"}, {out, "10.96.0.1/24"}, {out, "fd96::1/64"}} {
		a, _ := netlink.ParseAddr(s.addr)
		a.Flags = unix.IFA_F_NODAD
		if err := netlink.AddrAdd(s.link, a); err != nil {
			t.Fatalf("address %s: %v", s.addr, err)
		}
	}
	for _, l := range []netlink.Link{tun, out, peer} {
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	for _, dst := range []string{"10.96.0.2", "fd96::2"} {
		if err := netlink.NeighAdd(&netlink.Neigh{
			LinkIndex: out.Attrs().Index, State: netlink.NUD_PERMANENT,
			IP: net.ParseIP(dst), HardwareAddr: peer.Attrs().HardwareAddr,
		}); err != nil {
			t.Fatalf("neighbour %s: %v", dst, err)
		}
	}
	for _, f := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
		if err := os.WriteFile(f, []byte("1"), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	stats := func(name string) *netlink.LinkStatistics {
		t.Helper()
		l, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		return l.Attrs().Statistics
	}
	v4s, v4d := tcpip.AddrFrom4([4]byte{10, 97, 0, 2}), tcpip.AddrFrom4([4]byte{10, 96, 0, 2})
	v6s, v6d := tcpip.AddrFrom16([16]byte{0xfd, 0x97, 15: 2}), tcpip.AddrFrom16([16]byte{0xfd, 0x96, 15: 2})
	for _, c := range []struct {
		src, dst tcpip.Address
		payload  int
	}{
		{v4s, v4d, testMSS}, {v4s, v4d, testMSS - 5}, {v4s, v4d, 5*testMSS + 7}, {v4s, v4d, 1<<16 - 1 - 161},
		{v6s, v6d, testMSS6}, {v6s, v6d, testMSS6 - 5}, {v6s, v6d, 5*testMSS6 + 7},
	} {
		// Not a subtest: those run on other goroutines, outside this
		// thread's namespace.
		name := fmt.Sprintf("%s, %d-byte payload", c.dst, c.payload)
		before, dropped := stats("mtgv1").RxBytes, stats("mtgv0").TxDropped
		pkt := hostGSOPacket(t, c.src, c.dst, c.payload)
		size := uint64(pkt.Size())
		err := v.write(pkt)
		pkt.DecRef()
		if err != nil {
			t.Fatalf("%s: TUN write: %v", name, err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for stats("mtgv1").RxBytes-before < size && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if d := stats("mtgv0").TxDropped - dropped; d != 0 {
			t.Errorf("%s: the veth dropped %d packets of the %d-byte segment", name, d, size)
		}
		if got := stats("mtgv1").RxBytes - before; got < size {
			t.Errorf("%s: %d bytes reached the far end of the veth, want at least the %d-byte segment", name, got, size)
		}
	}
}
