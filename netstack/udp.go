package netstack

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// ErrIdleTimeout ends a UDP flow that saw no datagram in either direction
// for its idle timeout.
var ErrIdleTimeout = errors.New("netstack: UDP flow idle timeout")

// UDPFlow is one UDP 4-tuple terminated by the stack. Datagrams from the
// client are read with ReadPacket; replies written with WritePacket leave
// from the original destination address.
type UDPFlow struct {
	ID FlowID

	conn    *endpointConn
	idle    time.Duration
	last    atomic.Int64 // unix nanos of the last datagram either way
	done    chan struct{}
	once    sync.Once
	release func()
}

func newUDPFlow(id FlowID, c *endpointConn, idle time.Duration, release func()) *UDPFlow {
	f := &UDPFlow{ID: id, conn: c, idle: idle, done: make(chan struct{}), release: release}
	f.Touch()
	return f
}

// IdleTimeout is how long the flow survives without traffic.
func (f *UDPFlow) IdleTimeout() time.Duration { return f.idle }

// Touch records activity, e.g. a datagram from the upstream side.
func (f *UDPFlow) Touch() { f.last.Store(time.Now().UnixNano()) }

// Done is closed when the flow ends (idle timeout or Close).
func (f *UDPFlow) Done() <-chan struct{} { return f.done }

// ReadPacket returns the next datagram from the client. It returns
// ErrIdleTimeout, and closes the flow, once neither side has sent anything
// for the idle timeout.
func (f *UDPFlow) ReadPacket(b []byte) (int, error) {
	for {
		last := time.Unix(0, f.last.Load())
		if time.Since(last) >= f.idle {
			f.Close()
			return 0, ErrIdleTimeout
		}
		f.conn.SetReadDeadline(last.Add(f.idle))
		n, err := f.conn.Read(b)
		if err == nil {
			f.Touch()
			return n, nil
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue // re-check: the other direction may have been active
		}
		f.Close()
		return 0, err
	}
}

// WritePacket sends one datagram to the client.
func (f *UDPFlow) WritePacket(b []byte) (int, error) {
	n, err := f.conn.Write(b)
	if err == nil {
		f.Touch()
	}
	return n, err
}

// Close ends the flow; later datagrams of the 4-tuple start a new flow.
func (f *UDPFlow) Close() error {
	f.once.Do(func() {
		close(f.done)
		f.conn.Close()
		if f.release != nil {
			f.release()
		}
	})
	return nil
}
