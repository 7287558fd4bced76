package sniff

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// initialPeekBuf is the read-ahead buffer's first size: a typical
// ClientHello (post-quantum key shares included) or request line fits.
const initialPeekBuf = 4 << 10

// PeekConn is a net.Conn whose first bytes can be read ahead, for the
// listener filters, without being consumed: Read returns the bytes read
// ahead before the rest of the stream. It is not safe for concurrent use
// until the read-ahead is over; after that it is as safe as the wrapped
// connection.
type PeekConn struct {
	net.Conn
	buf  []byte // buf[r:] is read ahead and not yet returned by Read
	r    int
	max  int
	rerr error // what ended the read-ahead (EOF, reset), for Read to return
}

// NewPeekConn wraps c. maxPeek bounds the read-ahead (0 or less: the
// inspectors' 64 KiB). The buffer is allocated on the first Peek, starts
// at 4 KiB and doubles as needed up to maxPeek; it is released once Read
// has returned its bytes.
func NewPeekConn(c net.Conn, maxPeek int) *PeekConn {
	if maxPeek <= 0 {
		maxPeek = MaxClientHelloSize
	}
	return &PeekConn{Conn: c, max: maxPeek}
}

// Peeked returns the bytes read ahead and not yet consumed by Read. The
// slice is valid until the next Read or Peek.
func (p *PeekConn) Peeked() []byte { return p.buf[p.r:] }

// Peek reads ahead until decide, given all the bytes read ahead so far,
// returns something other than ErrNeedMore, and returns that. decide is
// called first with the bytes already read ahead (possibly none).
//
// Peek also ends when the read-ahead reaches its bound (ErrTooLarge), the
// deadline passes (ErrTimeout; a zero deadline never passes), ctx is done
// (ctx.Err()), the peer ends its stream before decide has decided (io.EOF)
// or reading fails (that error). The bytes read ahead stay for Read in
// every case; an end-of-stream or read error is returned by Read after
// them. To honour the deadline and ctx, Peek sets the connection's read
// deadline, and clears it before returning.
func (p *PeekConn) Peek(ctx context.Context, deadline time.Time, decide func(peeked []byte) error) error {
	if err := decide(p.Peeked()); !errors.Is(err, ErrNeedMore) {
		return err
	}
	if p.rerr != nil {
		return p.rerr
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	disarm, err := p.armDeadline(ctx, deadline)
	if err != nil {
		return err
	}
	defer disarm()
	for {
		n, err := p.fill()
		if n > 0 {
			if derr := decide(p.Peeked()); !errors.Is(derr, ErrNeedMore) {
				return derr
			}
		}
		switch {
		case err == nil:
			continue
		case errors.Is(err, ErrTooLarge):
			return err
		case isTimeout(err):
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return ErrTimeout
		}
		p.rerr = err
		return err
	}
}

// armDeadline sets the read deadline and makes ctx's end interrupt a
// blocked Read; disarm clears both.
func (p *PeekConn) armDeadline(ctx context.Context, deadline time.Time) (disarm func(), err error) {
	if !deadline.IsZero() {
		if err := p.Conn.SetReadDeadline(deadline); err != nil {
			return nil, fmt.Errorf("sniff: set read deadline: %w", err)
		}
	}
	if ctx.Done() == nil {
		if deadline.IsZero() {
			return func() {}, nil
		}
		return func() { p.Conn.SetReadDeadline(time.Time{}) }, nil
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		p.Conn.SetReadDeadline(time.Unix(1, 0)) // in the past: Read returns now
		close(fired)
	})
	return func() {
		if !stop() {
			<-fired // do not let it set the deadline after it is cleared
		}
		p.Conn.SetReadDeadline(time.Time{})
	}, nil
}

// fill reads once from the connection into the read-ahead buffer.
func (p *PeekConn) fill() (int, error) {
	if p.r > 0 { // Read consumed some: move the rest to the front
		n := copy(p.buf, p.buf[p.r:])
		p.buf, p.r = p.buf[:n], 0
	}
	if len(p.buf) == cap(p.buf) {
		if len(p.buf) >= p.max {
			return 0, fmt.Errorf("%w: read ahead %d bytes", ErrTooLarge, len(p.buf))
		}
		nb := make([]byte, len(p.buf), min(max(2*cap(p.buf), initialPeekBuf), p.max))
		copy(nb, p.buf)
		p.buf = nb
	}
	n, err := p.Conn.Read(p.buf[len(p.buf):cap(p.buf)])
	p.buf = p.buf[:len(p.buf)+n]
	return n, err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}

// Read implements net.Conn: the bytes read ahead first, then the stream.
func (p *PeekConn) Read(b []byte) (int, error) {
	if p.r < len(p.buf) {
		n := copy(b, p.buf[p.r:])
		p.r += n
		if p.r == len(p.buf) {
			p.buf, p.r = nil, 0 // the read-ahead is over: free the buffer
		}
		return n, nil
	}
	if p.rerr != nil {
		return 0, p.rerr
	}
	return p.Conn.Read(b)
}

// WriteTo implements io.WriterTo so io.Copy from a PeekConn drains the
// read-ahead and then uses the wrapped connection's fast path, if any.
func (p *PeekConn) WriteTo(w io.Writer) (int64, error) {
	var total int64
	if p.r < len(p.buf) {
		n, err := w.Write(p.buf[p.r:])
		total += int64(n)
		p.r += n
		if err == nil && p.r < len(p.buf) {
			err = io.ErrShortWrite
		}
		if err != nil {
			return total, err
		}
		p.buf, p.r = nil, 0
	}
	if p.rerr != nil {
		if p.rerr == io.EOF {
			return total, nil
		}
		return total, p.rerr
	}
	n, err := io.Copy(w, p.Conn)
	return total + n, err
}

// CloseWrite half-closes the wrapped connection (sends FIN). A connection
// without half-close is closed, as tcp_proxy does with such a peer.
func (p *PeekConn) CloseWrite() error {
	if cw, ok := p.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return p.Conn.Close()
}

// CloseRead shuts the wrapped connection's reading side, when it has one.
func (p *PeekConn) CloseRead() error {
	if cr, ok := p.Conn.(interface{ CloseRead() error }); ok {
		return cr.CloseRead()
	}
	return nil
}

// Reset aborts the wrapped connection with a RST: its own Reset (netstack
// flows), SO_LINGER 0 for kernel TCP, a plain close otherwise.
func (p *PeekConn) Reset() {
	switch c := p.Conn.(type) {
	case interface{ Reset() }:
		c.Reset()
	case *net.TCPConn:
		_ = c.SetLinger(0)
		_ = c.Close()
	default:
		_ = p.Conn.Close()
	}
}

// Unwrap returns the wrapped connection.
func (p *PeekConn) Unwrap() net.Conn { return p.Conn }
