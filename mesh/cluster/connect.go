package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/meshtun/meshtun/internal/rawsock"
)

// ConnectError is a failed connect to a picked host.
type ConnectError struct {
	Cluster string
	Host    *Host
	Timeout bool // connect_timeout expired (upstream_cx_connect_timeout)
	// TransportFailure is set when the socket connected and its transport
	// (TLS) handshake failed: Envoy's upstream_transport_failure_reason.
	TransportFailure string
	Err              error
}

func (e *ConnectError) Error() string {
	what := "connect"
	switch {
	case e.TransportFailure != "" && e.Timeout:
		what = "TLS handshake timeout"
	case e.TransportFailure != "":
		what = "TLS handshake"
	case e.Timeout:
		what = "connect timeout"
	}
	return fmt.Sprintf("cluster %q: %s to %s: %v", e.Cluster, what, e.Host, e.Err)
}

func (e *ConnectError) Unwrap() error { return e.Err }

// failureReason is what a failed handshake reports as
// upstream_transport_failure_reason: the text of the transport's error
// (the proxy's TLS transport makes that tlsctx.HandshakeError's Reason),
// never empty.
func failureReason(err error) string {
	if r := err.Error(); r != "" {
		return r
	}
	return "transport handshake failed"
}

// pick chooses the host for a new connection, or nil.
func (c *Cluster) pick(origDst netip.AddrPort, exclude func(*Host) bool) *Host {
	if c.origDst != nil {
		return c.origDst.get(origDst)
	}
	return c.hosts.Load().pick(exclude)
}

