package netstack

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	wgnetstack "golang.zx2c4.com/wireguard/tun/netstack"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// spliceHandler accepts every flow and splices it into a kernel TCP
// connection to dst, reporting SpliceTo's results.
type spliceHandler struct {
	dst  string
	done chan spliceResult
}

type spliceResult struct {
	n              int64
	srcErr, dstErr error
	calls          int
	// memDrops is the flow's segments gVisor dropped because its receive
	// memory was full (tcp.Stats.ReceiveErrors.SegmentQueueDropped).
	memDrops uint64
}

func (h *spliceHandler) HandleTCP(r *TCPRequest) {
	c, err := r.Accept()
	if err != nil {
		h.done <- spliceResult{srcErr: err}
		return
	}
	defer c.Close()
	up, err := net.Dial("tcp", h.dst)
	if err != nil {
		h.done <- spliceResult{dstErr: err}
		return
	}
	defer up.Close()
	// A small send buffer fills quickly: SpliceTo meets a full socket.
	up.(*net.TCPConn).SetWriteBuffer(32 << 10)
	rc, err := up.(*net.TCPConn).SyscallConn()
	if err != nil {
		h.done <- spliceResult{dstErr: err}
		return
	}
	var res spliceResult
	ec := c.(*endpointConn)
	res.n, res.srcErr, res.dstErr = ec.SpliceTo(rc, func(int) { res.calls++ })
	res.memDrops = ec.ep.Stats().(*tcp.Stats).ReceiveErrors.SegmentQueueDropped.Value()
	if res.srcErr == nil && res.dstErr == nil {
		up.(*net.TCPConn).CloseWrite()
	}
	h.done <- res
}

func (h *spliceHandler) HandleUDP(f *UDPFlow) { f.Close() }

// TestSpliceToSocket moves flows into a kernel socket whose reader is slow
// (the socket fills, so Read is stopped and resumed, and partly written
// segments are staged) and checks every byte arrives in order, for
// MSS-sized segments (staged) and 64 KiB ones (written directly), in
// large and in small writes, and that the stack dropped no segment for
// want of receive memory.
func TestSpliceToSocket(t *testing.T) {
	for _, tc := range []struct {
		name     string
		mtu      int
		write    int
		size     int
		upRcvBuf int // the upstream reader's SO_RCVBUF; 0: the kernel's
	}{
		{"mtu1500", 1500, 256 << 10, 6 << 20, 0},
		{"mtu65000", 65000, 256 << 10, 6 << 20, 0},
		// Many 100-byte segments in a row, as many as the flow's
		// receive memory holds: gVisor charges each queued segment its
		// bookkeeping (SegOverheadSize, ~640 bytes) besides its bytes,
		// while the window it advertises assumes a segment costs at
		// most twice its payload, so a peer filling that window with
		// 100-byte segments outruns the memory and the stack drops
		// segments inside its own window (tiny-segment flows,
		// TestSpliceToKernelPeerTinySegments). Past that bound the
		// outcome is the peer's loss recovery, not SpliceTo's: this
		// case's gVisor peer retransmits ~2 segments per 200 ms, and
		// 512 KiB here hung in half the runs. A small upstream receive
		// buffer still makes the socket fill.
		{"smallWrites", 65000, 100, tinySegmentBudget(1<<20, 100), 8 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln := listenRcvBuf(t, tc.upRcvBuf)
			h := &spliceHandler{dst: ln.Addr().String(), done: make(chan spliceResult, 1)}
			tnet := newPeerMTU(t, h, tc.mtu)

			payload := make([]byte, tc.size)
			rand.Read(payload)
			// A slow reader: the proxy's socket fills up.
			got := slowUpstream(ln, 100*time.Millisecond)

			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			c, err := tnet.DialContext(ctx, "tcp", "192.0.2.10:8080")
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			for off := 0; off < len(payload); off += tc.write {
				if _, err := c.Write(payload[off:min(off+tc.write, len(payload))]); err != nil {
					t.Fatalf("write at %d: %v", off, err)
				}
			}
			c.(interface{ CloseWrite() error }).CloseWrite()

			var res spliceResult
			select {
			case res = <-h.done:
			case <-time.After(20 * time.Second):
				t.Fatal("SpliceTo did not return")
			}
			if res.srcErr != nil || res.dstErr != nil {
				t.Fatalf("SpliceTo: flow error %v, socket error %v", res.srcErr, res.dstErr)
			}
			if res.n != int64(len(payload)) {
				t.Errorf("SpliceTo moved %d bytes, want %d", res.n, len(payload))
			}
			if res.calls == 0 {
				t.Error("onData never called")
			}
			if res.memDrops != 0 {
				t.Errorf("the stack dropped %d segments for want of receive memory", res.memDrops)
			}
			b := <-got
			if sha256.Sum256(b) != sha256.Sum256(payload) {
				t.Fatalf("received %d bytes, not the %d sent", len(b), len(payload))
			}
		})
	}
}

