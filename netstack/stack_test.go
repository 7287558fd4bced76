package netstack

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	wgnetstack "golang.zx2c4.com/wireguard/tun/netstack"
)

var (
	clientV4 = netip.MustParseAddr("10.0.0.2")
	clientV6 = netip.MustParseAddr("fd00::2")
)

// newPeer returns a client TCP/IP stack whose packets are terminated by a
// Stack running h. wireguard-go's userspace TUN is the client: what it
// "sends" is what our stack reads, and what our stack writes it receives.
func newPeer(t *testing.T, h Handler, cfg Config) (*wgnetstack.Net, *Stack) {
	t.Helper()
	dev, tnet, err := wgnetstack.CreateNetTUN([]netip.Addr{clientV4, clientV6}, nil, 1500)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(dev, h, cfg, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		dev.Close()
	})
	return tnet, s
}

// echoTCP accepts every flow and echoes it, recording the flow IDs.
type echoTCP struct {
	mu  sync.Mutex
	ids []FlowID
}

func (e *echoTCP) HandleTCP(r *TCPRequest) {
	e.mu.Lock()
	e.ids = append(e.ids, r.ID)
	e.mu.Unlock()
	c, err := r.Accept()
	if err != nil {
		return
	}
	defer c.Close()
	io.Copy(c, c)
	c.CloseWrite()
}

func (e *echoTCP) HandleUDP(f *UDPFlow) { f.Close() }

func TestTCPOriginalAddressesAndEcho(t *testing.T) {
	for _, dst := range []string{"192.0.2.10:8080", "[2001:db8::10]:443"} {
		t.Run(dst, func(t *testing.T) {
			h := &echoTCP{}
			tnet, _ := newPeer(t, h, Config{})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := tnet.DialContext(ctx, "tcp", dst)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			payload := make([]byte, 1<<20)
			rand.Read(payload)
			go func() {
				c.Write(payload)
				c.(interface{ CloseWrite() error }).CloseWrite()
			}()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if sha256.Sum256(got) != sha256.Sum256(payload) {
				t.Fatalf("echo mismatch: %d bytes back of %d", len(got), len(payload))
			}
			h.mu.Lock()
			defer h.mu.Unlock()
			if len(h.ids) != 1 {
				t.Fatalf("handler saw %d flows, want 1", len(h.ids))
			}
			id := h.ids[0]
			if id.Dst != netip.MustParseAddrPort(dst) {
				t.Errorf("handler Dst = %v, want original %v", id.Dst, dst)
			}
			local := netip.MustParseAddrPort(c.LocalAddr().String())
			if id.Src != local {
				t.Errorf("handler Src = %v, want the client's %v", id.Src, local)
			}
		})
	}
}

func TestTCPRefuseSendsReset(t *testing.T) {
	tnet, _ := newPeer(t, HandlerFuncs{}, Config{}) // nil TCP func refuses
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	_, err := tnet.DialContext(ctx, "tcp", "192.0.2.1:80")
	if err == nil {
		t.Fatal("dial succeeded, want refused")
	}
	if !strings.Contains(err.Error(), "refused") {
		t.Fatalf("dial error = %v, want connection refused", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("refusal took %v, want an immediate RST", d)
	}
}

func TestTCPHalfCloseAndReset(t *testing.T) {
	reply := bytes.Repeat([]byte("r"), 256<<10)
	h := HandlerFuncs{TCP: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		switch r.ID.Dst.Port() {
		case 1: // read the request to EOF, then answer and close
			io.Copy(io.Discard, c)
			c.Write(reply)
			c.Close()
		case 2: // reset after the first bytes
			buf := make([]byte, 1)
			c.Read(buf)
			c.Reset()
		}
	}}
	tnet, _ := newPeer(t, h, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	c, err := tnet.DialContext(ctx, "tcp", "192.0.2.1:1")
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("request"))
	c.(interface{ CloseWrite() error }).CloseWrite()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, reply) {
		t.Fatalf("half-close: got %d bytes, err %v; want %d bytes then EOF", len(got), err, len(reply))
	}
	c.Close()

	c, err = tnet.DialContext(ctx, "tcp", "192.0.2.1:2")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("x"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 10))
	if err == nil || !strings.Contains(err.Error(), "reset") {
		t.Fatalf("after server reset: read err = %v, want connection reset", err)
	}
}

