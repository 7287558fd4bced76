package upstream

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestDialTCPNoDelay: DialTCP leaves Nagle off (the net package's default,
// which the dialer relies on instead of a setsockopt of its own per dial).
func TestDialTCPNoDelay(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	d := &Dialer{ConnectTimeout: 5 * time.Second}
	c, err := d.DialTCP(context.Background(), netip.MustParseAddrPort(ln.Addr().String()), netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if s, ok := <-accepted; ok {
		s.Close()
	}
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var serr error
	if err := rc.Control(func(fd uintptr) { v, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NODELAY) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	if v == 0 {
		t.Fatal("TCP_NODELAY is off on a dialed upstream connection")
	}
	if got := c.RemoteAddr().(*net.TCPAddr).AddrPort(); got.String() != ln.Addr().String() {
		t.Fatalf("connected to %v, want %v", got, ln.Addr())
	}
}
