package tcpproxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meshtun/meshtun/internal/rawsock"
)

// Copy buffers come in size classes. A direction starts with the smallest
// and moves up a class each time a read fills its buffer (a bulk transfer:
// fewer, larger reads and writes — 512 KiB measured +10% single-stream
// over 128 KiB), and back down after a run of small reads. A direction
// spends most of its life blocked in Read holding its buffer, so the
// smallest class is what every idle flow costs: 2 KiB (a request, a
// ClientHello fits) rather than 16 KiB per direction took 10,000 idle
// flows from 43 to 15 KiB of Go heap each (TestTenThousandFlows).
var bufClasses = [...]int{2 << 10, 16 << 10, 128 << 10, 512 << 10}

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

	// What the direction's end means for Result, set by splice.run.
	downReset, upReset bool
}

// Splice copies between down and up until both directions are finished,
// then closes both. idle <= 0 disables the idle timeout.
//
// A flow costs one goroutine besides the caller's: the downstream →
// upstream direction runs on the caller's goroutine (the netstack handler
// already has one per flow), the other on its own, and the idle timeout is
// a runtime timer that checks an activity counter every idle/4, not a
// goroutine with a ticker. At a connection rate of thousands per second
// the goroutines and tickers a flow starts and stops are a cost of their
// own (each start or stop is a scheduler hand-off on a 2-core pod).
func Splice(down, up net.Conn, idle time.Duration) Result {
	return SpliceOn(down, up, idle, nil)
}

// SpliceOn is Splice with the upstream → downstream direction run by
// spawn (nil: a goroutine of its own). A caller that already has a second
// goroutine for the flow, one that dialed the upstream while the caller
// accepted the downstream, hands it the direction and saves starting a
// goroutine per flow and growing its stack again. spawn must run its
// function exactly once.
func SpliceOn(down, up net.Conn, idle time.Duration, spawn func(func())) Result {
	s := &splice{down: down, up: up}
	if idle > 0 {
		s.idle.start(idle, &s.activity, s.idleFired)
		defer s.idle.stop()
	}

	s.wg.Add(1)
	if spawn == nil {
		go s.run(false)
	} else {
		spawn(s.runUp)
	}
	s.run(true)
	s.wg.Wait()
	s.closeBoth()

	res := Result{Received: s.dirs[1].n, Sent: s.dirs[0].n, IdleTimeout: s.idleTimedOut.Load()}
	for i := range s.dirs {
		res.DownstreamReset = res.DownstreamReset || s.dirs[i].downReset
		res.UpstreamReset = res.UpstreamReset || s.dirs[i].upReset
	}
	return res
}

// splice is one flow's shared state: both directions and the idle timer
// use it; each direction writes only its own dirs entry.
type splice struct {
	down, up     net.Conn
	activity     atomic.Uint64
	idleTimedOut atomic.Bool
	closeOnce    sync.Once
	wg           sync.WaitGroup
	idle         idleTimer
	dirs         [2]direction // [0] upstream → downstream, [1] downstream → upstream
}

func (s *splice) closeBoth() {
	s.closeOnce.Do(func() {
		s.down.Close()
		s.up.Close()
	})
}

func (s *splice) idleFired() {
	s.idleTimedOut.Store(true)
	s.closeBoth()
}

// runUp is run(false), the upstream → downstream direction, as a func
// value for SpliceOn's spawn.
func (s *splice) runUp() { s.run(false) }

// run copies one direction and, when it fails, ends the flow at once from
// this goroutine: the other direction may be blocked reading a peer that
// will never send again, and only closing its connection wakes it.
func (s *splice) run(toUp bool) {
	var d *direction
	if toUp {
		d = &s.dirs[1]
		*d = pipe(s.up, s.down, &s.activity)
	} else {
		defer s.wg.Done()
		d = &s.dirs[0]
		*d = pipe(s.down, s.up, &s.activity)
	}
	if d.eof {
		return // the other direction may still be flowing
	}
	// Any failure ends both directions. A reset read from one side is
	// passed on as a reset to the other; a failed write means the
	// destination peer is gone, so the source is reset too.
	switch {
	case d.srcReset && toUp:
		d.downReset = true
		resetConn(s.up)
	case d.srcReset:
		d.upReset = true
		resetConn(s.down)
	case d.dstReset && toUp:
		d.upReset = true
		resetConn(s.down)
	case d.dstReset:
		d.downReset = true
		resetConn(s.up)
	}
	s.closeBoth()
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
	var rd io.Reader = src
	if _, ok := dst.(socketSplicer); ok {
		// A bare kernel socket (passthrough) into a netstack flow: raw
		// reads, as a cluster's upstream connection already does
		// (internal/rawsock says why).
		if tc, ok := src.(*net.TCPConn); ok {
			if r := rawsock.New(tc); r != nil {
				rd = r
			}
		}
	}
	class := 0
	bp := getBuf(class)
	defer func() { putBuf(class, bp) }()
	small := 0
	var d direction
	for {
		buf := *bp
		n, rerr := rd.Read(buf)
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

// idleTimer calls fire once no activity was recorded for a full idle
// period. Activity is a counter bumped per read, so the hot path pays one
// atomic add and no clock read; a runtime timer (no goroutine while it
// waits) checks the counter every idle/4, so the flow closes between idle
// and 1.25 × idle after its last read.
type idleTimer struct {
	mu       sync.Mutex // orders the timer's callbacks with stop
	t        *time.Timer
	stopped  bool
	tick     time.Duration
	idle     time.Duration
	quiet    time.Duration
	last     uint64
	activity *atomic.Uint64
	fire     func()
}

func (w *idleTimer) start(idle time.Duration, activity *atomic.Uint64, fire func()) {
	w.tick = idle / 4
	if w.tick <= 0 {
		w.tick = idle
	}
	w.idle, w.activity, w.fire = idle, activity, fire
	w.mu.Lock()
	w.t = time.AfterFunc(w.tick, w.check)
	w.mu.Unlock()
}

func (w *idleTimer) check() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	if cur := w.activity.Load(); cur != w.last {
		w.last, w.quiet = cur, 0
	} else if w.quiet += w.tick; w.quiet >= w.idle {
		w.stopped = true
		w.fire()
		return
	}
	w.t.Reset(w.tick)
}

func (w *idleTimer) stop() {
	w.mu.Lock()
	w.stopped = true
	w.t.Stop()
	w.mu.Unlock()
}
