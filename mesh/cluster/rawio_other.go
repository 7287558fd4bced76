//go:build !linux

package cluster

import "net"

// rawSock is the Linux raw socket I/O; elsewhere the socket's own Read
// and Write are used.
type rawSock struct{ net.Conn }

func newRawSock(*net.TCPConn) *rawSock { return nil }