// Connect picks a host and opens a TCP connection to it, the way Envoy's
// tcp_proxy asks its cluster for one:
//   - origDst is the downstream connection's original destination; only
//     ORIGINAL_DST clusters use it (as the host to dial).
//   - exclude, if not nil, rejects hosts already tried (tcp_proxy retries
//     on another host up to max_connect_attempts); if every host is
//     rejected, one is returned anyway.
//   - With no host to pick it fails at once with ErrNoHealthyUpstream
//     (upstream_cx_none_healthy); with the default-priority max_connections
//     reached, with ErrOverflow (upstream_cx_overflow).
//   - The dial is bounded by connect_timeout and ctx; a failure returns a
//     *ConnectError and counts upstream_cx_connect_fail (plus
//     upstream_cx_connect_timeout on timeout) and the host's cx_connect_fail.
//
// As in Envoy, upstream_cx_total = upstream_cx_active + upstream_cx_destroy:
// a failed connect counts as created and destroyed.
func (c *Cluster) Connect(ctx context.Context, origDst netip.AddrPort, exclude func(*Host) bool) (*UpstreamConn, error) {
	h := c.pick(origDst, exclude)
	if h == nil {
		c.stats.cxNoneHealthy.Add(1)
		return nil, &c.errNoHealthy
	}
	return c.ConnectHost(ctx, h)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// released undoes the accounting of one connection.
func (c *Cluster) released(h *Host, res *Resources) {
	c.stats.cxActive.Add(-1)
	c.stats.cxDestroy.Add(1)
	h.cxActive.Add(-1)
	res.releaseCx()
}

// UpstreamConn is a connection to a cluster host. Read and Write count the
// cluster's upstream_cx_rx_bytes_total / upstream_cx_tx_bytes_total (one
// atomic add per call); the first Close or Reset releases the connection's
// stats and circuit-breaker slot. It deliberately does not implement
// io.ReaderFrom/io.WriterTo, so io.Copy goes through the counting Read and
// Write. Over TLS the bytes counted are the plaintext ones, as Envoy counts
// what its transport socket hands the connection.
type UpstreamConn struct {
	conn   net.Conn      // what Read and Write use: raw, or TLS over it
	raw    net.Conn      // the socket
	rawTCP *net.TCPConn  // raw when it is TCP (Reset's SO_LINGER)
	tcp    *net.TCPConn  // raw when TCP and plaintext: TCPConn
	rio    *rawsock.Conn // tcp's raw reads and writes (nil: through conn)
	tls    *tls.ConnectionState
	// peerURISAN is the TLS peer certificate's first URI SAN, taken once
	// at the handshake for every access log line of the connection.
	peerURISAN string
	host       *Host
	c          *Cluster
	res        *Resources
	closed     atomic.Bool
}

var _ net.Conn = (*UpstreamConn)(nil)

// secured makes sc, the transport's connection over u.raw, the one u
// reads and writes.
func (u *UpstreamConn) secured(sc net.Conn) {
	u.conn, u.tcp, u.rio = sc, nil, nil
	if s, ok := sc.(interface{ ConnectionState() tls.ConnectionState }); ok {
		cs := s.ConnectionState()
		u.tls = &cs
		if len(cs.PeerCertificates) > 0 {
			if uris := cs.PeerCertificates[0].URIs; len(uris) > 0 {
				u.peerURISAN = uris[0].String()
			}
		}
	}
}

// Host is the host the connection goes to.
func (u *UpstreamConn) Host() *Host { return u.host }

// Cluster is the cluster the connection belongs to.
func (u *UpstreamConn) Cluster() *Cluster { return u.c }

// TCPConn is the underlying socket of a plaintext TCP connection; nil for
// a pipe host's Unix socket and for a TLS connection, whose bytes must not
// bypass TLS (no splice, no peek at the socket). Bytes moved through it
// directly are counted only when reported with Moved.
func (u *UpstreamConn) TCPConn() *net.TCPConn { return u.tcp }

// Moved adds bytes received from and sent to the upstream through TCPConn
// directly (tcp_proxy's zero-copy paths) to the cluster's byte counters,
// which Read and Write keep otherwise.
func (u *UpstreamConn) Moved(received, sent int) {
	if received > 0 {
		u.c.stats.rxBytes.Add(uint64(received))
	}
	if sent > 0 {
		u.c.stats.txBytes.Add(uint64(sent))
	}
}

// TLS is the connection's TLS state as of its handshake, nil when it is
// plaintext (raw_buffer).
func (u *UpstreamConn) TLS() *tls.ConnectionState { return u.tls }

// PeerURISAN is the first URI SAN of the upstream's certificate (Istio's
// upstream_peer_uri_san: its SPIFFE ID), "" when plaintext or none.
func (u *UpstreamConn) PeerURISAN() string { return u.peerURISAN }

// halfCloser is what TCP and Unix stream sockets share.
type halfCloser interface {
	CloseWrite() error
	CloseRead() error
}

func (u *UpstreamConn) Read(p []byte) (int, error) {
	var n int
	var err error
	if u.rio != nil {
		n, err = u.rio.Read(p)
	} else {
		n, err = u.conn.Read(p)
	}
	if n > 0 {
		u.c.stats.rxBytes.Add(uint64(n))
	}
	return n, err
}

func (u *UpstreamConn) Write(p []byte) (int, error) {
	var n int
	var err error
	if u.rio != nil {
		n, err = u.rio.Write(p)
	} else {
		n, err = u.conn.Write(p)
	}
	if n > 0 {
		u.c.stats.txBytes.Add(uint64(n))
	}
	return n, err
}

// Close closes the connection (over TLS after a close_notify); the first
// call also releases the connection (upstream_cx_active, host cx_active,
// circuit breaker) and counts upstream_cx_destroy.
func (u *UpstreamConn) Close() error {
	err := u.conn.Close()
	u.release()
	return err
}

func (u *UpstreamConn) release() {
	if u.closed.CompareAndSwap(false, true) {
		u.c.released(u.host, u.res)
	}
}

// CloseWrite half-closes: over TLS a close_notify alert first (the
// peer's TLS sees a clean end of stream), then the socket's FIN.
func (u *UpstreamConn) CloseWrite() error {
	if u.conn != u.raw {
		if cw, ok := u.conn.(interface{ CloseWrite() error }); ok {
			if err := cw.CloseWrite(); err != nil {
				return err
			}
		}
	}
	return u.raw.(halfCloser).CloseWrite()
}

// CloseRead shuts down the reading side of the socket.
func (u *UpstreamConn) CloseRead() error { return u.raw.(halfCloser).CloseRead() }

// Reset aborts the connection with a RST (SO_LINGER 0, then the socket's
// Close: over TLS no close_notify goes first); a Unix socket has no RST
// and is just closed.
func (u *UpstreamConn) Reset() {
	if u.rawTCP != nil {
		_ = u.rawTCP.SetLinger(0)
	}
	_ = u.raw.Close()
	if u.conn != u.raw {
		_ = u.conn.Close() // releases the TLS state; its alert fails on the closed socket
	}
	u.release()
}

func (u *UpstreamConn) LocalAddr() net.Addr                { return u.conn.LocalAddr() }
func (u *UpstreamConn) RemoteAddr() net.Addr               { return u.conn.RemoteAddr() }
func (u *UpstreamConn) SetDeadline(t time.Time) error      { return u.conn.SetDeadline(t) }
func (u *UpstreamConn) SetReadDeadline(t time.Time) error  { return u.conn.SetReadDeadline(t) }
func (u *UpstreamConn) SetWriteDeadline(t time.Time) error { return u.conn.SetWriteDeadline(t) }

// PickHost chooses a host the way Connect does, without connecting: for
// datagram proxies (udp_proxy), which open their own sockets to it. With
// no host to pick it counts upstream_cx_none_healthy and returns
// ErrNoHealthyUpstream.
func (c *Cluster) PickHost(origDst netip.AddrPort) (*Host, error) {
	h := c.pick(origDst, nil)
	if h == nil {
		c.stats.cxNoneHealthy.Add(1)
		return nil, &c.errNoHealthy
	}
	return h, nil
}
