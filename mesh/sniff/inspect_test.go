package sniff

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"
)

const testTimeout = 5 * time.Second

// After inspection the consumer reads exactly the bytes the client sent:
// over TCP and net.Pipe, through Read and through io.Copy (WriteTo).
func TestPeekConnStreamIntact(t *testing.T) {
	hello := realHello(t, &tls.Config{ServerName: "db.Example.com", NextProtos: []string{"h2"}})
	req := writeRequest(t, newRequest(t, "POST", "http://up/load", ""), false)
	payload := make([]byte, 4<<20)
	rand.Read(payload)
	pairs := map[string]func(t *testing.T) (client, server net.Conn){
		"tcp": func(t *testing.T) (net.Conn, net.Conn) { c, s := tcpPair(t); return c, s },
		"pipe": func(t *testing.T) (net.Conn, net.Conn) {
			c, s := net.Pipe()
			t.Cleanup(func() { c.Close(); s.Close() })
			return c, s
		},
	}
	for pairName, pair := range pairs {
		for _, first := range []struct {
			name string
			b    []byte
			want Result
		}{
			{"tls", hello, Result{TransportTLS, "db.example.com", []string{"h2"}}},
			{"http", req, Result{TransportRawBuffer, "", []string{HTTP11}}},
			{"raw", []byte("\x00binary protocol"), Result{TransportRawBuffer, "", nil}},
		} {
			for _, copyName := range []string{"Read", "WriteTo"} {
				t.Run(pairName+"/"+first.name+"/"+copyName, func(t *testing.T) {
					client, server := pair(t)
					stream := append(slices.Clone(first.b), payload...)
					go func() {
						// The opening bytes in small pieces, then the bulk.
						for i := 0; i < len(first.b); i += 97 {
							client.Write(first.b[i:min(i+97, len(first.b))])
						}
						client.Write(payload)
						closeWrite(client)
					}()
					pc := NewPeekConn(server, 0)
					res, err := Inspect(context.Background(), pc, true, true, testTimeout)
					if err != nil || !sameResult(res, first.want) {
						t.Fatalf("Inspect: %+v %v, want %+v", res, err, first.want)
					}
					h := sha256.New()
					var src io.Reader = struct{ io.Reader }{pc} // Read only
					if copyName == "WriteTo" {
						src = pc
					}
					n, err := io.Copy(h, src)
					if err != nil || n != int64(len(stream)) || [32]byte(h.Sum(nil)) != sha256.Sum256(stream) {
						t.Fatalf("read back %d bytes (%v), want the %d sent", n, err, len(stream))
					}
				})
			}
		}
	}
}

// closeWrite half-closes a TCP conn; a pipe is closed.
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}

func sameResult(a, b Result) bool {
	return a.TransportProtocol == b.TransportProtocol && a.ServerName == b.ServerName &&
		slices.Equal(a.ApplicationProtocols, b.ApplicationProtocols)
}

