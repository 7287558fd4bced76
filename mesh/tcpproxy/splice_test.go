package tcpproxy

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/testpki"
)

// pair returns the two ends of a loopback TCP connection.
func pair(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-acc
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// proxied sets up client ⇄ [down|Splice|up] ⇄ server and returns the
// client and server ends plus the channel delivering Splice's result.
func proxied(t testing.TB, idle time.Duration) (client, server *net.TCPConn, res <-chan Result) {
	client, down := pair(t)
	up, server := pair(t)
	ch := make(chan Result, 1)
	go func() { ch <- Splice(down, up, idle) }()
	return client, server, ch
}

func waitResult(t *testing.T, ch <-chan Result) Result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("Splice did not return")
	}
	return Result{}
}

func TestSpliceHalfCloseBothWays(t *testing.T) {
	client, server, res := proxied(t, 0)
	req := make([]byte, 300<<10)
	rand.Read(req)
	reply := make([]byte, 1<<20)
	rand.Read(reply)

	go func() {
		client.Write(req)
		client.CloseWrite() // request done; still reading the reply
	}()
	server.SetDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(server)
	if err != nil || !bytes.Equal(got, req) {
		t.Fatalf("server got %d bytes (err %v), want the %d-byte request then EOF", len(got), err, len(req))
	}
	server.Write(reply)
	server.Close()

	client.SetDeadline(time.Now().Add(5 * time.Second))
	back, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(back, reply) {
		t.Fatalf("client got %d bytes (err %v), want the %d-byte reply then EOF", len(back), err, len(reply))
	}
	r := waitResult(t, res)
	if r.Received != int64(len(req)) || r.Sent != int64(len(reply)) {
		t.Fatalf("counted received=%d sent=%d, want %d and %d", r.Received, r.Sent, len(req), len(reply))
	}
	if r.ResponseFlags() != "-" {
		t.Fatalf("flags %q, want -", r.ResponseFlags())
	}
}

func TestSpliceUpstreamResetReachesClient(t *testing.T) {
	client, server, res := proxied(t, 0)
	client.Write([]byte("hi"))
	buf := make([]byte, 2)
	server.SetDeadline(time.Now().Add(5 * time.Second))
	io.ReadFull(server, buf)
	server.SetLinger(0)
	server.Close() // RST

	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := client.Read(make([]byte, 10))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read after upstream reset: %v, want ECONNRESET", err)
	}
	if r := waitResult(t, res); !r.UpstreamReset || r.ResponseFlags() != "UR" {
		t.Fatalf("result %+v, want UpstreamReset (UR)", r)
	}
}

func TestSpliceDownstreamResetReachesServer(t *testing.T) {
	client, server, res := proxied(t, 0)
	client.Write([]byte("hi"))
	buf := make([]byte, 2)
	server.SetDeadline(time.Now().Add(5 * time.Second))
	io.ReadFull(server, buf)
	client.SetLinger(0)
	client.Close()

	_, err := server.Read(make([]byte, 10))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("server read after client reset: %v, want ECONNRESET", err)
	}
	if r := waitResult(t, res); !r.DownstreamReset {
		t.Fatalf("result %+v, want DownstreamReset", r)
	}
}

func TestSpliceIdleTimeout(t *testing.T) {
	client, server, res := proxied(t, 200*time.Millisecond)
	client.Write([]byte("x"))
	server.SetDeadline(time.Now().Add(5 * time.Second))
	io.ReadFull(server, make([]byte, 1))
	r := waitResult(t, res)
	if !r.IdleTimeout || r.ResponseFlags() != "IT" {
		t.Fatalf("result %+v, want IdleTimeout", r)
	}
	// Both peers see the connection end.
	if _, err := server.Read(make([]byte, 1)); err == nil {
		t.Fatal("server connection still open after idle timeout")
	}
	client.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Fatal("client connection still open after idle timeout")
	}
}

func TestSpliceActivityDefersIdleTimeout(t *testing.T) {
	client, server, res := proxied(t, 300*time.Millisecond)
	server.SetDeadline(time.Now().Add(5 * time.Second))
	// Traffic every 100 ms for 1 s keeps the flow alive past 3 idle periods.
	for i := 0; i < 10; i++ {
		client.Write([]byte("x"))
		if _, err := io.ReadFull(server, make([]byte, 1)); err != nil {
			t.Fatalf("round %d: %v (closed while active)", i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case r := <-res:
		t.Fatalf("splice ended while active: %+v", r)
	default:
	}
	client.Close()
	server.Close()
	waitResult(t, res)
}

func BenchmarkSpliceLoopback(b *testing.B) {
	client, server, res := proxied(b, 0)
	chunk := make([]byte, 128<<10)
	b.SetBytes(int64(len(chunk)))
	b.ReportAllocs()
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, server)
		close(done)
	}()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		client.Write(chunk)
	}
	client.CloseWrite()
	<-done
	b.StopTimer()
	server.Close()
	<-res
}

