package tcpproxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Copy buffers come in size classes. A direction starts with the smallest
// and moves up a class each time a read fills its buffer (a bulk transfer:
// fewer, larger reads and writes — 512 KiB measured +10% single-stream
// over 128 KiB), and back down after a run of small reads, so an idle or
// interactive flow holds 16 KiB per direction instead of 512 KiB.
var bufClasses = [...]int{16 << 10, 128 << 10, 512 << 10}

var bufPools [len(bufClasses)]sync.Pool

func getBuf(class int) *[]byte {
	if b, ok := bufPools[class].Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, bufClasses[class])
	return &b
}

func putBuf(class int, b *[]byte) { bufPools[class].Put(b) }

// shrinkAfter is how many consecutive reads using under a quarter of the
// buffer move a direction down a class.
const shrinkAfter = 16

// Result describes how a spliced connection ended.
type Result struct {
	Received int64 // bytes from downstream to upstream (Envoy's bytes_received)
	Sent     int64 // bytes from upstream to downstream (Envoy's bytes_sent)

	DownstreamReset bool // the downstream peer reset the connection
	UpstreamReset   bool // the upstream peer reset the connection
	IdleTimeout     bool // closed by the idle timeout
}

// ResponseFlags renders the result as Envoy's %RESPONSE_FLAGS% ("-" when
// nothing is worth flagging).
func (r Result) ResponseFlags() string {
	switch {
	case r.UpstreamReset:
		return "UR"
	case r.DownstreamReset:
		return "DR"
	case r.IdleTimeout:
		return "IT"
	}
	return "-"
}

type direction struct {
	n        int64
	eof      bool // source sent FIN and it was forwarded
	srcReset bool // reading the source failed with a reset
	dstReset bool // writing the destination failed: the peer is gone
	err      error
}

type directionResult struct {
	toUp bool // downstream → upstream
	d    direction
}

// Splice copies between down and up until both directions are finished,
// then closes both. idle <= 0 disables the idle timeout.
func Splice(down, up net.Conn, idle time.Duration) Result {
	var activity atomic.Uint64
	var idleFired atomic.Bool
	var closeOnce sync.Once
	closeBoth := func() {
		closeOnce.Do(func() {
			down.Close()
			up.Close()
		})
	}

	if idle > 0 {
		stop := watchIdle(idle, &activity, func() {
			idleFired.Store(true)
			closeBoth()
		})
		defer stop()
	}

	results := make(chan directionResult, 2)
	go func() { results <- directionResult{true, pipe(up, down, &activity)} }()
	go func() { results <- directionResult{false, pipe(down, up, &activity)} }()

	var res Result
	for i := 0; i < 2; i++ {
		r := <-results
		if r.toUp {
			res.Received = r.d.n
		} else {
			res.Sent = r.d.n
		}
		if r.d.eof {
			continue // the other direction may still be flowing
		}
		// Any failure ends both directions. A reset read from one side is
		// passed on as a reset to the other; a failed write means the
		// destination peer is gone, so the source is reset too.
		switch {
		case r.d.srcReset && r.toUp:
			res.DownstreamReset = true
			resetConn(up)
		case r.d.srcReset:
			res.UpstreamReset = true
			resetConn(down)
		case r.d.dstReset && r.toUp:
			res.UpstreamReset = true
			resetConn(down)
		case r.d.dstReset:
			res.DownstreamReset = true
			resetConn(up)
		}
		closeBoth()
	}
	closeBoth()
	res.IdleTimeout = idleFired.Load()
	return res
}

// socketSplicer is a flow that moves its received bytes straight into a
// kernel socket without a buffer of ours in between (netstack flows: one
// copy per byte instead of two).
type socketSplicer interface {
	SpliceTo(dst syscall.RawConn, onData func(n int)) (n int64, srcErr, dstErr error)
}

// plainUpstream is a cluster's upstream connection (cluster.UpstreamConn):
// its plaintext socket (nil over TLS), and the cluster's byte counters for
// bytes moved through that socket directly.
type plainUpstream interface {
	TCPConn() *net.TCPConn
	Moved(received, sent int)
}

