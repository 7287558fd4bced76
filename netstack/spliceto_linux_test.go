package netstack

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	wgnetstack "golang.zx2c4.com/wireguard/tun/netstack"
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
	res.n, res.srcErr, res.dstErr = c.(*endpointConn).SpliceTo(rc, func(int) { res.calls++ })
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
// large and in small writes.
func TestSpliceToSocket(t *testing.T) {
	for _, tc := range []struct {
		name  string
		mtu   int
		write int
		size  int
	}{
		{"mtu1500", 1500, 256 << 10, 6 << 20},
		{"mtu65000", 65000, 256 << 10, 6 << 20},
		// 5,243 writes of 100 bytes: many small segments in a row, few
		// enough for a loaded machine under -race (6 MiB of them took
		// over 20 s there).
		{"smallWrites", 65000, 100, 512 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			h := &spliceHandler{dst: ln.Addr().String(), done: make(chan spliceResult, 1)}
			tnet := newPeerMTU(t, h, tc.mtu)

			payload := make([]byte, tc.size)
			rand.Read(payload)
			got := make(chan []byte, 1)
			go func() {
				c, err := ln.Accept()
				if err != nil {
					got <- nil
					return
				}
				defer c.Close()
				c.SetReadDeadline(time.Now().Add(20 * time.Second))
				// A slow reader: the proxy's socket fills up.
				time.Sleep(100 * time.Millisecond)
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
			b := <-got
			if sha256.Sum256(b) != sha256.Sum256(payload) {
				t.Fatalf("received %d bytes, not the %d sent", len(b), len(payload))
			}
		})
	}
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
