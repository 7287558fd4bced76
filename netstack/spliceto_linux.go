package netstack

import (
	"errors"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
)

// SpliceTo copies the flow's received bytes to dst, a kernel socket, until
// the peer's FIN or an error, and calls onData with the size of each batch it moves.
// It returns the bytes moved, the flow's error (nil at FIN) and the
// socket's error; at most one of them is set.
//
// Unlike Read into a buffer and Write to the socket, segments go from the
// stack's receive queue to the socket with one copy, the kernel's: each
// segment is written by a non-blocking write from inside the stack's
// Read, and a write the socket cannot take stops that Read, leaving the
// rest queued (a blocking write there would hold the endpoint's lock and
// stall the flow's other direction). Pieces under stageBelow are gathered
// in a staging buffer and written together, as are the bytes of a segment
// the socket took only in part; the staging buffer is ours, so it is
// written after Read returns, waiting for the socket as long as needed.
func (c *endpointConn) SpliceTo(dst syscall.RawConn, onData func(n int)) (n int64, srcErr, dstErr error) {
	if c.network != "tcp" {
		return 0, c.opErr("read", errors.ErrUnsupported), nil
	}
	c.readMu.Lock()
	defer c.readMu.Unlock()
	w := &sockWriter{rc: dst}
	w.writeFn = w.writeFd
	defer w.release()
	for {
		res, err := c.ep.Read(w, tcpip.ReadOptions{})
		n += int64(res.Count)
		if res.Count > 0 {
			onData(res.Count)
		}
		if w.err == nil && len(w.stage) > 0 {
			w.flush()
		}
		if w.err != nil {
			return n, nil, w.err
		}
		if err == nil || w.stopped {
			w.stopped = false
			continue
		}
		if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
			if _, ok := err.(*tcpip.ErrClosedForReceive); ok {
				return n, nil, nil
			}
			return n, c.opError("read", err), nil
		}
		// Nothing queued: the staging buffer (empty) goes back to the
		// pool while the flow waits.
		w.release()
		select {
		case <-c.rCh:
		case <-c.readDL.wait():
			return n, c.opErr("read", os.ErrDeadlineExceeded), nil
		}
	}
}

// stageBelow is the piece size under which SpliceTo copies into its
// staging buffer instead of writing the piece by itself: one syscall per
// small piece (a 1,448-byte segment from a 1,500-MTU path) would cost
// more than the copy.
const stageBelow = 16 << 10

// stageSize is the staging buffer's size: a segment view (a chunk, at most
// 64 KiB) always fits in an empty one.
const stageSize = 64 << 10

var stagePool = sync.Pool{New: func() any { b := make([]byte, 0, stageSize); return &b }}

// errStop ends the stack's Read early; sockWriter's fields say why.
var errStop = errors.New("netstack: splice stopped")

// sockWriter is the io.Writer SpliceTo hands to the endpoint's Read.
type sockWriter struct {
	rc      syscall.RawConn
	stagep  *[]byte
	stage   []byte // copied bytes not yet written to the socket
	err     error  // the socket failed: the copy ends
	stopped bool   // this Read was stopped by the socket, not by the flow

	// writev's syscall state, in fields so that writeFn (made once) does
	// not allocate a closure per call.
	iov     [2]unix.Iovec
	niov    int
	wait    bool
	n       int
	errno   syscall.Errno
	writeFn func(fd uintptr) bool
}

func (w *sockWriter) release() {
	if w.stagep != nil && len(w.stage) == 0 {
		*w.stagep = w.stage[:0]
		stagePool.Put(w.stagep)
		w.stagep, w.stage = nil, nil
	}
}

func (w *sockWriter) stageBuf() {
	if w.stagep == nil {
		w.stagep = stagePool.Get().(*[]byte)
		w.stage = (*w.stagep)[:0]
	}
}

// Write implements io.Writer for the stack's Read: p is the stack's memory,
// valid only during the call, so it is either written now or copied.
func (w *sockWriter) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, errStop
	}
	if len(p) < stageBelow {
		w.stageBuf()
		if len(w.stage)+len(p) <= cap(w.stage) {
			w.stage = append(w.stage, p...)
			return len(p), nil
		}
	}
	// Write what is staged and p together, without waiting.
	staged := len(w.stage)
	m, err := w.writev(w.stage, p, false)
	if m < staged {
		w.stage = w.stage[:copy(w.stage, w.stage[m:])]
		m = 0
	} else {
		w.stage = w.stage[:0]
		m -= staged
	}
	if err != nil {
		w.err = err
		return m, errStop
	}
	if m == len(p) {
		return m, nil
	}
	// The socket is full: keep what fits of the rest (ours now), leave
	// the remainder queued in the stack, and stop this Read.
	w.stageBuf()
	k := min(len(p)-m, cap(w.stage)-len(w.stage))
	w.stage = append(w.stage, p[m:m+k]...)
	w.stopped = true
	return m + k, errStop
}

// flush writes the staging buffer, waiting for the socket.
func (w *sockWriter) flush() {
	for len(w.stage) > 0 {
		m, err := w.writev(w.stage, nil, true)
		w.stage = w.stage[:copy(w.stage, w.stage[m:])]
		if err != nil {
			w.err = err
			return
		}
	}
}

// writev writes a then b to the socket; with wait false it returns what a
// non-blocking write took (possibly 0, with a nil error).
func (w *sockWriter) writev(a, b []byte, wait bool) (int, error) {
	w.niov = 0
	for _, p := range [2][]byte{a, b} {
		if len(p) > 0 {
			w.iov[w.niov] = iovec(p)
			w.niov++
		}
	}
	if w.niov == 0 {
		return 0, nil
	}
	w.wait = wait
	err := w.rc.Write(w.writeFn)
	clear(w.iov[:])
	if err != nil {
		return 0, err
	}
	switch w.errno {
	case 0:
		return w.n, nil
	case unix.EAGAIN:
		return 0, nil
	}
	return 0, os.NewSyscallError("writev", w.errno)
}

// writeFd is writev's RawConn callback. The socket is non-blocking (a
// full one returns EAGAIN and the poller waits), so the raw syscall never
// blocks, and skips the runtime's syscall bookkeeping, which wakes its
// idle monitor thread (sysmon) with a futex on the first syscall after an
// idle spell: once per request on a request/response flow.
func (w *sockWriter) writeFd(fd uintptr) bool {
	for {
		r, _, e := unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&w.iov[0])), uintptr(w.niov))
		if e == unix.EINTR {
			continue
		}
		w.n, w.errno = int(r), e
		return !w.wait || e != unix.EAGAIN
	}
}
