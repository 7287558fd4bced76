package netstack

import (
	"bytes"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/waiter"
)

// endpointConn is a net.Conn over a connected gVisor endpoint (TCP or UDP).
//
// Unlike gVisor's gonet adapter it registers its waiter entries once per
// connection instead of once per blocking call, so a steady-state Read or
// Write allocates nothing, and it maps stack errors to the syscall errors a
// proxy branches on (ECONNRESET, EPIPE, …) instead of opaque strings.
type endpointConn struct {
	ep      tcpip.Endpoint
	wq      *waiter.Queue
	network string // "tcp" or "udp"
	local   net.Addr
	remote  net.Addr

	readMu sync.Mutex
	rEntry waiter.Entry
	rCh    chan struct{}
	sw     tcpip.SliceWriter // reused Read target; guarded by readMu

	writeMu sync.Mutex
	wEntry  waiter.Entry
	wCh     chan struct{}
	br      bytes.Reader // reused Write source; guarded by writeMu

	readDL, writeDL deadline

	closeOnce sync.Once
}

func newEndpointConn(ep tcpip.Endpoint, wq *waiter.Queue, network string, id FlowID) *endpointConn {
	c := &endpointConn{ep: ep, wq: wq, network: network}
	if network == "udp" {
		c.local = net.UDPAddrFromAddrPort(id.Dst)
		c.remote = net.UDPAddrFromAddrPort(id.Src)
	} else {
		c.local = net.TCPAddrFromAddrPort(id.Dst)
		c.remote = net.TCPAddrFromAddrPort(id.Src)
	}
	c.rEntry, c.rCh = waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	c.wEntry, c.wCh = waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&c.rEntry)
	wq.EventRegister(&c.wEntry)
	c.readDL.init()
	c.writeDL.init()
	return c
}

// Read implements net.Conn. For UDP each call returns one datagram.
func (c *endpointConn) Read(b []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for {
		c.sw = tcpip.SliceWriter(b)
		res, err := c.ep.Read(&c.sw, tcpip.ReadOptions{})
		c.sw = nil
		if err == nil {
			return res.Count, nil
		}
		if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
			if _, ok := err.(*tcpip.ErrClosedForReceive); ok {
				return 0, io.EOF
			}
			return 0, c.opError("read", err)
		}
		select {
		case <-c.rCh:
		case <-c.readDL.wait():
			return 0, c.opErr("read", os.ErrDeadlineExceeded)
		}
	}
}

// Write implements net.Conn. For TCP it blocks until all of b is queued in
// the send buffer (or the deadline passes); for UDP b is one datagram.
func (c *endpointConn) Write(b []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	written := 0
	for written < len(b) {
		c.br.Reset(b[written:])
		n, err := c.ep.Write(&c.br, tcpip.WriteOptions{})
		written += int(n)
		if err == nil {
			if c.network == "udp" {
				break
			}
			continue
		}
		if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
			c.br.Reset(nil)
			return written, c.opError("write", err)
		}
		select {
		case <-c.wCh:
		case <-c.writeDL.wait():
			c.br.Reset(nil)
			return written, c.opErr("write", os.ErrDeadlineExceeded)
		}
	}
	c.br.Reset(nil)
	return written, nil
}

// CloseWrite sends FIN after the queued data.
func (c *endpointConn) CloseWrite() error {
	if err := c.ep.Shutdown(tcpip.ShutdownWrite); err != nil {
		return c.opError("close", err)
	}
	return nil
}

// CloseRead stops reception.
func (c *endpointConn) CloseRead() error {
	if err := c.ep.Shutdown(tcpip.ShutdownRead); err != nil {
		return c.opError("close", err)
	}
	return nil
}

// Reset aborts the connection with a RST and releases it.
func (c *endpointConn) Reset() {
	c.ep.Abort()
	c.Close()
}

// Close implements net.Conn: graceful close (FIN) for TCP.
func (c *endpointConn) Close() error {
	c.closeOnce.Do(func() {
		c.wq.EventUnregister(&c.rEntry)
		c.wq.EventUnregister(&c.wEntry)
		c.ep.Close()
		c.readDL.stop()
		c.writeDL.stop()
		// Wake blocked readers and writers; they see the closed endpoint.
		notify(c.rCh)
		notify(c.wCh)
	})
	return nil
}

