// Package upstream opens the proxy's own connections to upstream hosts.
//
// Every socket it creates carries the capture bypass mark (SO_MARK on
// Linux): the capture rules send marked traffic around the TUN, so the
// proxy's upstream flows are never captured again. That mark is the only
// thing that prevents a forwarding loop, which is why all upstream sockets
// must come from here.
package upstream

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// Dialer opens marked upstream sockets.
type Dialer struct {
	// Mark is the SO_MARK value; 0 leaves sockets unmarked (no capture).
	// Linux only: elsewhere it is ignored and Interface does the job.
	Mark uint32
	// Interface, when not 0, pins sockets to this interface index
	// (IP_BOUND_IF on darwin): laptop mode's way around its own routes
	// where there is no SO_MARK. Ignored on Linux.
	Interface int
	// ConnectTimeout bounds a TCP connect (Envoy's cluster connect_timeout;
	// Istio's mesh default is 10 s).
	ConnectTimeout time.Duration
	// Log gets a warning when dials fail for want of a file descriptor, at
	// most one per limitWarnEvery with the count of such failures: the
	// access log, which names the errno per flow, is often off (Istio's
	// default), and a proxy at its fd limit refuses every new flow. The
	// zero Logger logs nothing.
	Log zerolog.Logger

	limitWarned atomic.Int64 // unix nanoseconds of the last fd-limit warning
	limitFailed atomic.Int64 // fd-limit failures since that warning
}

// Control marks a socket before it connects; as a net.Dialer.Control it
// lets other clients (the xDS client) open marked sockets too.
func (d *Dialer) Control(network, address string, c syscall.RawConn) error {
	if d.Mark == 0 && d.Interface == 0 {
		return nil
	}
	var serr error
	if err := c.Control(func(fd uintptr) {
		if serr = setMark(int(fd), d.Mark); serr == nil && d.Interface != 0 {
			serr = bindInterface(int(fd), network, d.Interface)
		}
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("upstream: socket mark %#x / interface %d: %w", d.Mark, d.Interface, serr)
	}
	return nil
}

// controlTCP is Control for an upstream TCP socket, which also gets the
// port options of tuneTCP (ports_linux.go); controlTCPBound for one bound
// to a source address.
func (d *Dialer) controlTCP(network, address string, c syscall.RawConn) error {
	return d.controlPorts(network, address, c, false)
}

func (d *Dialer) controlTCPBound(network, address string, c syscall.RawConn) error {
	return d.controlPorts(network, address, c, true)
}

func (d *Dialer) controlPorts(network, address string, c syscall.RawConn, bound bool) error {
	if err := d.Control(network, address, c); err != nil {
		return err
	}
	return c.Control(func(fd uintptr) { tuneTCP(int(fd), bound) })
}

// DialTCP connects to dst, optionally from the source address src (Envoy's
// upstream_bind_config; the zero value lets the kernel choose).
func (d *Dialer) DialTCP(ctx context.Context, dst netip.AddrPort, src netip.Addr) (*net.TCPConn, error) {
	nd := net.Dialer{Timeout: d.ConnectTimeout, Control: d.controlTCP, KeepAlive: -1}
	if src.IsValid() {
		nd.Control = d.controlTCPBound
		nd.LocalAddr = &net.TCPAddr{IP: src.AsSlice(), Zone: src.Zone()}
	}
	c, err := nd.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		return nil, d.limited(err)
	}
	// No SetNoDelay: the net package sets TCP_NODELAY on every TCP
	// connection it makes, and a second setsockopt per dial is a syscall
	// the connection rate pays for nothing.
	return c.(*net.TCPConn), nil
}

// DialUnix connects to the Unix socket at path (an Envoy pipe address,
// such as the agent's SDS socket in Istio's bootstrap). Unix sockets never
// leave the host, so neither the mark nor the interface applies.
func (d *Dialer) DialUnix(ctx context.Context, path string) (*net.UnixConn, error) {
	nd := net.Dialer{Timeout: d.ConnectTimeout}
	c, err := nd.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	return c.(*net.UnixConn), nil
}

// DialUDP returns a connected UDP socket to dst.
func (d *Dialer) DialUDP(ctx context.Context, dst netip.AddrPort) (*net.UDPConn, error) {
	nd := net.Dialer{Control: d.Control}
	c, err := nd.DialContext(ctx, "udp", dst.String())
	if err != nil {
		return nil, d.limited(err)
	}
	return c.(*net.UDPConn), nil
}