// A real TLS handshake completes through the PeekConn after inspection.
func TestInspectThenTLSHandshake(t *testing.T) {
	client, server := tcpPair(t)
	cert := selfSigned(t, "www.example.com")
	errc := make(chan error, 1)
	go func() {
		tc := tls.Client(client, &tls.Config{ServerName: "WWW.Example.com", NextProtos: []string{"h2", "http/1.1"}, InsecureSkipVerify: true})
		if err := tc.Handshake(); err != nil {
			errc <- err
			return
		}
		_, err := tc.Write([]byte("ping"))
		errc <- err
	}()
	pc := NewPeekConn(server, 0)
	res, err := Inspect(context.Background(), pc, true, true, testTimeout)
	want := Result{TransportTLS, "www.example.com", []string{"h2", "http/1.1"}}
	if err != nil || !sameResult(res, want) {
		t.Fatalf("Inspect: %+v %v, want %+v", res, err, want)
	}
	ts := tls.Server(pc, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2"}})
	ts.SetDeadline(time.Now().Add(testTimeout))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(ts, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("TLS over the PeekConn: %q %v", buf, err)
	}
	if st := ts.ConnectionState(); st.ServerName != "WWW.Example.com" || st.NegotiatedProtocol != "h2" {
		t.Errorf("handshake state: SNI %q ALPN %q", st.ServerName, st.NegotiatedProtocol)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// oneConnListener serves a single connection to net/http.
type oneConnListener struct {
	c    chan net.Conn
	addr net.Addr
	once sync.Once
	done chan struct{}
}

func newOneConnListener(c net.Conn) *oneConnListener {
	l := &oneConnListener{c: make(chan net.Conn, 1), addr: c.LocalAddr(), done: make(chan struct{})}
	l.c <- c
	return l
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.c:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}
func (l *oneConnListener) Close() error   { l.once.Do(func() { close(l.done) }); return nil }
func (l *oneConnListener) Addr() net.Addr { return l.addr }

// Real net/http clients, HTTP/1.1 and h2c prior knowledge: inspected, then
// served by net/http over the PeekConn.
func TestInspectThenServeHTTP(t *testing.T) {
	for _, h2c := range []bool{false, true} {
		name, want := "http1.1", HTTP11
		if h2c {
			name, want = "h2c", H2C
		}
		t.Run(name, func(t *testing.T) {
			client, server := tcpPair(t)
			var protos http.Protocols
			protos.SetHTTP1(!h2c)
			protos.SetUnencryptedHTTP2(h2c)
			tr := &http.Transport{Protocols: &protos, DialContext: func(context.Context, string, string) (net.Conn, error) { return client, nil }}
			defer tr.CloseIdleConnections()
			type reply struct {
				body string
				err  error
			}
			replies := make(chan reply, 1)
			go func() {
				resp, err := (&http.Client{Transport: tr, Timeout: testTimeout}).Get("http://svc.example/hello")
				if err != nil {
					replies <- reply{"", err}
					return
				}
				defer resp.Body.Close()
				b, err := io.ReadAll(resp.Body)
				replies <- reply{resp.Proto + " " + string(b), err}
			}()

			pc := NewPeekConn(server, 0)
			res, err := Inspect(context.Background(), pc, true, true, testTimeout)
			if err != nil || !sameResult(res, Result{TransportRawBuffer, "", []string{want}}) {
				t.Fatalf("Inspect: %+v %v", res, err)
			}
			srv := &http.Server{Protocols: &protos, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Write([]byte("hi " + r.URL.Path))
			})}
			ln := newOneConnListener(pc)
			go srv.Serve(ln)
			defer srv.Close()
			r := <-replies
			wantBody := "HTTP/1.1 hi /hello"
			if h2c {
				wantBody = "HTTP/2.0 hi /hello"
			}
			if r.err != nil || r.body != wantBody {
				t.Fatalf("client got %q %v, want %q", r.body, r.err, wantBody)
			}
		})
	}
}

// A server-first protocol: the client sends nothing, so inspection ends at
// listener_filters_timeout, not never; the connection is usable after.
func TestInspectTimeoutServerFirst(t *testing.T) {
	client, server := tcpPair(t)
	pc := NewPeekConn(server, 0)
	const timeout = 200 * time.Millisecond
	start := time.Now()
	res, err := Inspect(context.Background(), pc, true, true, timeout)
	elapsed := time.Since(start)
	if !errors.Is(err, ErrTimeout) || !sameResult(res, Result{TransportProtocol: TransportRawBuffer}) {
		t.Fatalf("got %+v %v, want raw_buffer and ErrTimeout", res, err)
	}
	if elapsed < timeout || elapsed > timeout+time.Second {
		t.Errorf("timed out after %v, want %v", elapsed, timeout)
	}
	// The server speaks first; the client answers after the old deadline.
	server.Write([]byte("220 smtp ready\r\n"))
	line, _ := bufio.NewReader(client).ReadString('\n')
	time.Sleep(timeout)
	client.Write([]byte("EHLO x\r\n"))
	pc.SetReadDeadline(time.Now().Add(testTimeout))
	got, err := bufio.NewReader(pc).ReadString('\n')
	if line != "220 smtp ready\r\n" || got != "EHLO x\r\n" || err != nil {
		t.Fatalf("after the timeout: %q, %q %v", line, got, err)
	}
}

// Bytes that are neither TLS nor HTTP are not held back until the timeout.
func TestInspectDecidesEarly(t *testing.T) {
	for _, sent := range []string{"\x00\x01", "SSH-2.0-OpenSSH_9.6\r\n", "\x16\x03\x03\x00\x05\x02", "GET /\x80"} {
		client, server := tcpPair(t)
		client.Write([]byte(sent))
		start := time.Now()
		res, err := Inspect(context.Background(), NewPeekConn(server, 0), true, true, testTimeout)
		if err != nil || !sameResult(res, Result{TransportProtocol: TransportRawBuffer}) || time.Since(start) > time.Second {
			t.Errorf("%q: %+v %v after %v, want raw_buffer at once", sent, res, err, time.Since(start))
		}
	}
}

// A client that stops sending ends inspection with what is known.
func TestInspectEOF(t *testing.T) {
	for _, tc := range []struct {
		sent string
		want Result
	}{
		{"", Result{TransportProtocol: TransportRawBuffer}},
		{"hello", Result{TransportProtocol: TransportRawBuffer}},
		{"GET / HTTP/1.1", Result{TransportProtocol: TransportRawBuffer}},           // no LF yet
		{"\x16\x03\x01\x00\x10\x01", Result{TransportProtocol: TransportRawBuffer}}, // part of a hello
		{"GET / HTTP/1.0\r\n", Result{TransportRawBuffer, "", []string{HTTP10}}},
	} {
		client, server := tcpPair(t)
		client.Write([]byte(tc.sent))
		client.CloseWrite()
		pc := NewPeekConn(server, 0)
		res, err := Inspect(context.Background(), pc, true, true, testTimeout)
		if err != nil || !sameResult(res, tc.want) {
			t.Errorf("%q then EOF: %+v %v, want %+v", tc.sent, res, err, tc.want)
			continue
		}
		got, err := io.ReadAll(pc)
		if string(got) != tc.sent || err != nil {
			t.Errorf("%q then EOF: read back %q %v", tc.sent, got, err)
		}
		if n, err := pc.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Errorf("%q: Read after the end: %d %v, want EOF", tc.sent, n, err)
		}
	}
}

