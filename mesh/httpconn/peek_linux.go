//go:build linux && (amd64 || arm64)

package httpconn

import (
	"syscall"
	"unsafe"
)

// canPeek: idle connections are checked with a non-blocking peek.
const canPeek = true

// peek is the RawConn callback of h1Conn.alive: one non-blocking peek at
// the socket's receive queue, as a raw syscall. syscall.Recvfrom enters
// through the runtime's syscall bookkeeping, which wakes its monitor
// thread (sysmon) from its idle sleep; the peek runs at every pool
// checkout, so that was once per request, and a woken sysmon polls every
// 20 µs while a timer is overdue (one always is for up to a millisecond
// while the poller sleeps, in whole milliseconds): 3 to 4 thread switches
// per request at a fixed 1,000 req/s. MSG_DONTWAIT: it never waits.
func (c *h1Conn) peek(fd uintptr) bool {
	_, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&c.peekBuf[0])), uintptr(len(c.peekBuf)),
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
	return err == syscall.EAGAIN || err == syscall.EWOULDBLOCK
}
