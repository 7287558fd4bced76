package tun

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestOpen(t *testing.T) {
	newNetns(t)
	addrs := []netip.Prefix{netip.MustParsePrefix("10.201.0.1/32"), netip.MustParsePrefix("fd00:201::1/64")}
	dev, err := Open(DeviceConfig{Name: "mt-test", MTU: 9000, Addrs: addrs})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	link, err := netlink.LinkByName("mt-test")
	if err != nil {
		t.Fatal(err)
	}
	la := link.Attrs()
	if dev.Name() != "mt-test" || dev.MTU() != 9000 || la.MTU != 9000 || dev.Index() != la.Index {
		t.Errorf("device %q MTU %d index %d; link MTU %d index %d", dev.Name(), dev.MTU(), dev.Index(), la.MTU, la.Index)
	}
	if link.Type() != "tuntap" || la.Flags&unix.IFF_UP == 0 {
		t.Errorf("link type %s flags %v, want an up tuntap", link.Type(), la.Flags)
	}
	if mtu, err := dev.Dev().MTU(); err != nil || mtu != 9000 {
		t.Errorf("wireguard device MTU %d, %v", mtu, err)
	}
	off := dev.Offloads()
	if !off.VNetHdr || !off.TSO || !off.GRO || off.BatchSize < 2 {
		t.Errorf("offloads %+v, want the virtio-net header with TSO and GRO", off)
	}

	got, err := netlink.AddrList(link, unix.AF_UNSPEC)
	if err != nil {
		t.Fatal(err)
	}
	var have []string
	for _, a := range got {
		p, _ := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		have = append(have, netip.PrefixFrom(p.Unmap(), ones).String())
		if a.Flags&unix.IFA_F_TENTATIVE != 0 {
			t.Errorf("address %v is tentative: DAD not disabled", a.IPNet)
		}
		if p.IsLinkLocalUnicast() {
			t.Errorf("the TUN has link-local address %v: it would solicit routers into the stack", a.IPNet)
		}
	}
	for _, p := range addrs {
		if !strings.Contains(strings.Join(have, " "), p.String()) {
			t.Errorf("address %v missing; the device has %v", p, have)
		}
	}

	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName("mt-test"); err == nil {
		t.Error("link still there after Close")
	}
}

// TestOpenReplacesStale: a TUN of the same name left by a crashed run is
// replaced; another kind of device of that name is an error.
func TestOpenReplacesStale(t *testing.T) {
	newNetns(t)
	persistentTun(t, "meshtun0")
	old, err := netlink.LinkByName("meshtun0")
	if err != nil {
		t.Fatal(err)
	}
	dev, err := Open(DeviceConfig{})
	if err != nil {
		t.Fatalf("open over a stale TUN: %v", err)
	}
	if dev.Index() == old.Attrs().Index || dev.MTU() != 65535 {
		t.Errorf("index %d (stale one %d), MTU %d; want a new device with MTU 65535", dev.Index(), old.Attrs().Index, dev.MTU())
	}
	dev.Close()

	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "meshtun0"}, PeerName: "mt-peer"}); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(DeviceConfig{}); err == nil || !strings.Contains(err.Error(), "meshtun0") {
		t.Errorf("open over a veth device: %v, want an error naming it", err)
	}
	if _, err := netlink.LinkByName("meshtun0"); err != nil {
		t.Errorf("the veth is gone: %v", err)
	}
}