// sizeConn is a net.Conn source that records the buffer size of each Read
// and returns fill(i) bytes on the i-th read, then EOF.
type sizeConn struct {
	net.Conn
	sizes []int
	fill  func(i, bufLen int) int
	reads int
}

func (s *sizeConn) Read(b []byte) (int, error) {
	if s.reads >= 80 { // enough to climb every class and come back down
		return 0, io.EOF
	}
	s.sizes = append(s.sizes, len(b))
	n := s.fill(s.reads, len(b))
	s.reads++
	return n, nil
}

type discardConn struct{ net.Conn }

func (discardConn) Write(b []byte) (int, error) { return len(b), nil }
func (discardConn) CloseWrite() error           { return nil }

func TestPipeBufferAdapts(t *testing.T) {
	var act atomic.Uint64
	// Bulk: every read fills the buffer → the buffer grows to the top class.
	bulk := &sizeConn{fill: func(_, n int) int { return n }}
	pipe(discardConn{}, bulk, &act)
	if bulk.sizes[0] != bufClasses[0] || bulk.sizes[len(bulk.sizes)-1] != bufClasses[len(bufClasses)-1] {
		t.Fatalf("bulk reads used %v, want to start at %d and reach %d", bulk.sizes, bufClasses[0], bufClasses[len(bufClasses)-1])
	}
	// Bulk then interactive: small reads shrink it back.
	mixed := &sizeConn{fill: func(i, n int) int {
		if i < 5 {
			return n
		}
		return 100
	}}
	pipe(discardConn{}, mixed, &act)
	if last := mixed.sizes[len(mixed.sizes)-1]; last != bufClasses[0] {
		t.Fatalf("after small reads the buffer is %d, want %d (sizes %v)", last, bufClasses[0], mixed.sizes)
	}
	// Interactive only: never grows.
	small := &sizeConn{fill: func(int, int) int { return 64 }}
	pipe(discardConn{}, small, &act)
	for _, sz := range small.sizes {
		if sz != bufClasses[0] {
			t.Fatalf("small reads used a %d-byte buffer, want %d", sz, bufClasses[0])
		}
	}
}

// TestSpliceUpstreamResetReachesTLSClient: on a chain that terminated TLS
// the downstream is a *tls.Conn; an upstream reset still reaches the
// client as a TCP reset (the connection under TLS is aborted), not as an
// orderly TLS close, and an upstream FIN as close_notify then EOF.
func TestSpliceUpstreamResetReachesTLSClient(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, "", testpki.LeafOpts{DNS: []string{"proxy"}})
	for _, reset := range []bool{true, false} {
		client, down := pair(t)
		up, server := pair(t)
		tlsDown := tls.Server(down, &tls.Config{Certificates: []tls.Certificate{leaf.TLS}})
		tlsClient := tls.Client(client, &tls.Config{RootCAs: ca.Pool, ServerName: "proxy"})
		res := make(chan Result, 1)
		go func() {
			if tlsDown.Handshake() != nil {
				res <- Result{}
				return
			}
			res <- Splice(tlsDown, up, 0)
		}()
		tlsClient.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := tlsClient.Write([]byte("hi")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2)
		server.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(server, buf); err != nil || string(buf) != "hi" {
			t.Fatalf("upstream read %q %v", buf, err)
		}
		if reset {
			server.SetLinger(0)
		}
		server.Close()
		_, err := tlsClient.Read(make([]byte, 10))
		if reset {
			if r := waitResult(t, res); !errors.Is(err, syscall.ECONNRESET) || !r.UpstreamReset {
				t.Errorf("after an upstream reset: client read %v, result %+v; want ECONNRESET, UpstreamReset", err, r)
			}
			continue
		}
		if err != io.EOF {
			t.Errorf("after an upstream FIN: client read %v, want io.EOF (close_notify)", err)
		}
		if _, err := client.Read(make([]byte, 10)); err != io.EOF {
			t.Errorf("after close_notify: TCP read %v, want io.EOF (the FIN)", err)
		}
		tlsClient.CloseWrite()
		client.CloseWrite()
		if r := waitResult(t, res); r.UpstreamReset || r.DownstreamReset || r.Received != 2 {
			t.Errorf("result %+v, want an orderly end with 2 bytes received", r)
		}
	}
}

