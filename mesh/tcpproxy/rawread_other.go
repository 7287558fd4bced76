//go:build !linux

package tcpproxy

import "net"

// rawSocketReader is the Linux raw socket reader; elsewhere the socket's
// own Read is used.
type rawSocketReader struct{ net.Conn }

func newRawSocketReader(net.Conn) *rawSocketReader { return nil }
