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
	to, from []int
	mu       sync.Mutex
	rc       []syscall.RawConn
}

func (f *directFlow) SpliceTo(dst syscall.RawConn, onData func(int)) (int64, error, error) {
	return f.run(dst, f.to, onData), nil, nil
}

func (f *directFlow) SpliceFrom(src syscall.RawConn, onData func(int)) (int64, error, error) {
	return f.run(src, f.from, onData), nil, nil
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

// TestSpliceDirectPaths: a flow that splices to and from kernel sockets
// is given the upstream's socket in both directions, for a bare
// *net.TCPConn and for a cluster's plaintext upstream, whose byte counters
// get every batch; the result counts the bytes both ways.
func TestSpliceDirectPaths(t *testing.T) {
	t.Run("clusterUpstream", func(t *testing.T) {
		c, _ := pair(t)
		up := &countingUpstream{Conn: c, tc: c}
		down := &directFlow{to: []int{60, 40}, from: []int{30}}
		res := Splice(down, up, 0)
		if res.Received != 100 || res.Sent != 30 {
			t.Fatalf("result received %d sent %d, want 100 and 30", res.Received, res.Sent)
		}
		if up.sent != 100 || up.received != 30 {
			t.Fatalf("cluster counters: sent %d received %d, want 100 and 30", up.sent, up.received)
		}
		if len(down.rc) != 2 {
			t.Fatalf("%d direct directions, want 2", len(down.rc))
		}
	})
	t.Run("socket", func(t *testing.T) {
		c, _ := pair(t)
		down := &directFlow{to: []int{5}, from: []int{7}}
		res := Splice(down, c, 0)
		if res.Received != 5 || res.Sent != 7 || len(down.rc) != 2 {
			t.Fatalf("received %d sent %d over %d direct directions, want 5, 7, 2", res.Received, res.Sent, len(down.rc))
		}
	})
}
