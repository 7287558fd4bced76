package tcpproxy

import (
	"net"
	"sync"
	"syscall"
	"testing"
)

// directFlow stands for a netstack flow that moves bytes to and from a
// kernel socket itself: it reports batches without moving anything.
type directFlow struct {
	net.Conn // unused methods
	to       []int
	mu       sync.Mutex
	rc       []syscall.RawConn
}

func (f *directFlow) SpliceTo(dst syscall.RawConn, onData func(int)) (int64, error, error) {
	return f.run(dst, f.to, onData), nil, nil
}

func (f *directFlow) run(rc syscall.RawConn, batches []int, onData func(int)) int64 {
	f.mu.Lock()
	f.rc = append(f.rc, rc)
	f.mu.Unlock()
	var n int64
	for _, b := range batches {
		onData(b)
		n += int64(b)
	}
	return n
}

func (f *directFlow) Close() error      { return nil }
func (f *directFlow) CloseWrite() error { return nil }

// countingUpstream stands for cluster.UpstreamConn on a plaintext socket.
type countingUpstream struct {
	net.Conn
	tc             *net.TCPConn
	mu             sync.Mutex
	received, sent int
}

func (u *countingUpstream) TCPConn() *net.TCPConn { return u.tc }

func (u *countingUpstream) Moved(received, sent int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.received += received
	u.sent += sent
}

// TestSpliceDirectPaths: a flow that writes into kernel sockets itself is
// given the upstream's socket, for a bare *net.TCPConn and for a
// cluster's plaintext upstream, whose byte counter gets every batch; the
// other direction is copied as before (here: the upstream's EOF).
func TestSpliceDirectPaths(t *testing.T) {
	t.Run("clusterUpstream", func(t *testing.T) {
		c, s := pair(t)
		s.Close()
		up := &countingUpstream{Conn: c, tc: c}
		down := &directFlow{to: []int{60, 40}}
		res := Splice(down, up, 0)
		if res.Received != 100 || res.Sent != 0 {
			t.Fatalf("result received %d sent %d, want 100 and 0", res.Received, res.Sent)
		}
		if up.sent != 100 || up.received != 0 {
			t.Fatalf("cluster counters: sent %d received %d, want 100 and 0", up.sent, up.received)
		}
		if len(down.rc) != 1 {
			t.Fatalf("%d direct directions, want 1", len(down.rc))
		}
	})
	t.Run("socket", func(t *testing.T) {
		c, s := pair(t)
		s.Close()
		down := &directFlow{to: []int{5, 7}}
		res := Splice(down, c, 0)
		if res.Received != 12 || len(down.rc) != 1 {
			t.Fatalf("received %d over %d direct directions, want 12 and 1", res.Received, len(down.rc))
		}
	})
}
