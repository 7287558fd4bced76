//go:build !unix

package httpconn

// peek cannot look at the socket here; idle connections are assumed alive
// (a failed request on one is still resent, see h1Transport.roundTrip).
func (c *h1Conn) peek(uintptr) bool {
	c.peekN, c.peekErr = -1, nil
	return true
}

func peekIdle(int, error) bool { return true }