// tinySegmentBudget is the most bytes a flow with receive buffer rcvBuf
// can have queued in segments of seg bytes without gVisor dropping one:
// each is charged SegOverheadSize (segment and packet bookkeeping plus the
// largest IPv4 header), its TCP header (at most 60 bytes) and its payload.
// A tenth is left for duplicates the peer may retransmit.
func tinySegmentBudget(rcvBuf, seg int) int {
	per := tcp.SegOverheadSize + header.TCPHeaderMaximumSize + seg
	return rcvBuf / per * seg * 9 / 10
}

// listenRcvBuf listens on loopback; a rcvBuf above zero is given to the
// accepted sockets (set on the listener, so their window scale fits it).
func listenRcvBuf(t *testing.T, rcvBuf int) net.Listener {
	t.Helper()
	lc := net.ListenConfig{}
	if rcvBuf > 0 {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvBuf)
			})
			return errors.Join(err, serr)
		}
	}
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// TestSpliceToSocketReset: a socket whose peer resets it ends SpliceTo
// with the socket's error, not the flow's.
func TestSpliceToSocketReset(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	h := &spliceHandler{dst: ln.Addr().String(), done: make(chan spliceResult, 1)}
	tnet := newPeerMTU(t, h, 1500)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		io.ReadFull(c, make([]byte, 1000))
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := tnet.DialContext(ctx, "tcp", "192.0.2.10:8080")
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	go func() {
		buf := make([]byte, 64<<10)
		for {
			c.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	select {
	case res := <-h.done:
		if res.srcErr != nil {
			t.Fatalf("flow error %v, want the socket's", res.srcErr)
		}
		if !errors.Is(res.dstErr, syscall.ECONNRESET) && !errors.Is(res.dstErr, syscall.EPIPE) {
			t.Fatalf("socket error %v, want ECONNRESET or EPIPE", res.dstErr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("SpliceTo did not return after the socket was reset")
	}
}

// newPeerMTU is newPeer with a link MTU of its own.
func newPeerMTU(t *testing.T, h Handler, mtu int) *wgnetstack.Net {
	t.Helper()
	dev, tnet, err := wgnetstack.CreateNetTUN([]netip.Addr{clientV4, clientV6}, nil, mtu)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(dev, h, Config{}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		dev.Close()
	})
	return tnet
}

// TestSpliceToKernelPeerTinySegments is TestSpliceToSocket's smallWrites
// with the kernel as the peer, as for an app in the pod: a TCP_NODELAY
// socket writes 1 MiB in paced 100-byte writes through a real TUN, so most
// leave as 100-byte segments, while the upstream reader first stalls and
// then reads slowly. Far more tiny segments queue than the flow's receive
// memory holds, and gVisor drops some inside its own window (see
// tinySegmentBudget); the kernel's SACK recovery must still deliver every
// byte once the upstream drains, where the gVisor peer of smallWrites
// recovered so slowly that the flow hung.
func TestSpliceToKernelPeerTinySegments(t *testing.T) {
	// The upstream listener lives in the test's own namespace: the
	// handler dials it from goroutines that are not in the new one.
	ln := listenRcvBuf(t, 8<<10)
	inNetns(t)
	dev := upTUN(t, "mtsplice0", 1500, "10.99.2.1/24")
	h := &spliceHandler{dst: ln.Addr().String(), done: make(chan spliceResult, 1)}
	s, err := New(dev, h, Config{}, zerolog.Nop())
	if err != nil {
		dev.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		dev.Close()
	})

	payload := make([]byte, 1<<20)
	rand.Read(payload)
	// Stalled long enough for the flow's receive memory to fill.
	got := slowUpstream(ln, 500*time.Millisecond)

	c, err := net.DialTimeout("tcp", "10.99.2.2:8080", 5*time.Second)
	if err != nil {
		t.Fatalf("dial through the TUN: %v", err)
	}
	defer c.Close()
	werr := make(chan error, 1)
	go func() {
		c.SetWriteDeadline(time.Now().Add(20 * time.Second))
		for off := 0; off < len(payload); off += 100 {
			if _, err := c.Write(payload[off:min(off+100, len(payload))]); err != nil {
				werr <- fmt.Errorf("write at %d: %w", off, err)
				return
			}
			// Paced: each write leaves as a segment of its own
			// instead of joining the previous one in the kernel.
			time.Sleep(20 * time.Microsecond)
		}
		werr <- c.(*net.TCPConn).CloseWrite()
	}()

	var res spliceResult
	select {
	case res = <-h.done:
	case <-time.After(20 * time.Second):
		t.Fatal("SpliceTo did not return")
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if res.srcErr != nil || res.dstErr != nil {
		t.Fatalf("SpliceTo: flow error %v, socket error %v", res.srcErr, res.dstErr)
	}
	if res.n != int64(len(payload)) {
		t.Errorf("SpliceTo moved %d bytes, want %d", res.n, len(payload))
	}
	b := <-got
	if sha256.Sum256(b) != sha256.Sum256(payload) {
		t.Fatalf("received %d bytes, not the %d sent", len(b), len(payload))
	}
	t.Logf("segments dropped for receive memory: %d", res.memDrops)
}

// slowUpstream accepts one connection on ln and reads it slowly: nothing
// for stall, then 32 KiB at most every 100 µs, until EOF, an error or 20 s.
// What it read arrives on the channel (nil if the accept failed).
func slowUpstream(ln net.Listener, stall time.Duration) <-chan []byte {
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		time.Sleep(stall)
		var b []byte
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			b = append(b, buf[:n]...)
			if err != nil {
				break
			}
			time.Sleep(100 * time.Microsecond)
		}
		got <- b
	}()
	return got
}

// countingRawConn counts the socket writes SpliceTo makes (one rc.Write
// per writev it issues, plus one per wait for a full socket).
type countingRawConn struct {
	syscall.RawConn
	writes int
}

func (c *countingRawConn) Write(f func(fd uintptr) bool) error {
	c.writes++
	return c.RawConn.Write(f)
}

// hookHandler accepts a flow, dials dst, runs before on the flow, splices
// it through a countingRawConn and reports the result and the writes.
type hookHandler struct {
	dst    string
	before func(*endpointConn) error
	done   chan hookResult
}

type hookResult struct {
	n              int64
	srcErr, dstErr error
	writes         int
	rcvBuf         int64 // the flow's receive buffer once SpliceTo returned
}

func (h *hookHandler) HandleTCP(r *TCPRequest) {
	c, err := r.Accept()
	if err != nil {
		h.done <- hookResult{srcErr: err}
		return
	}
	defer c.Close()
	ec := c.(*endpointConn)
	up, err := net.Dial("tcp", h.dst)
	if err != nil {
		h.done <- hookResult{dstErr: err}
		return
	}
	defer up.Close()
	rc, err := up.(*net.TCPConn).SyscallConn()
	if err != nil {
		h.done <- hookResult{dstErr: err}
		return
	}
	if h.before != nil {
		if err := h.before(ec); err != nil {
			h.done <- hookResult{srcErr: err}
			return
		}
	}
	crc := &countingRawConn{RawConn: rc}
	var res hookResult
	res.n, res.srcErr, res.dstErr = ec.SpliceTo(crc, func(int) {})
	res.writes = crc.writes
	res.rcvBuf = ec.ep.SocketOptions().GetReceiveBufferSize()
	up.(*net.TCPConn).CloseWrite()
	h.done <- res
}

func (h *hookHandler) HandleUDP(f *UDPFlow) { f.Close() }

// fastUpstream accepts one connection on ln and reads it to EOF.
func fastUpstream(ln net.Listener) <-chan []byte {
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		b, _ := io.ReadAll(c)
		got <- b
	}()
	return got
}