// kernelSocket is c's kernel TCP socket when bytes may bypass c's own
// Write, and what to call with the bytes sent through it (nil: none).
func kernelSocket(c net.Conn) (syscall.RawConn, func(int), bool) {
	var tc *net.TCPConn
	var count func(int)
	switch v := c.(type) {
	case *net.TCPConn:
		tc = v
	case plainUpstream:
		if tc = v.TCPConn(); tc != nil {
			count = func(n int) { v.Moved(0, n) }
		}
	}
	if tc == nil {
		return nil, nil, false
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil, nil, false
	}
	return rc, count, true
}

// pipe copies src to dst until EOF or an error.
func pipe(dst, src net.Conn, activity *atomic.Uint64) direction {
	if s, ok := src.(socketSplicer); ok {
		if rc, count, ok := kernelSocket(dst); ok {
			return pipeSplice(dst, rc, activity, count, s.SpliceTo)
		}
	}
	class := 0
	bp := getBuf(class)
	defer func() { putBuf(class, bp) }()
	small := 0
	var d direction
	for {
		buf := *bp
		n, rerr := src.Read(buf)
		if n > 0 {
			activity.Add(1)
			wn, werr := dst.Write(buf[:n])
			d.n += int64(wn)
			if werr != nil {
				d.err = werr
				d.dstReset = isReset(werr)
				return d
			}
		}
		if rerr != nil {
			if rerr == io.EOF {
				d.eof = true
				closeWrite(dst)
				return d
			}
			d.err = rerr
			d.srcReset = isReset(rerr)
			return d
		}
		// Resize between reads, when the buffer holds nothing.
		next := class
		switch {
		case n == len(buf) && class < len(bufClasses)-1:
			next, small = class+1, 0
		case n < len(buf)/4 && class > 0:
			if small++; small >= shrinkAfter {
				next, small = class-1, 0
			}
		default:
			small = 0
		}
		if next != class {
			putBuf(class, bp)
			class, bp = next, getBuf(next)
		}
	}
}

// pipeSplice is pipe for a netstack flow that writes its bytes into the
// kernel socket rc itself (SpliceTo). The other direction stays a copy:
// reading the socket straight into the stack (SpliceFrom, tried) costs
// three more syscalls per small message than it saves.
func pipeSplice(dst net.Conn, rc syscall.RawConn, activity *atomic.Uint64, count func(int),
	splice func(syscall.RawConn, func(int)) (int64, error, error)) direction {
	var d direction
	n, srcErr, dstErr := splice(rc, func(n int) {
		activity.Add(1)
		if count != nil {
			count(n)
		}
	})
	d.n = n
	switch {
	case dstErr != nil:
		d.err = dstErr
		d.dstReset = isReset(dstErr)
	case srcErr != nil:
		d.err = srcErr
		d.srcReset = isReset(srcErr)
	default:
		d.eof = true
		closeWrite(dst)
	}
	return d
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED)
}

// closeWrite half-closes c: a FIN, or for a TLS connection close_notify
// and then the FIN of the connection under it, as Envoy's TLS socket
// shuts down both (crypto/tls's CloseWrite sends only the alert). A
// connection without half-close is closed.
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		if tc, ok := c.(interface{ NetConn() net.Conn }); ok {
			closeWrite(tc.NetConn())
		}
		return
	}
	_ = c.Close()
}

// resetConn aborts c with a RST: Reset() for netstack flows (and the
// proxy's wrappers), SO_LINGER 0 and close for kernel sockets, and for a
// TLS connection the connection it runs on (a TLS alert would be an
// orderly close, not the reset the peer must see).
func resetConn(c net.Conn) {
	switch v := c.(type) {
	case interface{ Reset() }:
		v.Reset()
	case *net.TCPConn:
		_ = v.SetLinger(0)
		_ = v.Close()
	case interface{ NetConn() net.Conn }:
		resetConn(v.NetConn())
	default:
		_ = c.Close()
	}
}

// watchIdle calls fire once no activity was recorded for a full idle
// period. Activity is a counter bumped per read, so the hot path pays one
// atomic add and no clock read; the check runs every idle/4.
func watchIdle(idle time.Duration, activity *atomic.Uint64, fire func()) (stop func()) {
	tick := idle / 4
	if tick <= 0 {
		tick = idle
	}
	t := time.NewTicker(tick)
	done := make(chan struct{})
	go func() {
		defer t.Stop()
		last := activity.Load()
		quiet := time.Duration(0)
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			if cur := activity.Load(); cur != last {
				last, quiet = cur, 0
				continue
			}
			quiet += tick
			if quiet >= idle {
				fire()
				return
			}
		}
	}()
	return func() { close(done) }
}
