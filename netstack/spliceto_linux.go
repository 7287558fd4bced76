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
// stack's receive queue to the socket with one copy, the kernel's, and
// many at a time: a peeking Read gathers the queued segments' views (up to
// spliceBatch bytes) into one iovec array and writes it with one
// non-blocking writev from inside that Read, while the endpoint's lock
// keeps the views alive; a second Read then consumes what the socket took.
// One writev per 64 KiB segment (the TUN's largest packet) cost a syscall,
// a socket lock and a push per segment, and woke the upstream's reader per
// segment. A write the socket takes only in part stops there: the next
// bytes (up to stageSize) are copied into a staging buffer, which is
// ours, and written after the Read returns, waiting for the socket as long
// as needed (a blocking write inside Read would hold the endpoint's lock
// and stall the flow's other direction).
func (c *endpointConn) SpliceTo(dst syscall.RawConn, onData func(n int)) (n int64, srcErr, dstErr error) {
	if c.network != "tcp" {
		return 0, c.opErr("read", errors.ErrUnsupported), nil
	}
	c.readMu.Lock()
	defer c.readMu.Unlock()
	w := &sockWriter{rc: dst}
	w.writeFn = w.writeFd
	w.iov = make([]unix.Iovec, 0, maxIovecs)
	var skip skipWriter
	defer w.release()
	tuner, _ := c.ep.(rcvBufTuner)
	untuned := 0 // bytes moved and not yet reported to tuner
	short := 0   // bytes a peek found when it ended short of its target
	bulk := false
	for {
		if !bulk {
			// Request-sized reads: copied out by one plain Read (no
			// peek and consume, no queue query) and written from the
			// copy. A read of copyUnder bytes or more switches to
			// gathering.
			w.stageBuf()
			res, err := c.ep.Read((*stageWriter)(w), tcpip.ReadOptions{})
			n += int64(res.Count)
			if res.Count > 0 {
				onData(res.Count)
				untuned += res.Count
			}
			if w.flush(); w.err != nil {
				return n, nil, w.err
			}
			bulk = res.Count >= copyUnder
			if done, rerr := c.spliceWait(err, w); done {
				return n, rerr, nil
			}
			continue
		}
		queued, qerr := c.ep.GetSockOptInt(tcpip.ReceiveQueueSizeOption)
		if qerr != nil {
			queued = 0
		}
		if queued < copyUnder {
			bulk = false
			continue
		}
		w.target = min(queued, spliceBatch)
		if short > 0 {
			// The queue held less than it counted (it never should):
			// write what the last peek found rather than peek forever.
			w.target, short = min(w.target, short), 0
		}
		_, err := c.ep.Read(w, tcpip.ReadOptions{Peek: true})
		batch, gathered := w.end()
		if batch == 0 && w.err == nil {
			short = gathered
		}
		if w.err != nil {
			return n, nil, w.err
		}
		if batch > 0 {
			// Consume what the socket took or the staging buffer holds.
			skip.left = batch
			res, cerr := c.ep.Read(&skip, tcpip.ReadOptions{})
			n += int64(res.Count)
			if res.Count > 0 {
				onData(res.Count)
				if untuned += res.Count; tuner != nil && untuned >= tuneEvery {
					tuner.ModerateRecvBuf(untuned)
					untuned = 0
				}
			}
			if cerr != nil || res.Count != batch {
				// Only Close or Abort purge the queue under us.
				if cerr == nil {
					cerr = &tcpip.ErrConnectionAborted{}
				}
				return n, c.opError("read", cerr), nil
			}
		}
		if len(w.stage) > 0 {
			w.flush()
			if w.err != nil {
				return n, nil, w.err
			}
		}
		if done, rerr := c.spliceWait(err, w); done {
			return n, rerr, nil
		}
	}
}

// spliceWait handles the error of SpliceTo's read: nil goes on at once;
// an empty queue (ErrWouldBlock) waits for the next segment, with w's
// staging buffer (empty) back in the pool meanwhile, unless the read
// deadline passes; the peer's FIN ends the splice (done, nil); any other
// error ends it with that error.
func (c *endpointConn) spliceWait(err tcpip.Error, w *sockWriter) (done bool, rerr error) {
	if err == nil {
		return false, nil
	}
	if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
		if _, ok := err.(*tcpip.ErrClosedForReceive); ok {
			return true, nil
		}
		return true, c.opError("read", err)
	}
	w.release()
	select {
	case <-c.rCh:
		return false, nil
	case <-c.readDL.wait():
		return true, c.opErr("read", os.ErrDeadlineExceeded)
	}
}

// rcvBufTuner is gVisor's receive-buffer auto-tuning, which its own
// sockets drive by reporting every read (tcp.Endpoint.ModerateRecvBuf).
// SpliceTo reports what it moves, so a flow that keeps up with a fast
// sender grows its buffer (up to the stack's maximum, 8 MiB by default)
// past the 1 MiB default and its window (half the buffer) past 512 KiB:
// the sender keeps more in flight, SpliceTo finds more queued per wake-up
// and writes it in fewer, larger batches, and the stack sends fewer
// ACKs into the TUN. A flow that is read slowly never grows.
type rcvBufTuner interface{ ModerateRecvBuf(copied int) }

// tuneEvery is how many bytes SpliceTo moves between reports to the
// auto-tuning (each takes the endpoint's lock): a request/response flow
// does not pay one per request, and a bulk flow reports about once per
// batch.
const tuneEvery = 64 << 10

