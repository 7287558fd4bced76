//go:build !linux

package httpconn

import "io"

// newRawIO: raw socket I/O is Linux's (rawsock_linux.go); elsewhere the
// h1 transport reads and writes the connection itself.
func newRawIO(*pooledConn) io.ReadWriter { return nil }
