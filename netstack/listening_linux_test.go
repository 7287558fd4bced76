package netstack

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// listenOn opens a TCP listener in the test's own network namespace;
// v6only sets IPV6_V6ONLY on an IPv6 socket.
func listenOn(t *testing.T, network, addr string, v6only bool) (net.Listener, uint16) {
	t.Helper()
	lc := net.ListenConfig{}
	if v6only {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IPV6, syscall.IPV6_V6ONLY, 1)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	l, err := lc.Listen(t.Context(), network, addr)
	if err != nil {
		t.Fatalf("listen %s %s: %v", network, addr, err)
	}
	t.Cleanup(func() { l.Close() })
	return l, uint16(l.Addr().(*net.TCPAddr).Port)
}

// TestListenProbeKernel: the probe finds what the kernel's SYN lookup
// would: a listener on its exact address, a wildcard of the family, a
// dual-stack "::" for IPv4 too unless IPV6_V6ONLY; not a listener on
// another address, not a closed port, not a connected socket's port.
func TestListenProbeKernel(t *testing.T) {
	p := NewListenProbe(zerolog.Nop())
	_, lo4 := listenOn(t, "tcp4", "127.0.0.1:0", false)
	_, any4 := listenOn(t, "tcp4", "0.0.0.0:0", false)
	_, lo6 := listenOn(t, "tcp6", "[::1]:0", false)
	_, dual := listenOn(t, "tcp", "[::]:0", false)
	_, only6 := listenOn(t, "tcp6", "[::]:0", true)
	closedL, closed := listenOn(t, "tcp4", "127.0.0.1:0", false)
	closedL.Close()
	// A connection's own local port is not a listener.
	srv, srvPort := listenOn(t, "tcp4", "127.0.0.1:0", false)
	cli, err := net.Dial("tcp4", srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	cliPort := uint16(cli.LocalAddr().(*net.TCPAddr).Port)

	at := func(a string, port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr(a), port) }
	for _, c := range []struct {
		name string
		dst  netip.AddrPort
		want bool
	}{
		{"127.0.0.1 listener, its address", at("127.0.0.1", lo4), true},
		{"127.0.0.1 listener, IPv4-mapped", at("::ffff:127.0.0.1", lo4), true},
		{"127.0.0.1 listener, another address", at("127.0.0.2", lo4), false},
		{"127.0.0.1 listener, ::1", at("::1", lo4), false},
		{"0.0.0.0 listener, 127.0.0.1", at("127.0.0.1", any4), true},
		{"0.0.0.0 listener, 127.0.0.2", at("127.0.0.2", any4), true},
		{"0.0.0.0 listener, ::1", at("::1", any4), false},
		{"::1 listener, its address", at("::1", lo6), true},
		{"::1 listener, 127.0.0.1", at("127.0.0.1", lo6), false},
		{"dual-stack :: listener, ::1", at("::1", dual), true},
		{"dual-stack :: listener, 127.0.0.1", at("127.0.0.1", dual), true},
		{"v6only :: listener, ::1", at("::1", only6), true},
		{"v6only :: listener, 127.0.0.1", at("127.0.0.1", only6), false},
		{"closed port", at("127.0.0.1", closed), false},
		{"a client socket's port", at("127.0.0.1", cliPort), false},
		{"a server's port (it listens)", at("127.0.0.1", srvPort), true},
	} {
		got, known := p.Listening(c.dst)
		if !known || got != c.want {
			t.Errorf("%s (%v): listening %v known %v, want %v known", c.name, c.dst, got, known, c.want)
		}
	}
	if n := p.Failures(); n != 0 {
		t.Errorf("%d probes failed", n)
	}
}

// fakeClock is a settable monotonic clock for the cache tests.
type fakeClock struct{ ns int64 }

func (c *fakeClock) now() int64 { return c.ns }

