//go:build linux

package tcpproxy

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// rawSocketReader reads a plaintext kernel TCP socket through its RawConn
// with raw read syscalls, for the upstream → downstream direction of a
// flow whose other side is not a kernel socket (a netstack flow).
//
// net.TCPConn's Read enters the syscall through the runtime's
// bookkeeping, which wakes its monitor thread (sysmon) from its idle
// sleep on the first syscall after every idle spell; a woken sysmon then
// polls every 20 µs until the proxy has idled for a while again. On a
// request/response flow that was once per response, and with the TUN
// write the largest CPU cost of the L4 capture path (30% at a fixed 1,000
// req/s). The descriptor is non-blocking, so the raw read never waits:
// an empty socket returns EAGAIN and the poller waits for it.
//
// A read that did not fill the buffer is still followed by one that finds
// the socket empty (EAGAIN) before the poller waits: a TCP read copies
// until the receive queue is empty, but it also consumes a FIN that came
// in the same segment as the last bytes, whose edge the poller has
// already delivered, so waiting first would miss the end of the stream.
type rawSocketReader struct {
	rc    syscall.RawConn
	count func(n int) // bytes received, for the cluster's counters; nil: none

	// The callback's state, in fields so that readFn (made once) does not
	// allocate a closure per call.
	buf    []byte
	n      int
	errno  syscall.Errno
	readFn func(fd uintptr) bool
}

// newRawSocketReader returns a raw reader for c when c is a plaintext
// kernel TCP socket (or a cluster upstream over one), else nil.
func newRawSocketReader(c net.Conn) *rawSocketReader {
	var tc *net.TCPConn
	var count func(int)
	switch v := c.(type) {
	case *net.TCPConn:
		tc = v
	case plainUpstream:
		if tc = v.TCPConn(); tc != nil {
			count = func(n int) { v.Moved(n, 0) }
		}
	}
	if tc == nil {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	r := &rawSocketReader{rc: rc, count: count}
	r.readFn = r.readFd
	return r
}

// Read implements io.Reader: io.EOF at the peer's FIN, a *os.SyscallError
// wrapping the errno otherwise (errors.Is(err, syscall.ECONNRESET) holds),
// or the poller's error once the socket is closed.
func (r *rawSocketReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r.buf = p
	err := r.rc.Read(r.readFn)
	r.buf = nil
	if err != nil {
		return 0, err
	}
	switch {
	case r.errno != 0:
		return 0, os.NewSyscallError("read", r.errno)
	case r.n == 0:
		return 0, io.EOF
	}
	if r.count != nil {
		r.count(r.n)
	}
	return r.n, nil
}

// readFd is the RawConn callback: false asks the poller to wait for the
// socket to become readable.
func (r *rawSocketReader) readFd(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&r.buf[0])), uintptr(len(r.buf)))
		if e == syscall.EINTR {
			continue
		}
		if e == syscall.EAGAIN {
			return false
		}
		r.n, r.errno = int(n), e
		return true
	}
}
