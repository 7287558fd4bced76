//go:build linux

package httpconn

import (
	"syscall"
	"unsafe"
)

// canPeek: idle connections are checked with a non-blocking peek.
const canPeek = true

// peek is the RawConn callback of h1Conn.alive: one non-blocking peek at
// the socket's receive queue, a raw system call: it runs at every pool
// checkout of a connection idle for idleCheckAfter, and syscall.Recvfrom
// would wake the runtime's sysmon thread (internal/rawsock says why that
// costs).
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