// Cancelling ctx interrupts a blocked inspection, and the connection's
// deadline is left cleared.
func TestInspectContextCancel(t *testing.T) {
	client, server := tcpPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	pc := NewPeekConn(server, 0)
	start := time.Now()
	_, err := Inspect(ctx, pc, true, true, 0)
	if !errors.Is(err, context.Canceled) || time.Since(start) > 2*time.Second {
		t.Fatalf("got %v after %v, want context.Canceled soon", err, time.Since(start))
	}
	time.Sleep(20 * time.Millisecond)
	client.Write([]byte("GET / HTTP/1.1\r\n"))
	res, err := Inspect(context.Background(), pc, true, true, testTimeout)
	if err != nil || !sameResult(res, Result{TransportRawBuffer, "", []string{HTTP11}}) {
		t.Fatalf("inspecting again: %+v %v", res, err)
	}
}

// Envoy closes connections whose first bytes exceed what its inspectors
// read; Inspect says so with ErrTooLarge.
func TestInspectTooLarge(t *testing.T) {
	client, server := tcpPair(t)
	go client.Write(append([]byte("GET /"), bytes.Repeat([]byte("a"), 70<<10)...))
	_, err := Inspect(context.Background(), NewPeekConn(server, 0), false, true, testTimeout)
	if !errors.Is(err, ErrTooLarge) {
		t.Errorf("endless request line: %v, want ErrTooLarge", err)
	}

	// A read-ahead bound below the ClientHello's size.
	client2, server2 := tcpPair(t)
	go client2.Write(realHello(t, &tls.Config{ServerName: "x.example"}))
	_, err = Inspect(context.Background(), NewPeekConn(server2, 64), true, false, testTimeout)
	if !errors.Is(err, ErrTooLarge) {
		t.Errorf("ClientHello over a 64-byte bound: %v, want ErrTooLarge", err)
	}
}

// Only the inspectors asked for run.
func TestInspectWanted(t *testing.T) {
	hello := realHello(t, &tls.Config{ServerName: "x.example", NextProtos: []string{"h2"}})
	req := []byte("GET / HTTP/1.1\r\n\r\n")
	for _, tc := range []struct {
		name              string
		b                 []byte
		wantTLS, wantHTTP bool
		want              Result
	}{
		{"tls without tls_inspector", hello, false, true, Result{TransportProtocol: TransportRawBuffer}},
		{"http without http_inspector", req, true, false, Result{TransportProtocol: TransportRawBuffer}},
		{"tls only", hello, true, false, Result{TransportTLS, "x.example", []string{"h2"}}},
		{"http only", req, false, true, Result{TransportRawBuffer, "", []string{HTTP11}}},
	} {
		client, server := tcpPair(t)
		go client.Write(tc.b)
		res, err := Inspect(context.Background(), NewPeekConn(server, 0), tc.wantTLS, tc.wantHTTP, testTimeout)
		if err != nil || !sameResult(res, tc.want) {
			t.Errorf("%s: %+v %v, want %+v", tc.name, res, err, tc.want)
		}
	}

	// No inspector: nothing is read, nothing waited for.
	_, server := tcpPair(t)
	pc := NewPeekConn(server, 0)
	res, err := Inspect(context.Background(), pc, false, false, testTimeout)
	if err != nil || res.TransportProtocol != TransportRawBuffer || len(pc.Peeked()) != 0 {
		t.Errorf("no inspectors: %+v %v, %d bytes read", res, err, len(pc.Peeked()))
	}
}