// TestListenProbeCache: a positive answer is reused for its TTL and then
// asked again (the listener closed in between is then found closed); a
// negative answer is never reused (a listener opened since is found at
// once).
func TestListenProbeCache(t *testing.T) {
	clk := &fakeClock{ns: 1}
	asks := 0
	p := newListenProbe(zerolog.Nop(), time.Second, clk.now, func(d netip.AddrPort) (bool, error) {
		asks++
		return listeningOS(d)
	})
	l, port := listenOn(t, "tcp4", "127.0.0.1:0", false)
	dst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	if ok, known := p.Listening(dst); !ok || !known || asks != 1 {
		t.Fatalf("open port: %v %v after %d asks, want listening after 1", ok, known, asks)
	}
	l.Close()
	clk.ns += int64(999 * time.Millisecond)
	if ok, _ := p.Listening(dst); !ok || asks != 1 {
		t.Fatalf("within the TTL: listening %v after %d asks, want the cached yes (1 ask)", ok, asks)
	}
	clk.ns += int64(time.Millisecond)
	if ok, known := p.Listening(dst); ok || !known || asks != 2 {
		t.Fatalf("TTL over, listener closed: listening %v known %v after %d asks, want a fresh no", ok, known, asks)
	}
	if ok, _ := p.Listening(dst); ok || asks != 3 {
		t.Fatalf("closed again: %v after %d asks, want no, asked again (no negative cache)", ok, asks)
	}
	l2, err := net.Listen("tcp4", dst.String())
	if err != nil {
		t.Fatalf("re-listen on %v: %v", dst, err)
	}
	defer l2.Close()
	if ok, _ := p.Listening(dst); !ok || asks != 4 {
		t.Fatalf("listening again: %v after %d asks, want yes at once", ok, asks)
	}
	// Another destination in the cache does not answer for this one.
	other := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), port)
	if ok, _ := p.Listening(other); ok {
		t.Fatalf("%v answered from %v's cache entry", other, dst)
	}
}

// TestListenProbeFailure: a probe that cannot tell says so (the caller
// then accepts before dialing), counts it, and warns once a minute, not
// once per flow.
func TestListenProbeFailure(t *testing.T) {
	clk := &fakeClock{ns: 1}
	var logs bytes.Buffer
	p := newListenProbe(zerolog.New(&logs), time.Second, clk.now, func(netip.AddrPort) (bool, error) {
		return false, errors.New("netlink: permission denied")
	})
	dst := netip.MustParseAddrPort("10.1.0.5:80")
	for range 100 {
		if ok, known := p.Listening(dst); ok || known {
			t.Fatalf("failed probe: %v %v, want unknown", ok, known)
		}
	}
	clk.ns += int64(time.Minute)
	p.Listening(dst)
	if n := p.Failures(); n != 101 {
		t.Errorf("failures %d, want 101", n)
	}
	lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "permission denied") || !strings.Contains(lines[1], `"failures":101`) {
		t.Errorf("warnings: %q, want 2 (the first failure, then one a minute later counting 101)", lines)
	}
	var nilProbe *ListenProbe
	if ok, known := nilProbe.Listening(dst); ok || known {
		t.Errorf("nil probe: %v %v, want unknown", ok, known)
	}
}

// BenchmarkListenProbe is the cost of the check per inbound SYN headed
// for its original destination: "open" is a listening port (the cache
// answers, no syscall), "closed" a port nothing listens on (one netlink
// round trip per SYN: what a flood at a closed port costs).
func BenchmarkListenProbe(b *testing.B) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	open := l.Addr().(*net.TCPAddr).AddrPort()
	l2, _ := net.Listen("tcp4", "127.0.0.1:0")
	closed := l2.Addr().(*net.TCPAddr).AddrPort()
	l2.Close()
	defer l.Close()
	for _, c := range []struct {
		name string
		dst  netip.AddrPort
		want bool
	}{{"open", open, true}, {"closed", closed, false}} {
		b.Run(c.name, func(b *testing.B) {
			p := NewListenProbe(zerolog.Nop())
			b.ReportAllocs()
			for b.Loop() {
				if ok, known := p.Listening(c.dst); ok != c.want || !known {
					b.Fatalf("%v: %v %v", c.dst, ok, known)
				}
			}
		})
	}
}

// TestListenProbeConcurrent: probes on many goroutines at once, sharing
// the pooled netlink sockets, each get their own answer.
func TestListenProbeConcurrent(t *testing.T) {
	_, open := listenOn(t, "tcp4", "127.0.0.1:0", false)
	closedL, closed := listenOn(t, "tcp4", "127.0.0.1:0", false)
	closedL.Close()
	lo := netip.MustParseAddr("127.0.0.1")
	errs := make(chan error, 8)
	for g := range 8 {
		go func() {
			// No cache: every call asks the kernel.
			p := newListenProbe(zerolog.Nop(), 0, monotonicNow, listeningOS)
			for i := range 200 {
				port, want := open, true
				if (g+i)%2 == 1 {
					port, want = closed, false
				}
				if ok, known := p.Listening(netip.AddrPortFrom(lo, port)); ok != want || !known {
					errs <- fmt.Errorf("goroutine %d probe %d of port %d: %v %v, want %v", g, i, port, ok, known, want)
					return
				}
			}
			errs <- nil
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}