func TestConnErrorsAreTyped(t *testing.T) {
	gotErr := make(chan error, 1)
	h := HandlerFuncs{TCP: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			gotErr <- err
			return
		}
		defer c.Close()
		c.Write([]byte("unread"))
		buf := make([]byte, 100)
		for {
			if _, err := c.Read(buf); err != nil {
				gotErr <- err
				return
			}
		}
	}}
	tnet, _ := newPeer(t, h, Config{})
	c, err := tnet.Dial("tcp", "192.0.2.1:3")
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("hello"))
	// Closing with unread data in the receive queue aborts with a RST
	// (RFC 2525 §2.17), which gVisor's client implements.
	time.Sleep(100 * time.Millisecond)
	c.Close()
	select {
	case err := <-gotErr:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("read after client reset: %v, want errors.Is ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("handler never saw the client's reset")
	}
}

func TestReadDeadline(t *testing.T) {
	errc := make(chan error, 1)
	h := HandlerFuncs{TCP: func(r *TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		_, err = c.Read(make([]byte, 1))
		errc <- err
	}}
	tnet, _ := newPeer(t, h, Config{})
	c, err := tnet.Dial("tcp", "192.0.2.1:4")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case err := <-errc:
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("read past deadline: %v, want a timeout net.Error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("deadline did not fire")
	}
}

func TestUDPFlowsAndIdleTimeout(t *testing.T) {
	var flows atomic.Int32
	ids := make(chan FlowID, 10)
	ended := make(chan error, 10)
	h := HandlerFuncs{UDP: func(f *UDPFlow) {
		flows.Add(1)
		ids <- f.ID
		buf := make([]byte, 65535)
		for {
			n, err := f.ReadPacket(buf)
			if err != nil {
				ended <- err
				return
			}
			f.WritePacket(buf[:n])
		}
	}}
	tnet, _ := newPeer(t, h, Config{UDPIdleTimeout: 300 * time.Millisecond})
	for _, dst := range []string{"192.0.2.53:53", "[2001:db8::53]:53"} {
		raddr := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(dst))
		c, err := tnet.DialUDPAddrPort(netip.AddrPort{}, raddr.AddrPort())
		if err != nil {
			t.Fatal(err)
		}
		for _, size := range []int{60, 8 << 10} {
			msg := make([]byte, size)
			rand.Read(msg)
			if _, err := c.Write(msg); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			got := make([]byte, 65535)
			n, err := c.Read(got)
			if err != nil || !bytes.Equal(got[:n], msg) {
				t.Fatalf("%s: %d-byte datagram: got %d bytes, err %v", dst, size, n, err)
			}
		}
		id := <-ids
		if id.Dst != netip.MustParseAddrPort(dst) {
			t.Fatalf("flow Dst = %v, want %v", id.Dst, dst)
		}
		select {
		case err := <-ended:
			if !errors.Is(err, ErrIdleTimeout) {
				t.Fatalf("flow ended with %v, want ErrIdleTimeout", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("idle flow never ended")
		}
		c.Close()
	}
	if got := flows.Load(); got != 2 {
		t.Fatalf("handler saw %d UDP flows, want 2 (one per 4-tuple)", got)
	}
}

func TestConfigValidation(t *testing.T) {
	dev, _, err := wgnetstack.CreateNetTUN([]netip.Addr{clientV4}, nil, 1500)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if _, err := New(dev, HandlerFuncs{}, Config{MTU: 500}, zerolog.Nop()); err == nil || !strings.Contains(err.Error(), "MTU 500") {
		t.Fatalf("New with MTU 500: %v, want an error naming the MTU", err)
	}
	if _, err := New(dev, HandlerFuncs{}, Config{SynAckRetries: 9}, zerolog.Nop()); err == nil || !strings.Contains(err.Error(), "SynAckRetries 9") {
		t.Fatalf("New with SynAckRetries 9: %v, want an error naming the field", err)
	}
	if _, err := New(dev, nil, Config{}, zerolog.Nop()); err == nil {
		t.Fatal("New with nil handler succeeded")
	}
}
