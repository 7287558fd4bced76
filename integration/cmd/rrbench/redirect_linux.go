package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"syscall"
	"unsafe"
)

// soOriginalDst is netfilter's SO_ORIGINAL_DST (linux/netfilter_ipv4.h):
// the destination a REDIRECTed connection had before NAT.
const soOriginalDst = 80

// redirect is the classic sidecar's data path, the reference meshtun's
// capture is measured against: iptables `nat OUTPUT REDIRECT` sends the
// pod's connections to this listener, which reads each one's original
// destination (SO_ORIGINAL_DST), dials it with a socket mark the NAT rule
// skips, and copies both ways with io.Copy — TCPConn.ReadFrom, so the
// kernel splices socket to socket. It does no more than that: the floor
// any iptables-based proxy starts from.
func redirect(args []string) error {
	fs := flag.NewFlagSet("redirect", flag.ExitOnError)
	listen := fs.String("listen", "0.0.0.0:15101", "address the REDIRECT rule sends connections to")
	mark := fs.Int("mark", 0x539, "SO_MARK of upstream sockets (the NAT rule must skip it)")
	fs.Parse(args)
	ln, err := net.Listen("tcp4", *listen)
	if err != nil {
		return err
	}
	d := &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, *mark)
		}); err != nil {
			return err
		}
		return serr
	}}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go relay(c.(*net.TCPConn), d)
	}
}

func relay(down *net.TCPConn, d *net.Dialer) {
	defer down.Close()
	dst, err := originalDst(down)
	if err != nil {
		fmt.Println("redirect:", err)
		return
	}
	uc, err := d.Dial("tcp4", dst.String())
	if err != nil {
		return
	}
	up := uc.(*net.TCPConn)
	defer up.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(up, down) // splice(2): both ends are TCP sockets
		up.CloseWrite()
		close(done)
	}()
	io.Copy(down, up)
	down.CloseWrite()
	<-done
}

// originalDst reads SO_ORIGINAL_DST: a struct sockaddr_in, fetched
// through the one getsockopt wrapper syscall has whose buffer is at
// least as large (IPv6Mreq, 20 bytes).
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var (
		m    *syscall.IPv6Mreq
		gerr error
	)
	if err := rc.Control(func(fd uintptr) {
		m, gerr = syscall.GetsockoptIPv6Mreq(int(fd), syscall.SOL_IP, soOriginalDst)
	}); err != nil {
		return netip.AddrPort{}, err
	}
	if gerr != nil {
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST: %w", gerr)
	}
	// sockaddr_in: family (2), port (2, network order), addr (4).
	b := (*[20]byte)(unsafe.Pointer(m))
	if b[0] != syscall.AF_INET {
		return netip.AddrPort{}, errors.New("SO_ORIGINAL_DST: not an IPv4 address")
	}
	port := uint16(b[2])<<8 | uint16(b[3])
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{b[4], b[5], b[6], b[7]}), port), nil
}
