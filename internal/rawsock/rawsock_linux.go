//go:build linux

package rawsock

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// Conn reads and writes one TCP socket with raw system calls. Read and
// Write may run at once; each admits one caller at a time.
type Conn struct {
	tc *net.TCPConn
	rc syscall.RawConn

	// The callbacks' state, in fields so that readFn and writeFn (made
	// once) do not allocate a closure per call.
	rmu    sync.Mutex
	rbuf   []byte
	rn     int
	rerrno syscall.Errno
	readFn func(fd uintptr) bool

	wmu     sync.Mutex
	wbuf    []byte // what is left to write
	werrno  syscall.Errno
	writeFn func(fd uintptr) bool
}

// New returns raw I/O on tc's socket, or nil when tc has no descriptor
// to give (then use tc itself).
func New(tc *net.TCPConn) *Conn {
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	c := &Conn{tc: tc, rc: rc}
	c.readFn, c.writeFn = c.readFd, c.writeFd
	return c
}

// readFd is the RawConn callback of Read: false asks the poller to wait
// for the socket to become readable. A read that did not fill the buffer
// is still followed, at the next Read, by one that may find the socket
// empty before the poller waits: a TCP read also consumes a FIN that came
// with the last bytes, whose edge the poller has already delivered, so
// waiting first would miss the end of the stream.
func (c *Conn) readFd(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&c.rbuf[0])), uintptr(len(c.rbuf)))
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		c.rn, c.rerrno = int(n), e
		return true
	}
}

func (c *Conn) writeFd(fd uintptr) bool {
	for len(c.wbuf) > 0 {
		p := c.wbuf[:min(len(c.wbuf), WriteChunk)]
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		switch e {
		case 0:
			c.wbuf = c.wbuf[n:]
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			c.werrno = e
			return true
		}
	}
	return true
}

// Read is net.TCPConn's Read: io.EOF at the peer's FIN, else a
// *net.OpError "read" (deadline, closed socket, reset).
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.rbuf, c.rerrno = p, 0
	err := c.rc.Read(c.readFn)
	c.rbuf = nil
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case c.rerrno != 0:
		return 0, c.opError("read", os.NewSyscallError("read", c.rerrno))
	case c.rn == 0:
		return 0, io.EOF
	}
	return c.rn, nil
}

// Write is net.TCPConn's Write: all of p, or the count written and a
// *net.OpError "write".
func (c *Conn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wbuf, c.werrno = p, 0
	err := c.rc.Write(c.writeFn)
	n := len(p) - len(c.wbuf)
	c.wbuf = nil
	switch {
	case err != nil:
		return n, c.opError("write", err)
	case c.werrno != 0:
		return n, c.opError("write", os.NewSyscallError("write", c.werrno))
	}
	return n, nil
}

// opError is the error net.TCPConn returns for the same failure: the
// RawConn's own errors (closed, deadline) come as an *net.OpError with
// Op "raw-read"/"raw-write", whose cause is kept.
func (c *Conn) opError(op string, err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.tc.LocalAddr(), Addr: c.tc.RemoteAddr(), Err: err}
}