// LocalAddr is the flow's original destination.
func (c *endpointConn) LocalAddr() net.Addr { return c.local }

// RemoteAddr is the flow's original source.
func (c *endpointConn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline implements net.Conn.
func (c *endpointConn) SetDeadline(t time.Time) error {
	c.readDL.set(t)
	c.writeDL.set(t)
	return nil
}

// SetReadDeadline implements net.Conn.
func (c *endpointConn) SetReadDeadline(t time.Time) error { c.readDL.set(t); return nil }

// SetWriteDeadline implements net.Conn.
func (c *endpointConn) SetWriteDeadline(t time.Time) error { c.writeDL.set(t); return nil }

func (c *endpointConn) opError(op string, err tcpip.Error) error {
	return c.opErr(op, translateError(err))
}

func (c *endpointConn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: c.network, Source: c.local, Addr: c.remote, Err: err}
}

// translateError maps gVisor's errors to the errno a kernel socket returns
// in the same situation, so callers use errors.Is(err, syscall.ECONNRESET).
func translateError(err tcpip.Error) error {
	switch err.(type) {
	case *tcpip.ErrConnectionReset:
		return syscall.ECONNRESET
	case *tcpip.ErrConnectionAborted, *tcpip.ErrAborted:
		return syscall.ECONNABORTED
	case *tcpip.ErrClosedForSend:
		return syscall.EPIPE
	case *tcpip.ErrClosedForReceive:
		return io.EOF
	case *tcpip.ErrConnectionRefused:
		return syscall.ECONNREFUSED
	case *tcpip.ErrTimeout:
		return syscall.ETIMEDOUT
	case *tcpip.ErrNotConnected:
		return syscall.ENOTCONN
	case *tcpip.ErrInvalidEndpointState:
		return net.ErrClosed
	case *tcpip.ErrNetworkUnreachable:
		return syscall.ENETUNREACH
	case *tcpip.ErrHostUnreachable:
		return syscall.EHOSTUNREACH
	case *tcpip.ErrMessageTooLong:
		return syscall.EMSGSIZE
	}
	return &stackError{err}
}

type stackError struct{ err tcpip.Error }

func (e *stackError) Error() string { return e.err.String() }

func notify(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// deadline is a resettable cancellation channel for one direction of a conn.
//
// One timer serves every deadline the conn is given, re-armed with Reset:
// an HTTP/1.1 keep-alive connection sets and clears its idle deadline on
// every request, and a new time.AfterFunc each time cost a timer and a
// closure per request. A callback of an earlier arming may still run after
// Stop or Reset (it was already waiting for mu); it closes nothing unless
// the deadline armed now has passed, and re-arms for the rest otherwise.
type deadline struct {
	mu     sync.Mutex
	timer  *time.Timer   // nil until the first deadline in the future
	when   time.Time     // the armed deadline; zero when none is armed
	cancel chan struct{} // closed when the deadline passes
}

func (d *deadline) init() { d.cancel = make(chan struct{}) }

// wait returns the channel that is closed when the deadline passes.
func (d *deadline) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cancel
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.when = time.Time{}
	if d.timer != nil {
		d.timer.Stop()
	}
	select {
	case <-d.cancel:
		// The last deadline passed: a fresh channel for the new one.
		d.cancel = make(chan struct{})
	default:
	}
	if t.IsZero() {
		return
	}
	dur := time.Until(t)
	if dur <= 0 {
		close(d.cancel)
		return
	}
	d.when = t
	if d.timer == nil {
		d.timer = time.AfterFunc(dur, d.fire)
	} else {
		d.timer.Reset(dur)
	}
}

// fire closes cancel once the armed deadline has passed.
func (d *deadline) fire() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.when.IsZero() {
		return // cleared or stopped since this callback was due
	}
	if dur := time.Until(d.when); dur > 0 {
		// A callback of an earlier, sooner deadline: the armed one
		// is still ahead (Reset already set the timer for it; arming
		// again only covers a clock that moved).
		d.timer.Reset(dur)
		return
	}
	d.when = time.Time{}
	close(d.cancel)
}

func (d *deadline) stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.when = time.Time{}
	if d.timer != nil {
		d.timer.Stop()
	}
}
