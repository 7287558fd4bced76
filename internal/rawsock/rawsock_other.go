//go:build !linux

package rawsock

import "net"

// Conn is Linux's (rawsock_linux.go); elsewhere New returns nil and the
// caller uses its net.TCPConn.
type Conn struct{ tc *net.TCPConn }

// New returns nil: raw socket I/O is Linux's.
func New(*net.TCPConn) *Conn { return nil }

func (c *Conn) Read(p []byte) (int, error)  { return c.tc.Read(p) }
func (c *Conn) Write(p []byte) (int, error) { return c.tc.Write(p) }
