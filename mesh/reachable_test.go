package mesh

import (
	"context"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/rs/zerolog"
	wgnetstack "golang.zx2c4.com/wireguard/tun/netstack"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/netstack"
)

func TestReachableTable(t *testing.T) {
	r := newReachable()
	a := netip.MustParseAddrPort("10.0.0.1:80")
	b := netip.MustParseAddrPort("[fd00::1]:80")
	if r.known(a, "") {
		t.Fatal("an empty table knows a destination")
	}
	r.connected(a, "")
	if !r.known(a, "") || r.known(b, "") {
		t.Fatalf("after a's connect: known(a)=%v known(b)=%v, want true false", r.known(a, ""), r.known(b, ""))
	}
	if r.known(netip.MustParseAddrPort("10.0.0.1:81"), "") {
		t.Error("another port of a's address is known")
	}
	if r.known(a, "outbound|80||svc") {
		t.Error("a connect through the passthrough made a known through another cluster")
	}
	r.connected(a, "outbound|80||svc")
	r.failed(a, "PassthroughCluster")
	if !r.known(a, "outbound|80||svc") {
		t.Error("a failure through another cluster forgot a through its own")
	}
	r.failed(b, "") // b holds no slot: a stays
	if !r.known(a, "") {
		t.Error("a failure of another destination forgot a")
	}
	r.failed(a, "")
	if r.known(a, "") {
		t.Error("a is still known after its connect failed")
	}
	r.connected(a, "")
	r.epoch = r.epoch.Add(-reachableFor) // a's connect is now reachableFor old
	if r.known(a, "") {
		t.Error("a is still known reachableFor after its last connect")
	}

	// Two destinations in one slot: the last one connected holds it.
	var c netip.AddrPort
	for p := uint16(1); ; p++ {
		c = netip.AddrPortFrom(netip.MustParseAddr("10.0.0.2"), p)
		if r.slot(c, "") == r.slot(a, "") {
			break
		}
	}
	r.connected(a, "")
	r.connected(c, "")
	if r.known(a, "") || !r.known(c, "") {
		t.Errorf("after c took a's slot: known(a)=%v known(c)=%v, want false true", r.known(a, ""), r.known(c, ""))
	}

	var none *reachable
	none.connected(a, "")
	none.failed(a, "")
	if none.known(a, "") {
		t.Error("a nil table knows a destination")
	}
	if n := testing.AllocsPerRun(100, func() { r.connected(a, ""); r.known(a, "") }); n != 0 {
		t.Errorf("connected+known allocate %v times, want 0", n)
	}
}

// capturedPeer is a client TCP/IP stack whose connections are captured
// by a netstack.Stack running h.
func capturedPeer(t *testing.T, h netstack.Handler) *wgnetstack.Net {
	t.Helper()
	dev, tnet, err := wgnetstack.CreateNetTUN([]netip.Addr{netip.MustParseAddr("10.0.0.2")}, nil, 1500)
	if err != nil {
		t.Fatal(err)
	}
	s, err := netstack.New(dev, h, netstack.Config{}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Close()
		dev.Close()
	})
	return tnet
}