// A hello trickled a few bytes at a time is still recognised.
func TestInspectSlowClient(t *testing.T) {
	client, server := tcpPair(t)
	client.SetNoDelay(true)
	hello := realHello(t, &tls.Config{ServerName: "slow.example"})
	go func() {
		for i := 0; i < len(hello); i += 64 {
			client.Write(hello[i:min(i+64, len(hello))])
			time.Sleep(time.Millisecond)
		}
	}()
	pc := NewPeekConn(server, 0)
	res, err := Inspect(context.Background(), pc, true, true, testTimeout)
	if err != nil || res.ServerName != "slow.example" {
		t.Fatalf("%+v %v", res, err)
	}
	if len(pc.Peeked()) != len(hello) {
		t.Errorf("read ahead %d bytes, want the %d of the hello", len(pc.Peeked()), len(hello))
	}
}

// Peek resumes after a partial Read, keeping the order of the stream.
func TestPeekAfterPartialRead(t *testing.T) {
	client, server := tcpPair(t)
	pc := NewPeekConn(server, 0)
	client.Write([]byte("abcdef"))
	untilLen := func(n int) func([]byte) error {
		return func(b []byte) error {
			if len(b) < n {
				return ErrNeedMore
			}
			return nil
		}
	}
	if err := pc.Peek(context.Background(), time.Now().Add(testTimeout), untilLen(6)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2)
	io.ReadFull(pc, buf)
	client.Write([]byte("ghij"))
	if err := pc.Peek(context.Background(), time.Now().Add(testTimeout), untilLen(8)); err != nil || string(pc.Peeked()) != "cdefghij" {
		t.Fatalf("after a partial read: %q %v", pc.Peeked(), err)
	}
	client.Write([]byte("k"))
	client.CloseWrite()
	rest, err := io.ReadAll(pc)
	if string(buf)+string(rest) != "abcdefghijk" || err != nil {
		t.Fatalf("stream %q%q %v", buf, rest, err)
	}
}

// CloseWrite and CloseRead reach the wrapped connection.
func TestPeekConnHalfClose(t *testing.T) {
	client, server := tcpPair(t)
	pc := NewPeekConn(server, 0)
	if err := pc.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	client.SetReadDeadline(time.Now().Add(testTimeout))
	if n, err := client.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("client after CloseWrite: %d %v, want EOF", n, err)
	}
	// The other direction still flows.
	client.Write([]byte("still here"))
	pc.SetReadDeadline(time.Now().Add(testTimeout))
	buf := make([]byte, 10)
	if _, err := io.ReadFull(pc, buf); err != nil || string(buf) != "still here" {
		t.Fatalf("after CloseWrite: %q %v", buf, err)
	}
	if err := pc.CloseRead(); err != nil {
		t.Fatal(err)
	}
	if n, err := pc.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("Read after CloseRead: %d %v, want EOF", n, err)
	}
	if pc.Unwrap() != net.Conn(server) {
		t.Error("Unwrap does not return the wrapped conn")
	}

	// Without half-close (net.Pipe), CloseWrite closes.
	a, b := net.Pipe()
	defer b.Close()
	if err := NewPeekConn(a, 0).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Write([]byte("x")); !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("pipe after CloseWrite: %v, want closed", err)
	}
	if err := NewPeekConn(b, 0).CloseRead(); err != nil {
		t.Errorf("CloseRead without support: %v", err)
	}
}

type resetConn struct {
	net.Conn
	reset bool
}

func (c *resetConn) Reset() { c.reset = true }

func TestPeekConnReset(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	rc := &resetConn{Conn: a}
	NewPeekConn(rc, 0).Reset()
	if !rc.reset {
		t.Error("Reset not forwarded")
	}
	client, server := tcpPair(t)
	NewPeekConn(server, 0).Reset()
	client.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := client.Read(make([]byte, 1)); err == nil || errors.Is(err, io.EOF) {
		t.Errorf("client after Reset: %v, want a connection reset", err)
	}
}
