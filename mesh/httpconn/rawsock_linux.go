//go:build linux

package httpconn

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// canPeek: idle connections are checked with a non-blocking peek.
const canPeek = true

// peek is the RawConn callback of h1Conn.alive: one non-blocking peek at
// the socket's receive queue, a raw system call as rawSock's (see there).
func (c *h1Conn) peek(fd uintptr) bool {
	_, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&c.peekBuf[0])), 1,
		syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
	c.peekErr = nil
	if e != 0 {
		c.peekErr = e
	}
	return true
}

// peekIdle interprets the peek of an idle connection: only "nothing to
// read yet" (EAGAIN) means alive; 0 bytes without error is the upstream's
// FIN, a byte is something it sent unasked, another error a reset.
func peekIdle(err error) bool {
	return err == syscall.EAGAIN
}

// rawSock reads and writes a plaintext upstream TCP socket of the h1
// transport with raw system calls, through the socket's RawConn so that
// the runtime's poller still waits when the socket is not ready, and
// deadlines and Close still unblock a waiting call.
//
// Why: Go's ordinary system call entry wakes the runtime's sysmon thread
// when it sleeps, which it does whenever every processor went idle, that
// is, between requests under a moderate load. Each wake-up costs a futex
// and then sysmon's polling sleeps (20 µs each) until the proxy is idle
// again: at 1,000 req/s, 3 nanosleep calls per request, more than the
// request's own upstream system calls. The socket is non-blocking, so a
// raw call returns at once (EAGAIN when not ready), and a write is cut
// into rawWriteMax pieces so that no single call holds its processor long.
//
// Read and write may run at once (a request body written while the
// response is read); each has its own fields.
type rawSock struct {
	pc  *pooledConn
	raw syscall.RawConn

	rp      []byte
	rn      int
	rerr    error
	readFn  func(fd uintptr) bool
	wp      []byte
	wn      int
	werr    error
	writeFn func(fd uintptr) bool
}

// rawWriteMax bounds the bytes of one write system call.
const rawWriteMax = 64 << 10

// newRawIO returns the raw I/O of pc (a *rawSock), or nil when pc is
// not a plaintext TCP socket (TLS, a pipe host's Unix socket).
func newRawIO(pc *pooledConn) io.ReadWriter {
	tc := pc.TCPConn()
	if tc == nil {
		return nil
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	s := &rawSock{pc: pc, raw: raw}
	s.readFn, s.writeFn = s.read, s.write
	return s
}

func (s *rawSock) read(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&s.rp[0])), uintptr(len(s.rp)))
		switch e {
		case 0:
			s.rn, s.rerr = int(n), nil
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false // the poller waits for the socket
		default:
			s.rn, s.rerr = 0, e
			return true
		}
	}
}

func (s *rawSock) write(fd uintptr) bool {
	for len(s.wp) > 0 {
		p := s.wp
		if len(p) > rawWriteMax {
			p = p[:rawWriteMax]
		}
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		switch e {
		case 0:
			s.wn += int(n)
			s.wp = s.wp[n:]
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			s.werr = e
			return true
		}
	}
	return true
}

// Read is the socket's Read, as net.TCPConn's: io.EOF at the upstream's
// FIN, a *net.OpError "read" otherwise. The bytes count as the
// connection's (upstream_cx_rx_bytes_total).
func (s *rawSock) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.rp = p
	err := s.raw.Read(s.readFn)
	s.rp = nil
	if err != nil {
		return 0, s.opError("read", err)
	}
	if s.rerr != nil {
		return 0, s.opError("read", os.NewSyscallError("read", s.rerr))
	}
	if s.rn == 0 {
		return 0, io.EOF
	}
	s.pc.Moved(s.rn, 0)
	return s.rn, nil
}

// Write writes all of p, as net.TCPConn's Write.
func (s *rawSock) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.wp, s.wn, s.werr = p, 0, nil
	err := s.raw.Write(s.writeFn)
	n := s.wn
	s.wp = nil
	if n > 0 {
		s.pc.Moved(0, n)
	}
	if err == nil && s.werr != nil {
		err = os.NewSyscallError("write", s.werr)
	}
	if err != nil {
		return n, s.opError("write", err)
	}
	return n, nil
}

// opError makes err, from the system call or from the RawConn (deadline,
// closed: a *net.OpError "raw-read" or "raw-write"), the *net.OpError
// net.TCPConn's Read or Write would have returned.
func (s *rawSock) opError(op string, err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: "tcp", Source: s.pc.LocalAddr(), Addr: s.pc.RemoteAddr(), Err: err}
}