// echoOnce connects through tnet to dst, sends a message and wants it back.
func echoOnce(t *testing.T, tnet *wgnetstack.Net, dst string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := tnet.DialContext(ctx, "tcp", dst)
	if err != nil {
		t.Fatalf("connect to %s: %v, want an echo", dst, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatalf("write to %s: %v", dst, err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo from %s: %q %v, want ping", dst, buf, err)
	}
}

// refusedConnect connects through tnet to dst and wants it refused (a RST
// answering the SYN: the upstream was dialed, and failed, first).
func refusedConnect(t *testing.T, tnet *wgnetstack.Net, dst string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := tnet.DialContext(ctx, "tcp", dst)
	if err == nil {
		c.Close()
		t.Fatalf("connect to %s succeeded, want refused", dst)
	}
	if !strings.Contains(err.Error(), "refused") {
		t.Fatalf("connect to %s: %v, want refused", dst, err)
	}
}

// acceptedThenReset connects through tnet to dst and wants the
// connection accepted, then reset (accepted before a failed dial). The
// reset may come before the client's connect has returned, which then
// reports it; what must not come is a refusal (a RST answering the SYN).
func acceptedThenReset(t *testing.T, tnet *wgnetstack.Net, dst string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := tnet.DialContext(ctx, "tcp", dst)
	if err != nil {
		if !strings.Contains(err.Error(), "reset") {
			t.Fatalf("connect to %s: %v, want accepted, then reset (the destination was reached a moment ago)", dst, err)
		}
		return
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if err == nil || !strings.Contains(err.Error(), "reset") {
		t.Fatalf("read from %s: %d bytes, %v, want a reset", dst, n, err)
	}
}

// closedPort is a loopback address nothing listens on.
func closedPort(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	return a
}

// TestPassthroughOptimisticAccept: an outbound flow to a destination never
// reached is dialed before its handshake (a closed port stays refused,
// every time); one to a destination reached a moment ago is accepted
// while it is dialed, and reset when that dial fails, after which the
// destination is dialed first again.
func TestPassthroughOptimisticAccept(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	xdstest.ServeConns(t, ln, func(c net.Conn) { io.Copy(c, c) })
	echo := netip.MustParseAddrPort(ln.Addr().String())
	closed := closedPort(t)

	const good, never = "192.0.2.10:80", "192.0.2.11:80"
	var goodUp atomic.Pointer[netip.AddrPort] // where good's flows go
	goodUp.Store(&echo)
	var hold atomic.Pointer[chan struct{}] // when set, good's dial waits for it
	p := NewPassthrough(PassthroughOptions{Dialer: &upstream.Dialer{}})
	p.dial = func(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error) {
		to := closed
		if dst == netip.MustParseAddrPort(good) {
			to = *goodUp.Load()
			if ch := hold.Load(); ch != nil {
				<-*ch
			}
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", to.String())
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
	tnet := capturedPeer(t, p)

	// Never reached, and refused each time: nothing is learnt from a failure.
	refusedConnect(t, tnet, never)
	refusedConnect(t, tnet, never)

	echoOnce(t, tnet, good) // dialed first, and now known
	if !p.reach.known(netip.MustParseAddrPort(good), "") {
		t.Fatal("a destination just reached is not known")
	}
	// Known: the client's connect completes while the dial is held back
	// (dialing first, it would wait for the dial and time out).
	release := make(chan struct{})
	hold.Store(&release)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	c, err := tnet.DialContext(ctx, "tcp", good)
	cancel()
	if err != nil {
		t.Fatalf("connect to a known destination with its dial held: %v, want accepted before the dial", err)
	}
	hold.Store(nil)
	close(release)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 4)
	if _, err := c.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("echo through an optimistically accepted flow: %q %v", buf, err)
	}
	c.Close()

	// The known destination now refuses: accepted, then reset (as Envoy
	// does), and forgotten, so the next connect is refused again.
	goodUp.Store(&closed)
	acceptedThenReset(t, tnet, good)
	if p.reach.known(netip.MustParseAddrPort(good), "") {
		t.Fatal("a destination whose dial failed is still known")
	}
	refusedConnect(t, tnet, good)
}

// TestServeFlowOptimisticAccept: the same through a listener's tcp_proxy
// (the captured flow's original destination is remembered): dial first
// until the destination's upstream was connected, then accept first, and
// a failed connect resets the flow and makes the next one dial first.
func TestServeFlowOptimisticAccept(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	xdstest.ServeConns(t, ln, func(c net.Conn) { io.Copy(c, c) })
	echo := netip.MustParseAddrPort(ln.Addr().String())

	l := xdstest.TCPListener(t, "l", "0.0.0.0", 9000, "echo", false)
	cl := xdstest.StaticCluster("echo", echo)
	cl.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{MaxConnections: wrapperspb.UInt32(1)}}}
	s, err := Build("1", []*listenerv3.Listener{l}, []*clusterv3.Cluster{cl}, nil, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Retire(nil)
	d := NewDispatcher(DispatcherOptions{})
	d.Swap(s)
	tnet := capturedPeer(t, netstack.HandlerFuncs{TCP: func(req *netstack.TCPRequest) {
		var e accesslog.Entry
		serveFlow(s, s.Listener("l"), captured{req: req}, &e, d)
	}})

	// The cluster allows one connection at a time: each flow's slot is
	// waited for to be free again before the next one.
	res := s.Cluster("echo").Resources(cluster.PriorityDefault)
	connections := func(n int64) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); res.Connections() != n; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the cluster has %d connections, want %d", res.Connections(), n)
			}
		}
	}

	const vip = "10.96.0.1:9000"
	echoOnce(t, tnet, vip)
	if !d.reach.known(netip.MustParseAddrPort(vip), "echo") {
		t.Fatal("a destination whose upstream was just connected is not known")
	}
	connections(0)
	echoOnce(t, tnet, vip)
	connections(0)

	// A full circuit breaker (max_connections 1, held by c) is still a
	// refused connect for a known destination: no optimistic accept then.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := tnet.DialContext(ctx, "tcp", vip)
	if err != nil {
		t.Fatal(err)
	}
	connections(1)
	refusedConnect(t, tnet, vip)
	c.Close()
	connections(0)
	// An overflow is the proxy's own refusal, not the destination's: it
	// stays known.
	if !d.reach.known(netip.MustParseAddrPort(vip), "echo") {
		t.Fatal("an overflow made the destination unknown")
	}

	ln.Close() // the cluster's endpoint now refuses
	acceptedThenReset(t, tnet, vip)
	if d.reach.known(netip.MustParseAddrPort(vip), "echo") {
		t.Fatal("a destination whose connect failed is still known")
	}
	refusedConnect(t, tnet, vip)
}

// TestAcceptWhileDialingSpare: the goroutine that dialed is the one that
// runs the function handed to its spare (the splice's second direction),
// and a released spare runs nothing and ends (the package's leak check
// fails on a goroutine left parked).
func TestAcceptWhileDialingSpare(t *testing.T) {
	var dialG uint64
	_, up, sp, aerr, derr := acceptWhileDialing(
		func() (int, error) { return 1, nil },
		func() (int, error) { dialG = goroutineID(); return 2, nil })
	if aerr != nil || derr != nil || up != 2 {
		t.Fatalf("accept %v, dial %v (%d)", aerr, derr, up)
	}
	ran := make(chan uint64, 1)
	sp.run(func() { ran <- goroutineID() })
	select {
	case g := <-ran:
		if g != dialG || g == goroutineID() {
			t.Errorf("spare ran on goroutine %d, want the dialing goroutine %d", g, dialG)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("spare did not run its function")
	}

	_, _, sp, _, derr = acceptWhileDialing(
		func() (int, error) { return 1, nil },
		func() (int, error) { return 0, io.ErrUnexpectedEOF })
	if derr != io.ErrUnexpectedEOF {
		t.Fatalf("dial error %v, want the dial's own", derr)
	}
	sp.release()
}

// goroutineID is the calling goroutine's number, from its stack header.
func goroutineID() uint64 {
	var b [64]byte
	s := strings.TrimPrefix(string(b[:runtime.Stack(b[:], false)]), "goroutine ")
	id, _ := strconv.ParseUint(s[:strings.IndexByte(s, ' ')], 10, 64)
	return id
}
