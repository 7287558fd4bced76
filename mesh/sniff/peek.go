package sniff

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"time"
)

// ErrTimeout means the listener filters' timeout passed before the
// inspectors could decide (a server-first protocol, a slow client).
var ErrTimeout = errors.New("sniff: listener filters timeout")

// PeekConn is a net.Conn whose first bytes were read ahead for the
// inspectors; Read returns them before the rest of the stream.
type PeekConn struct {
	net.Conn
	buf []byte // bytes read ahead and not yet consumed
}

// NewPeekConn wraps c. initial sizes the read-ahead buffer (default 4 KiB;
// it grows up to MaxClientHelloSize as needed).
func NewPeekConn(c net.Conn, initial int) *PeekConn {
	if initial <= 0 {
		initial = 4 << 10
	}
	return &PeekConn{Conn: c, buf: make([]byte, 0, initial)}
}

// Peeked returns the bytes read ahead so far.
func (p *PeekConn) Peeked() []byte { return p.buf }

// Read implements net.Conn: peeked bytes first.
func (p *PeekConn) Read(b []byte) (int, error) {
	if len(p.buf) > 0 {
		n := copy(b, p.buf)
		p.buf = p.buf[n:]
		if len(p.buf) == 0 {
			p.buf = nil // release the read-ahead buffer
		}
		return n, nil
	}
	return p.Conn.Read(b)
}

// CloseWrite forwards to the wrapped connection (FIN).
func (p *PeekConn) CloseWrite() error {
	if cw, ok := p.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return p.Conn.Close()
}

// CloseRead forwards to the wrapped connection.
func (p *PeekConn) CloseRead() error {
	if cr, ok := p.Conn.(interface{ CloseRead() error }); ok {
		return cr.CloseRead()
	}
	return nil
}

// Reset aborts the wrapped connection with a RST if it can.
func (p *PeekConn) Reset() {
	switch c := p.Conn.(type) {
	case interface{ Reset() }:
		c.Reset()
	case *net.TCPConn:
		c.SetLinger(0)
		c.Close()
	default:
		p.Conn.Close()
	}
}

// Unwrap returns the wrapped connection.
func (p *PeekConn) Unwrap() net.Conn { return p.Conn }

// readMore appends what the connection has to the read-ahead buffer.
func (p *PeekConn) readMore() error {
	if len(p.buf) == cap(p.buf) {
		if cap(p.buf) >= MaxClientHelloSize {
			return errors.New("sniff: read-ahead limit reached")
		}
		nb := make([]byte, len(p.buf), min(2*cap(p.buf), MaxClientHelloSize))
		copy(nb, p.buf)
		p.buf = nb
	}
	n, err := p.Conn.Read(p.buf[len(p.buf):cap(p.buf)])
	p.buf = p.buf[:len(p.buf)+n]
	return err
}

// Result is what the listener filters learned.
type Result struct {
	TransportProtocol    string // "tls" or "raw_buffer"
	ServerName           string
	ApplicationProtocols []string
}

// Inspect runs tls_inspector (when wantTLS) and http_inspector (when
// wantHTTP, and only if the connection is not TLS) on the connection's
// first bytes, reading until both have decided, the peer stops sending
// (EOF: what is known is returned) or the timeout passes (ErrTimeout,
// with what is known; 0 waits for ever).
func Inspect(ctx context.Context, p *PeekConn, wantTLS, wantHTTP bool, timeout time.Duration) (Result, error) {
	res := Result{TransportProtocol: "raw_buffer"}
	if !wantTLS && !wantHTTP {
		return res, nil
	}
	if timeout > 0 {
		p.Conn.SetReadDeadline(time.Now().Add(timeout))
		defer p.Conn.SetReadDeadline(time.Time{})
	}
	tlsDone, httpDone := !wantTLS, !wantHTTP
	for {
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		b := p.buf
		if !tlsDone {
			ch, err := ParseClientHello(b)
			switch {
			case err == nil:
				res.TransportProtocol, res.ServerName, res.ApplicationProtocols = "tls", ch.ServerName, ch.ALPN
				return res, nil // http_inspector does nothing on TLS
			case errors.Is(err, ErrNeedMore):
			default:
				tlsDone = true // not TLS, or a broken hello: raw_buffer
			}
		}
		if !httpDone {
			proto, err := DetectHTTP(b)
			switch {
			case err == nil:
				res.ApplicationProtocols = []string{proto}
				httpDone = true
			case errors.Is(err, ErrNeedMore):
			default:
				httpDone = true
			}
		}
		if tlsDone && httpDone {
			return res, nil
		}
		if err := p.readMore(); err != nil {
			var ne net.Error
			switch {
			case errors.As(err, &ne) && ne.Timeout(), errors.Is(err, os.ErrDeadlineExceeded):
				return res, ErrTimeout
			case errors.Is(err, io.EOF):
				return res, nil
			case len(p.buf) > 0 && err.Error() == "sniff: read-ahead limit reached":
				return res, nil
			default:
				return res, err
			}
		}
	}
}