// spliceThrough sends payload from a gVisor peer with the given MTU
// through a flow h splices and returns h's result and what the upstream
// received.
func spliceThrough(t *testing.T, h *hookHandler, ln net.Listener, mtu int, payload []byte) (hookResult, []byte) {
	t.Helper()
	tnet := newPeerMTU(t, h, mtu)
	got := fastUpstream(ln)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := tnet.DialContext(ctx, "tcp", "192.0.2.10:8080")
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(payload); err != nil {
		t.Fatalf("write: %v", err)
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	var res hookResult
	select {
	case res = <-h.done:
	case <-time.After(20 * time.Second):
		t.Fatal("SpliceTo did not return")
	}
	if res.srcErr != nil || res.dstErr != nil {
		t.Fatalf("SpliceTo: flow error %v, socket error %v", res.srcErr, res.dstErr)
	}
	if res.n != int64(len(payload)) {
		t.Errorf("SpliceTo moved %d bytes, want %d", res.n, len(payload))
	}
	b := <-got
	if sha256.Sum256(b) != sha256.Sum256(payload) {
		t.Fatalf("upstream received %d bytes, not the %d sent", len(b), len(payload))
	}
	return res, b
}

// TestSpliceToBatchesQueuedSegments: segments queued in the flow when
// SpliceTo looks go to the socket in one writev, not one per segment
// (each writev costs a syscall, a socket lock and a push, and wakes the
// upstream's reader).
func TestSpliceToBatchesQueuedSegments(t *testing.T) {
	ln := listenRcvBuf(t, 0)
	payload := make([]byte, 6*60<<10) // 6+ segments of a 65,000-byte MTU
	rand.Read(payload)
	h := &hookHandler{dst: ln.Addr().String(), done: make(chan hookResult, 1)}
	h.before = func(ec *endpointConn) error {
		// Wait until the whole payload is queued in the flow.
		for deadline := time.Now().Add(10 * time.Second); ; {
			q, err := ec.ep.GetSockOptInt(tcpip.ReceiveQueueSizeOption)
			if err != nil {
				return fmt.Errorf("queue size: %s", err)
			}
			if q == len(payload) {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%d of %d bytes queued after 10 s", q, len(payload))
			}
			time.Sleep(time.Millisecond)
		}
	}
	res, _ := spliceThrough(t, h, ln, 65000, payload)
	// One write for the first read, which SpliceTo copies (a flow
	// starts as request/response), and one writev for the rest.
	if res.writes > 2 {
		t.Errorf("%d socket writes for %d bytes queued in %d+ segments, want at most 2", res.writes, len(payload), len(payload)/65000)
	}
}

// TestSpliceToGrowsReceiveBuffer: a flow whose upstream keeps up grows its
// receive buffer past the stack's default by gVisor's auto-tuning, which
// SpliceTo drives by reporting what it moves (nothing else reads the
// flow, so without the reports the buffer stays at the default).
func TestSpliceToGrowsReceiveBuffer(t *testing.T) {
	ln := listenRcvBuf(t, 0)
	payload := make([]byte, 32<<20)
	rand.Read(payload)
	h := &hookHandler{dst: ln.Addr().String(), done: make(chan hookResult, 1)}
	var initial int64
	h.before = func(ec *endpointConn) error {
		initial = ec.ep.SocketOptions().GetReceiveBufferSize()
		return nil
	}
	res, _ := spliceThrough(t, h, ln, 65000, payload)
	if initial != 1<<20 {
		t.Fatalf("receive buffer %d at the start, want the default %d", initial, 1<<20)
	}
	if res.rcvBuf <= initial {
		t.Errorf("receive buffer %d after 32 MiB spliced, want it grown past %d", res.rcvBuf, initial)
	}
}