// TestCapturedPacketsReachTheDevice sends real packets from local sockets
// and reads what arrives on the TUN: captured TCP and UDP do, the proxy's
// marked sockets and excluded ports do not.
func TestCapturedPacketsReachTheDevice(t *testing.T) {
	newNetns(t)
	podNet(t)
	dev := openTun(t)
	c, err := SetupCapture(captureConfig(t), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Teardown()

	// Each uncaptured packet is sent before a captured one; the first
	// TCP/UDP packet the device reads must be the captured one.
	for _, tc := range []struct {
		name          string
		skip, capture func() error
		wantProto     uint8
		wantDst       netip.AddrPort
	}{
		{"tcp, after a marked connect",
			func() error { return connectNB(netip.MustParseAddrPort("192.0.2.1:443"), 0x539) },
			func() error { return connectNB(netip.MustParseAddrPort("192.0.2.1:444"), 0) },
			unix.IPPROTO_TCP, netip.MustParseAddrPort("192.0.2.1:444")},
		{"udp, after an excluded port",
			func() error { return sendUDP(netip.MustParseAddrPort("192.0.2.1:3306")) },
			func() error { return sendUDP(netip.MustParseAddrPort("192.0.2.1:53")) },
			unix.IPPROTO_UDP, netip.MustParseAddrPort("192.0.2.1:53")},
		{"ipv6 tcp, after an excluded CIDR",
			func() error { return connectNB(netip.MustParseAddrPort("[fd99::1]:80"), 0) },
			func() error { return connectNB(netip.MustParseAddrPort("[2001:db8::1]:80"), 0) },
			unix.IPPROTO_TCP, netip.MustParseAddrPort("[2001:db8::1]:80")},
	} {
		if err := tc.skip(); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if err := tc.capture(); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		proto, src, dst := readFlowPacket(t, dev)
		if proto != tc.wantProto || dst != tc.wantDst {
			t.Errorf("%s: first packet on the TUN: proto %d %v -> %v, want proto %d to %v", tc.name, proto, src, dst, tc.wantProto, tc.wantDst)
		}
		if want := map[bool]netip.Addr{false: podV4, true: podV6}[dst.Addr().Is6()]; src.Addr() != want {
			t.Errorf("%s: source %v, want the pod IP %v", tc.name, src, want)
		}
	}
}

// connectNB starts a TCP connect from a fresh socket (left open until
// the test's namespace goes), SO_MARK set if mark is not 0.
func connectNB(dst netip.AddrPort, mark int) error {
	fam, sa := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Addr: dst.Addr().As16(), Port: int(dst.Port())})
	if dst.Addr().Is4() {
		fam, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}
	}
	fd, err := unix.Socket(fam, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if mark != 0 {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, mark); err != nil {
			unix.Close(fd)
			return err
		}
	}
	if err := unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		return err
	}
	return nil
}

func sendUDP(dst netip.AddrPort) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Sendto(fd, []byte("ping"), 0, &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())})
}

// readFlowPacket reads from the device until a TCP or UDP packet arrives
// and returns its protocol and addresses.
func readFlowPacket(t *testing.T, dev *Device) (uint8, netip.AddrPort, netip.AddrPort) {
	t.Helper()
	const offset = 16 // room for the virtio-net header
	// A read that never returns would hang the test: closing the device
	// ends it with an error.
	timer := time.AfterFunc(10*time.Second, func() { dev.Close() })
	defer timer.Stop()
	n := dev.Dev().BatchSize()
	bufs, sizes := make([][]byte, n), make([]int, n)
	for i := range bufs {
		bufs[i] = make([]byte, offset+65535)
	}
	for range 100 {
		cnt, err := dev.Dev().Read(bufs, sizes, offset)
		if err != nil {
			t.Fatalf("read from the TUN: %v", err)
		}
		for i := range cnt {
			p := bufs[i][offset : offset+sizes[i]]
			var proto uint8
			var src, dst netip.Addr
			var l4 []byte
			switch {
			case len(p) >= 20 && p[0]>>4 == 4:
				proto, l4 = p[9], p[int(p[0]&0xf)*4:]
				src, dst = netip.AddrFrom4([4]byte(p[12:16])), netip.AddrFrom4([4]byte(p[16:20]))
			case len(p) >= 40 && p[0]>>4 == 6:
				proto, l4 = p[6], p[40:]
				src, dst = netip.AddrFrom16([16]byte(p[8:24])), netip.AddrFrom16([16]byte(p[24:40]))
			default:
				continue
			}
			if (proto != unix.IPPROTO_TCP && proto != unix.IPPROTO_UDP) || len(l4) < 4 {
				continue
			}
			return proto, netip.AddrPortFrom(src, uint16(l4[0])<<8|uint16(l4[1])), netip.AddrPortFrom(dst, uint16(l4[2])<<8|uint16(l4[3]))
		}
	}
	t.Fatal("no TCP or UDP packet on the TUN in 100 reads")
	return 0, netip.AddrPort{}, netip.AddrPort{}
}

// persistentTun creates a TUN device that outlives its file descriptor,
// as one left by a crashed process with TUNSETPERSIST would.
func persistentTun(t *testing.T, name string) {
	t.Helper()
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		t.Fatal(err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		t.Fatalf("TUNSETIFF %s: %v", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		t.Fatalf("TUNSETPERSIST %s: %v", name, err)
	}
}
