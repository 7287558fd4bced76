//go:build unix && !(linux && (amd64 || arm64))

package httpconn

import "syscall"

// canPeek: idle connections are checked with a non-blocking peek.
const canPeek = true

// peek is the RawConn callback of h1Conn.alive: one non-blocking peek at
// the socket's receive queue.
func (c *h1Conn) peek(fd uintptr) bool {
	_, _, c.peekErr = syscall.Recvfrom(int(fd), c.peekBuf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	return true
}

// peekIdle interprets the peek of an idle connection: only "nothing to
// read yet" (EAGAIN) means alive; 0 bytes without error is the upstream's
// FIN, a byte is something it sent unasked, another error a reset.
func peekIdle(err error) bool {
	return err == syscall.EAGAIN || err == syscall.EWOULDBLOCK
}
