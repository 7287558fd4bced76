package upstream

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/netnstest"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func sockoptInt(t *testing.T, c *net.TCPConn, level, opt int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var serr error
	if err := rc.Control(func(fd uintptr) { v, serr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil {
		t.Fatal(err)
	}
	if errors.Is(serr, unix.ENOPROTOOPT) && os.Getenv("CI") != "true" {
		t.Skipf("kernel without socket option %d: %v", opt, serr)
	}
	if serr != nil {
		t.Fatalf("getsockopt %d: %v", opt, serr)
	}
	return v
}

// TestDialTCPPortOptions: an upstream TCP socket walks its own port range
// one port at a time (IP_LOCAL_PORT_RANGE), and one bound to a source
// address leaves its port to connect() (IP_BIND_ADDRESS_NO_PORT); both
// families (ports_linux.go).
func TestDialTCPPortOptions(t *testing.T) {
	for _, tc := range []struct{ listen, src string }{
		{"127.0.0.1:0", ""},
		{"127.0.0.1:0", "127.0.0.1"},
		{"[::1]:0", ""},
		{"[::1]:0", "::1"},
	} {
		t.Run(tc.listen+"_from_"+tc.src, func(t *testing.T) {
			ln, err := net.Listen("tcp", tc.listen)
			if err != nil {
				t.Skipf("no %s: %v", tc.listen, err)
			}
			defer ln.Close()
			var src netip.Addr
			if tc.src != "" {
				src = netip.MustParseAddr(tc.src)
			}
			d := &Dialer{ConnectTimeout: 5 * time.Second}
			c, err := d.DialTCP(context.Background(), netip.MustParseAddrPort(ln.Addr().String()), src)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if got := sockoptInt(t, c, unix.IPPROTO_IP, unix.IP_LOCAL_PORT_RANGE); got == 0 {
				t.Error("IP_LOCAL_PORT_RANGE not set: connect() walks the even ports first")
			}
			noPort := sockoptInt(t, c, unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT)
			if src.IsValid() && noPort != 1 {
				t.Errorf("IP_BIND_ADDRESS_NO_PORT = %d on a connection bound to %v, want 1", noPort, src)
			}
			if !src.IsValid() && noPort != 0 {
				t.Errorf("IP_BIND_ADDRESS_NO_PORT = %d on an unbound connection, want 0", noPort)
			}
		})
	}
}

// TestDialTCPBoundSourceSharesPorts: connections bound to one source
// address share its ephemeral ports across destinations, as the kernel
// allows for connect()-chosen ports. In a namespace whose ephemeral range
// is two ports, four connections from 127.0.0.6 to four listeners are
// open at once; bind() choosing the port would have failed the third
// with EADDRINUSE.
func TestDialTCPBoundSourceSharesPorts(t *testing.T) {
	netnstest.Enter(t)
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("40000 40001"), 0); err != nil {
		t.Fatal(err)
	}
	d := &Dialer{ConnectTimeout: 5 * time.Second}
	src := netip.MustParseAddr("127.0.0.6")
	ports := map[uint16]int{}
	for i := range 4 {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", 50000+i))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		c, err := d.DialTCP(context.Background(), netip.MustParseAddrPort(ln.Addr().String()), src)
		if err != nil {
			if errors.Is(err, syscall.EADDRINUSE) {
				t.Fatalf("connection %d from %v: %v: bind() reserved the source's ports", i+1, src, err)
			}
			t.Fatalf("connection %d from %v: %v", i+1, src, err)
		}
		defer c.Close()
		la := c.LocalAddr().(*net.TCPAddr).AddrPort()
		if la.Addr() != src {
			t.Fatalf("connection %d from %v, want %v", i+1, la, src)
		}
		ports[la.Port()]++
		t.Logf("connection %d: %v", i+1, la)
	}
	for p := range ports {
		if p < 40000 || p > 40001 {
			t.Errorf("source port %d outside the namespace's range 40000-40001", p)
		}
	}
}
