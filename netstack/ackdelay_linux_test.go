package netstack

import (
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/netnstest"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// countingDev counts the packets the link writes to the device.
type countingDev struct {
	wgtun.Device
	packets atomic.Int64
}

func (d *countingDev) Write(bufs [][]byte, offset int) (int, error) {
	d.packets.Add(int64(len(bufs)))
	return d.Device.Write(bufs, offset)
}

// exchangeHandler serves each flow with a fixed exchange: read reqLen
// bytes, answer with respLen bytes, until EOF.
type exchangeHandler struct{ reqLen, respLen int }

func (h exchangeHandler) HandleTCP(r *TCPRequest) {
	c, err := r.Accept()
	if err != nil {
		return
	}
	defer c.Close()
	req, resp := make([]byte, h.reqLen), make([]byte, h.respLen)
	for {
		if _, err := io.ReadFull(c, req); err != nil {
			return
		}
		if _, err := c.Write(resp); err != nil {
			return
		}
	}
}

func (exchangeHandler) HandleUDP(f *UDPFlow) { f.Close() }

// tunStack runs a Stack serving h on a real TUN (the raw virtio-net
// path) in a fresh namespace, and returns a kernel TCP connection to it.
func tunStack(t testing.TB, h Handler) (*Stack, *countingDev, *net.TCPConn) {
	t.Helper()
	netnstest.Enter(t)
	tdev := upTUN(t, "mtack0", 65535, "10.98.0.1/24")
	dev := &countingDev{Device: tdev}
	s, err := New(dev, h, Config{}, zerolog.Nop())
	if err != nil {
		tdev.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		tdev.Close()
	})
	if s.link.raw == nil {
		t.Fatal("the link does not use the raw virtio-net path on a vnet TUN")
	}
	c, err := net.DialTimeout("tcp", "10.98.0.2:7", 5*time.Second)
	if err != nil {
		t.Fatalf("dial through the TUN: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return s, dev, c.(*net.TCPConn)
}

func retransmits(t testing.TB, c *net.TCPConn) uint32 {
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var ierr error
	rc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if ierr != nil {
		t.Fatalf("TCP_INFO: %v", ierr)
	}
	return info.Total_retrans
}

// TestAckDelayNagleDoesNotStall: a kernel client with Nagle on writes each
// request in two pieces; Nagle sends the second only once the first is
// acknowledged, and the server answers only the whole request, so no
// response can carry that ACK: the hold timer must send it. Every
// exchange completes, not through the client's retransmission timer
// (which is what a never-sent ACK would come down to), and the timer is
// what wrote the ACKs. The log line gives the time per exchange: about
// 1.2 ms on an idle machine (Go's poller sleeps in whole milliseconds).
func TestAckDelayNagleDoesNotStall(t *testing.T) {
	const rounds = 100
	s, _, c := tunStack(t, exchangeHandler{reqLen: 100, respLen: 8})
	if err := c.SetNoDelay(false); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	piece, resp := make([]byte, 50), make([]byte, 8)
	start := time.Now()
	for i := 0; i < rounds; i++ {
		if _, err := c.Write(piece); err != nil {
			t.Fatalf("round %d: write: %v", i, err)
		}
		if _, err := c.Write(piece); err != nil {
			t.Fatalf("round %d: write: %v", i, err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			t.Fatalf("round %d: read: %v", i, err)
		}
	}
	elapsed := time.Since(start)
	acks := s.link.acks
	t.Logf("%d Nagle'd exchanges in %v (%v each); ACKs held %d, superseded %d, written by the timer %d",
		rounds, elapsed, elapsed/rounds, acks.held.Load(), acks.superseded.Load(), acks.expired.Load())
	// Without the timer every round would wait for a retransmission
	// (RTO ≥ 200 ms); a few may come from a starved, loaded machine.
	if n := retransmits(t, c); n > rounds/10 {
		t.Errorf("the client retransmitted %d segments in %d rounds: ACKs were not sent", n, rounds)
	}
	if got := acks.expired.Load(); got < rounds/2 {
		t.Errorf("the hold timer wrote %d ACKs over %d exchanges whose first piece only the timer can acknowledge", got, rounds)
	}
}

// TestAckDelayRequestResponse: on a request/response flow the request's
// ACK rides on the response, so the link writes fewer packets than two
// per exchange (gVisor alone writes the ACK and the response).
func TestAckDelayRequestResponse(t *testing.T) {
	const rounds = 200
	s, dev, c := tunStack(t, exchangeHandler{reqLen: 64, respLen: 64})
	c.SetDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 64)
	before := dev.packets.Load()
	for i := 0; i < rounds; i++ {
		if _, err := c.Write(buf); err != nil {
			t.Fatalf("round %d: write: %v", i, err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("round %d: read: %v", i, err)
		}
	}
	written := dev.packets.Load() - before
	acks := s.link.acks
	t.Logf("%d exchanges: %d packets written (%.2f each); ACKs held %d, superseded %d, by the timer %d",
		rounds, written, float64(written)/rounds, acks.held.Load(), acks.superseded.Load(), acks.expired.Load())
	if acks.superseded.Load() == 0 {
		t.Error("no held ACK rode on a response")
	}
	if written >= 2*rounds {
		t.Errorf("%d packets written for %d exchanges: the ACKs were not coalesced", written, rounds)
	}
	if n := retransmits(t, c); n > rounds/10 {
		t.Errorf("the client retransmitted %d segments in %d rounds", n, rounds)
	}
}

// BenchmarkTUNRequestResponse: 64-byte exchanges from a kernel socket
// through the TUN; reports the packets the link writes per exchange.
func BenchmarkTUNRequestResponse(b *testing.B) {
	_, dev, c := tunStack(b, exchangeHandler{reqLen: 64, respLen: 64})
	buf := make([]byte, 64)
	before := dev.packets.Load()
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(dev.packets.Load()-before)/float64(b.N), "tunpkts/op")
}
