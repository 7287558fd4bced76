package xdstest

import (
	"net"
	"sync"
	"testing"
)

// ServeConns accepts on ln until the test ends, running handle on a
// goroutine of its own per connection (handle need not close it: the
// connection is closed when handle returns). At cleanup the listener is
// closed and every handler waited for, so no goroutine outlives the test.
func ServeConns(t testing.TB, ln net.Listener, handle func(net.Conn)) {
	t.Helper()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
}
