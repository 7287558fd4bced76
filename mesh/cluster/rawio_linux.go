//go:build linux

package cluster

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// rawSock reads and writes a plaintext upstream TCP socket with raw
// syscalls through its RawConn, with net.TCPConn's results (the same
// *net.OpError with Op "read"/"write", io.EOF, deadlines honoured).
//
// net.TCPConn enters each syscall through the runtime's bookkeeping, which
// wakes its monitor thread (sysmon) from its idle sleep on the first
// syscall after every idle spell; a woken sysmon polls every 20 µs for as
// long as a timer is overdue, which one always is for up to a millisecond
// while the poller sleeps (it sleeps in whole milliseconds). At a few
// thousand requests a second that is tens of thread switches per request
// on a proxy that idles between them. The socket is non-blocking, so the
// raw syscalls never wait: EAGAIN hands the wait to the poller.
type rawSock struct {
	tc *net.TCPConn
	rc syscall.RawConn

	rmu    sync.Mutex // one Read at a time: the callback's state below
	rbuf   []byte
	rn     int
	rerrno syscall.Errno
	readFn func(fd uintptr) bool

	wmu     sync.Mutex // one Write at a time
	wbuf    []byte     // what is left to write
	werrno  syscall.Errno
	writeFn func(fd uintptr) bool
}

func newRawSock(tc *net.TCPConn) *rawSock {
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	s := &rawSock{tc: tc, rc: rc}
	s.readFn = s.readFd
	s.writeFn = s.writeFd
	return s
}

func (s *rawSock) readFd(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&s.rbuf[0])), uintptr(len(s.rbuf)))
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		s.rn, s.rerrno = int(n), e
		return true
	}
}

func (s *rawSock) writeFd(fd uintptr) bool {
	for len(s.wbuf) > 0 {
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&s.wbuf[0])), uintptr(len(s.wbuf)))
		switch e {
		case 0:
			s.wbuf = s.wbuf[n:]
		case syscall.EINTR:
		case syscall.EAGAIN:
			return false
		default:
			s.werrno = e
			return true
		}
	}
	return true
}

func (s *rawSock) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.rmu.Lock()
	defer s.rmu.Unlock()
	s.rbuf, s.rerrno = p, 0
	err := s.rc.Read(s.readFn)
	s.rbuf = nil
	switch {
	case err != nil:
		return 0, s.opError("read", err)
	case s.rerrno != 0:
		return 0, s.opError("read", os.NewSyscallError("read", s.rerrno))
	case s.rn == 0:
		return 0, io.EOF
	}
	return s.rn, nil
}

func (s *rawSock) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.wbuf, s.werrno = p, 0
	err := s.rc.Write(s.writeFn)
	n := len(p) - len(s.wbuf)
	s.wbuf = nil
	switch {
	case err != nil:
		return n, s.opError("write", err)
	case s.werrno != 0:
		return n, s.opError("write", os.NewSyscallError("write", s.werrno))
	}
	return n, nil
}

// opError is the error net.TCPConn returns for the same failure: the
// RawConn's own errors (closed, deadline) come as an *net.OpError with
// Op "raw-read"/"raw-write", whose cause is kept.
func (s *rawSock) opError(op string, err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: "tcp", Source: s.tc.LocalAddr(), Addr: s.tc.RemoteAddr(), Err: err}
}