// TestSpliceGoroutinesPerFlow: an established flow, idle timeout armed,
// holds two goroutines — the caller's (one direction) and one more — and
// none for its idle timer.
func TestSpliceGoroutinesPerFlow(t *testing.T) {
	const flows = 8
	type flow struct {
		client, server *net.TCPConn
		res            <-chan Result
	}
	var fs []flow
	for i := 0; i < flows; i++ {
		c, s, r := proxied(t, time.Hour)
		// One byte each way: both directions are running.
		c.Write([]byte{1})
		s.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		s.Write([]byte{2})
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		fs = append(fs, flow{c, s, r})
	}
	if got := spliceGoroutines(); got != 2*flows {
		t.Errorf("%d splice goroutines for %d established flows, want %d (2 per flow)", got, flows, 2*flows)
	}
	for _, f := range fs {
		f.client.Close()
		f.server.Close()
		waitResult(t, f.res)
	}
}

// spliceGoroutines counts the goroutines running this package's flow code.
func spliceGoroutines() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		if bytes.Contains(g, []byte("tcpproxy.Splice")) || bytes.Contains(g, []byte("tcpproxy.(*splice)")) ||
			bytes.Contains(g, []byte("tcpproxy.pipe")) || bytes.Contains(g, []byte("tcpproxy.(*idleTimer)")) ||
			bytes.Contains(g, []byte("tcpproxy.watchIdle")) {
			n++
		}
	}
	return n
}

// TestSpliceIdleTimerStopsWithFlow: a flow that ends before its idle
// timeout leaves no timer behind that could close or flag anything.
func TestSpliceIdleTimerStopsWithFlow(t *testing.T) {
	client, server, res := proxied(t, 40*time.Millisecond)
	client.Close()
	server.Close()
	r := waitResult(t, res)
	if r.IdleTimeout {
		t.Fatalf("result %+v: idle timeout on a flow that closed first", r)
	}
	var w idleTimer
	var act atomic.Uint64
	fired := make(chan struct{}, 1)
	w.start(10*time.Millisecond, &act, func() { fired <- struct{}{} })
	w.stop()
	select {
	case <-fired:
		t.Fatal("stopped idle timer fired")
	case <-time.After(100 * time.Millisecond):
	}
}

// BenchmarkSpliceShortFlow is connect + one 64-byte exchange + close
// through Splice on loopback, a new flow per iteration: the per-flow
// share of the connection-rate row (goroutines, timers, buffers).
func BenchmarkSpliceShortFlow(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer echo.Close()
	echoDone := make(chan struct{})
	go func() {
		defer close(echoDone)
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			io.Copy(c, c)
			c.Close()
		}
	}()
	msg := make([]byte, 64)
	buf := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		client, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		down, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		up, err := net.Dial("tcp", echo.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		done := make(chan Result, 1)
		go func() { done <- Splice(down, up, time.Hour) }()
		client.Write(msg)
		if _, err := io.ReadFull(client, buf); err != nil {
			b.Fatal(err)
		}
		client.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, client)
		client.Close()
		<-done
	}
	b.StopTimer()
	echo.Close()
	<-echoDone
}

// TestSpliceOnRunsUpstreamDirectionOnSpawn: SpliceOn hands the upstream →
// downstream direction to spawn exactly once, and the flow still carries
// both directions and half-closes through it.
func TestSpliceOnRunsUpstreamDirectionOnSpawn(t *testing.T) {
	client, down := pair(t)
	up, server := pair(t)
	var spawned atomic.Int32
	ch := make(chan Result, 1)
	go func() {
		ch <- SpliceOn(down, up, 0, func(f func()) {
			spawned.Add(1)
			go f()
		})
	}()
	client.Write([]byte("ping"))
	client.CloseWrite()
	server.SetDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(server); err != nil || string(got) != "ping" {
		t.Fatalf("server got %q (err %v), want ping then EOF", got, err)
	}
	server.Write([]byte("pong"))
	server.CloseWrite()
	client.SetDeadline(time.Now().Add(5 * time.Second))
	if got, err := io.ReadAll(client); err != nil || string(got) != "pong" {
		t.Fatalf("client got %q (err %v), want pong then EOF", got, err)
	}
	r := waitResult(t, ch)
	if r.Received != 4 || r.Sent != 4 {
		t.Errorf("result %+v, want 4 bytes each way", r)
	}
	if n := spawned.Load(); n != 1 {
		t.Errorf("spawn called %d times, want 1", n)
	}
}
