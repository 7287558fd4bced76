package mesh

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"time"

	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/tlsctx"
)

// DefaultHandshakeTimeout bounds a downstream TLS handshake when the
// filter chain sets no transport_socket_connect_timeout: a client that
// opens a connection and never finishes its handshake must not hold it
// (and a goroutine) for ever. Envoy has no default (the listener's
// connection timeouts apply); 10 s is well above any real handshake.
const DefaultHandshakeTimeout = 10 * time.Second

// Downstream is a connection whose filter chain terminated TLS, as the
// chain's network filters get it: reads and writes go through TLS, and it
// carries who the client is (TLS and Peer), which is where an RBAC
// network filter finds the principal. It is not a *tls.Conn on purpose:
// net/http, given one, would run its own TLS path on a connection that is
// already terminated.
type Downstream struct {
	net.Conn // the *tls.Conn
	// TLS is the handshake's outcome: version, cipher, ALPN, the peer's
	// verified chain.
	TLS tls.ConnectionState
	// Peer is the client's verified identity, nil when it sent no
	// certificate (require_client_certificate false).
	Peer *tlsctx.Peer

	raw net.Conn // what TLS runs on: the accepted (peeked) connection
}

// CloseWrite half-closes as Envoy's TLS socket does: close_notify, then
// the FIN of the connection under it.
func (d *Downstream) CloseWrite() error {
	err := d.Conn.(*tls.Conn).CloseWrite()
	if cw, ok := d.raw.(interface{ CloseWrite() error }); ok {
		return errors.Join(err, cw.CloseWrite())
	}
	return err
}

// Reset aborts the connection under TLS with a RST (netstack flows and
// the peek wrapper have their own Reset).
func (d *Downstream) Reset() {
	if r, ok := d.raw.(interface{ Reset() }); ok {
		r.Reset()
		return
	}
	resetConn(d.raw)
}

// PeerOf is the verified TLS identity of the client on conn, as the
// network filters get conn; nil on plaintext or when the client sent no
// certificate.
func PeerOf(conn net.Conn) *tlsctx.Peer {
	if d, ok := conn.(*Downstream); ok {
		return d.Peer
	}
	return nil
}

// terminate runs chain's TLS handshake on conn (the accepted connection,
// behind what the inspectors peeked), bounded by the chain's
// transport_socket_connect_timeout and by the listener's drain end. On
// failure conn is closed, the reason is in e, the listener's ssl.*
// counters have it, and nothing reaches the chain's filters.
func terminate(l *Listener, chain *Chain, conn net.Conn, e *accesslog.Entry) (*Downstream, bool) {
	ctx, cancel := context.WithTimeout(l.drain.closed(), chain.HandshakeTimeout)
	tc, err := chain.TLS.Handshake(ctx, conn)
	cancel()
	if err != nil {
		reason := err.Error()
		var he *tlsctx.HandshakeError
		if errors.As(err, &he) {
			reason = he.Reason
		}
		conn.Close()
		e.DownstreamTransportFailureReason = reason
		e.Details = "downstream TLS handshake failed"
		return nil, false
	}
	d := &Downstream{Conn: tc, TLS: tc.ConnectionState(), raw: conn}
	if p, ok := tlsctx.PeerOf(d.TLS); ok {
		d.Peer = &p
		if len(p.URISANs) > 0 {
			e.DownstreamPeerURISAN = p.URISANs[0]
		}
	}
	return d, true
}