// spliceBatch bounds the bytes one writev of SpliceTo carries (the
// upstream socket's buffer takes about this much at once).
const spliceBatch = 1 << 20

// maxIovecs bounds the pieces of one writev (the kernel's UIO_MAXIOV is
// 1024); a batch of small segments ends there (512 pieces are 370 KiB of
// 1,448-byte segments from a 1,500-MTU path, one or two pieces each).
const maxIovecs = 512

// stageSize is the staging buffer's size: what SpliceTo keeps of a
// segment the socket took only in part.
const stageSize = 64 << 10

var stagePool = sync.Pool{New: func() any { b := make([]byte, 0, stageSize); return &b }}

// copyUnder is the read size under which SpliceTo copies instead of
// gathering views: for a request, one copy costs less than the queue
// query and the second Read (two more takes of the endpoint's lock) that
// gathering and consuming a peek need.
const copyUnder = 16 << 10

// stageWriter is sockWriter copying into its staging buffer, for a plain
// Read of a small queue; a piece that does not fit stops the Read and
// stays queued.
type stageWriter sockWriter

func (s *stageWriter) Write(p []byte) (int, error) {
	k := copy(s.stage[len(s.stage):cap(s.stage)], p)
	s.stage = s.stage[:len(s.stage)+k]
	if k < len(p) {
		return k, errStop
	}
	return k, nil
}

// errStop ends the stack's Read early.
var errStop = errors.New("netstack: splice stopped")

// skipWriter consumes the first left bytes a Read hands it.
type skipWriter struct{ left int }

func (s *skipWriter) Write(p []byte) (int, error) {
	if len(p) <= s.left {
		s.left -= len(p)
		return len(p), nil
	}
	k := s.left
	s.left = 0
	return k, errStop
}

// sockWriter is the io.Writer SpliceTo hands to the endpoint's peeking
// Read: it gathers the views it is given (the stack's memory, valid only
// while that Read runs) and writes them, from inside the Read, once it
// holds target bytes.
type sockWriter struct {
	rc       syscall.RawConn
	target   int          // bytes to gather before writing
	iov      []unix.Iovec // the views gathered, not yet written
	gathered int
	done     bool // the batch was written (or failed): this Read is over
	batch    int  // bytes the batch moved: written, plus staged
	stagep   *[]byte
	stage    []byte // copied bytes not yet written to the socket
	err      error  // the socket failed: the copy ends

	// writev's syscall state, in fields so that writeFn (made once) does
	// not allocate a closure per call.
	wiov    *unix.Iovec
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

// Write implements io.Writer for the stack's peeking Read.
func (w *sockWriter) Write(p []byte) (int, error) {
	if w.done {
		return 0, errStop
	}
	if len(p) == 0 {
		return 0, nil
	}
	w.iov = append(w.iov, iovec(p))
	w.gathered += len(p)
	if w.gathered < w.target && len(w.iov) < cap(w.iov) {
		return len(p), nil
	}
	w.done = true
	w.writeBatch()
	return len(p), errStop
}

// writeBatch writes the gathered views without waiting, and copies into
// the staging buffer what fits of the part the socket did not take.
// Called from inside the peeking Read: the views are still the stack's.
func (w *sockWriter) writeBatch() {
	m, err := w.writev(w.iov, false)
	if err != nil {
		w.err = err
		return
	}
	w.batch = m
	if m == w.gathered {
		return
	}
	// The socket is full: keep what fits of the rest, leave the
	// remainder queued in the stack.
	w.stageBuf()
	for _, v := range w.iov {
		l := int(v.Len)
		if m >= l {
			m -= l
			continue
		}
		b := unsafe.Slice(v.Base, l)[m:]
		m = 0
		k := copy(w.stage[len(w.stage):cap(w.stage)], b)
		w.stage = w.stage[:len(w.stage)+k]
		w.batch += k
		if len(w.stage) == cap(w.stage) {
			break
		}
	}
}

// end closes a peeking Read: it drops the gathered views (never used after
// the Read returns) and returns the bytes the Read's batch moved and
// the bytes it gathered.
func (w *sockWriter) end() (batch, gathered int) {
	clear(w.iov)
	w.iov = w.iov[:0]
	batch, gathered = w.batch, w.gathered
	w.gathered, w.batch, w.done = 0, 0, false
	return batch, gathered
}

// flush writes the staging buffer, waiting for the socket.
func (w *sockWriter) flush() {
	for len(w.stage) > 0 {
		v := [1]unix.Iovec{iovec(w.stage)}
		m, err := w.writev(v[:], true)
		w.stage = w.stage[:copy(w.stage, w.stage[m:])]
		if err != nil {
			w.err = err
			return
		}
	}
}

// writev writes iov to the socket; with wait false it returns what a
// non-blocking write took (possibly 0, with a nil error).
func (w *sockWriter) writev(iov []unix.Iovec, wait bool) (int, error) {
	if len(iov) == 0 {
		return 0, nil
	}
	w.wiov, w.niov, w.wait = &iov[0], len(iov), wait
	err := w.rc.Write(w.writeFn)
	w.wiov = nil
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
		r, _, e := unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(w.wiov)), uintptr(w.niov))
		if e == unix.EINTR {
			continue
		}
		w.n, w.errno = int(r), e
		return !w.wait || e != unix.EAGAIN
	}
}
