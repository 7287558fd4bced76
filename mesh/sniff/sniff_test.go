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
	"reflect"
	"testing"
	"time"
)

// clientHello returns the first flight a real crypto/tls client sends.
func clientHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c, s := net.Pipe()
	defer s.Close()
	go func() {
		tls.Client(c, cfg).Handshake()
		c.Close()
	}()
	s.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64<<10)
	var got []byte
	for {
		n, err := s.Read(buf)
		got = append(got, buf[:n]...)
		if _, perr := ParseClientHello(got); perr == nil || err != nil {
			return got
		}
	}
}

func TestParseRealClientHellos(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  *tls.Config
		sni  string
		alpn []string
	}{
		{"tls13", &tls.Config{ServerName: "www.Example.com", NextProtos: []string{"h2", "http/1.1"}}, "www.example.com", []string{"h2", "http/1.1"}},
		{"tls12", &tls.Config{ServerName: "reviews.default.svc.cluster.local", MaxVersion: tls.VersionTLS12}, "reviews.default.svc.cluster.local", nil},
		{"no-sni", &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"istio-peer-exchange", "istio"}}, "", []string{"istio-peer-exchange", "istio"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			hello := clientHello(t, tc.cfg)
			ch, err := ParseClientHello(hello)
			if err != nil {
				t.Fatal(err)
			}
			if ch.ServerName != tc.sni || !reflect.DeepEqual(ch.ALPN, tc.alpn) {
				t.Fatalf("got SNI %q ALPN %v, want %q %v", ch.ServerName, ch.ALPN, tc.sni, tc.alpn)
			}
			// Every strict prefix needs more bytes; none is misparsed.
			for i := 0; i < len(hello); i++ {
				if _, err := ParseClientHello(hello[:i]); !errors.Is(err, ErrNeedMore) {
					t.Fatalf("prefix of %d/%d bytes: %v, want ErrNeedMore", i, len(hello), err)
				}
			}
			// Split across two records.
			body := hello[5:]
			two := append([]byte{22, 3, 1, 0, 10}, body[:10]...)
			two = append(two, 22, 3, 1, byte((len(body)-10)>>8), byte(len(body)-10))
			two = append(two, body[10:]...)
			if ch2, err := ParseClientHello(two); err != nil || ch2.ServerName != tc.sni {
				t.Fatalf("hello in two records: %+v, %v", ch2, err)
			}
		})
	}
}

func TestNotTLSDecidedEarly(t *testing.T) {
	for _, b := range [][]byte{[]byte("GET / HTTP/1.1\r\n"), []byte("SSH-2.0-OpenSSH"), {0x16, 0x02}, {0x17, 3, 3, 0, 5}, []byte("PRI * HTTP/2.0")} {
		if _, err := ParseClientHello(b); !errors.Is(err, ErrNotTLS) {
			t.Errorf("%q: %v, want ErrNotTLS", b, err)
		}
	}
	// A handshake record that is not a ClientHello (a ServerHello, type 2).
	if _, err := ParseClientHello([]byte{22, 3, 3, 0, 4, 2, 0, 0, 0}); !errors.Is(err, ErrNotTLS) {
		t.Errorf("ServerHello: %v", err)
	}
	// Corrupted lengths inside a complete record are errors, not panics.
	hello := clientHello(t, &tls.Config{ServerName: "a.b"})
	for i := 5; i < 60 && i < len(hello); i++ {
		bad := append([]byte(nil), hello...)
		bad[i] ^= 0xff
		ParseClientHello(bad) // must not panic
	}
}

func TestDetectHTTP(t *testing.T) {
	var req bytes.Buffer
	r, _ := http.NewRequest("POST", "http://reviews:9080/api/v1?x=1", bytes.NewReader([]byte("body")))
	r.Write(&req)
	http10 := []byte("GET /index.html HTTP/1.0\r\nHost: a\r\n\r\n")
	for _, tc := range []struct {
		b    []byte
		want string
	}{
		{req.Bytes(), HTTP11},
		{http10, HTTP10},
		{[]byte(h2Preface + "\x00\x00\x12\x04"), H2C},
		{[]byte("OPTIONS * HTTP/1.1\n"), HTTP11},
	} {
		got, err := DetectHTTP(tc.b)
		if err != nil || got != tc.want {
			t.Errorf("%q: %q %v, want %q", tc.b, got, err, tc.want)
		}
		// Prefixes up to the end of the request line need more.
		end := bytes.IndexByte(tc.b, '\n')
		if tc.want == H2C {
			end = len(h2Preface) - 1
		}
		for i := 0; i < end; i++ {
			if _, err := DetectHTTP(tc.b[:i]); !errors.Is(err, ErrNeedMore) {
				t.Fatalf("%q prefix %d: %v, want ErrNeedMore", tc.b, i, err)
			}
		}
	}
	for _, b := range [][]byte{clientHello(t, &tls.Config{ServerName: "x"}), []byte("SSH-2.0-OpenSSH_9.6\r\n"), {0, 1, 2, 3}, []byte("GET  / HTTP/1.1\r\n"), []byte("GET / HTTP/2.0\r\n"), []byte("GET / FTP/1.1\r\n"), []byte("G\tET")} {
		if _, err := DetectHTTP(b); !errors.Is(err, ErrNotHTTP) {
			t.Errorf("%q: %v, want ErrNotHTTP", b, err)
		}
	}
}

func TestDetectHTTPNoAllocs(t *testing.T) {
	b := []byte("GET /some/path HTTP/1.1\r\nHost: x\r\n\r\n")
	if n := testing.AllocsPerRun(100, func() { DetectHTTP(b) }); n != 0 {
		t.Fatalf("DetectHTTP allocates %v times", n)
	}
}

// tcpPair returns a connected loopback pair.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); ch <- c }()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-ch
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestInspectThenReadOriginalStream(t *testing.T) {
	client, server := tcpPair(t)
	hello := clientHello(t, &tls.Config{ServerName: "db.example.com", NextProtos: []string{"h2"}})
	payload := make([]byte, 1<<20)
	rand.Read(payload)
	stream := append(append([]byte(nil), hello...), payload...)
	go func() {
		// Dribble the hello in small pieces, then the bulk.
		for i := 0; i < len(hello); i += 7 {
			client.Write(hello[i:min(i+7, len(hello))])
			time.Sleep(time.Millisecond)
		}
		client.Write(payload)
		client.(*net.TCPConn).CloseWrite()
	}()
	pc := NewPeekConn(server, 0)
	res, err := Inspect(context.Background(), pc, true, true, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if res.TransportProtocol != "tls" || res.ServerName != "db.example.com" || !reflect.DeepEqual(res.ApplicationProtocols, []string{"h2"}) {
		t.Fatalf("result %+v", res)
	}
	got, err := io.ReadAll(bufio.NewReader(pc))
	if err != nil || sha256.Sum256(got) != sha256.Sum256(stream) {
		t.Fatalf("stream after inspection: %d bytes (%v), want the original %d", len(got), err, len(stream))
	}
}

func TestInspectHTTPAndRaw(t *testing.T) {
	client, server := tcpPair(t)
	go client.Write([]byte("GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
	res, err := Inspect(context.Background(), NewPeekConn(server, 0), true, true, 5*time.Second)
	if err != nil || res.TransportProtocol != "raw_buffer" || !reflect.DeepEqual(res.ApplicationProtocols, []string{HTTP11}) {
		t.Fatalf("HTTP: %+v %v", res, err)
	}
	client2, server2 := tcpPair(t)
	go func() { client2.Write([]byte("\x00\x01binary")); client2.(*net.TCPConn).CloseWrite() }()
	res, err = Inspect(context.Background(), NewPeekConn(server2, 0), true, true, 5*time.Second)
	if err != nil || res.TransportProtocol != "raw_buffer" || res.ApplicationProtocols != nil {
		t.Fatalf("binary: %+v %v", res, err)
	}
}

// A server-first protocol (MySQL): the client sends nothing, inspection
// must end at the timeout instead of hanging.
func TestInspectTimeoutOnServerFirst(t *testing.T) {
	_, server := tcpPair(t)
	start := time.Now()
	res, err := Inspect(context.Background(), NewPeekConn(server, 0), true, true, 200*time.Millisecond)
	if !errors.Is(err, ErrTimeout) || res.TransportProtocol != "raw_buffer" {
		t.Fatalf("got %+v %v, want ErrTimeout", res, err)
	}
	if d := time.Since(start); d < 150*time.Millisecond || d > 2*time.Second {
		t.Fatalf("timeout after %v, want about 200ms", d)
	}
}

func FuzzParseClientHello(f *testing.F) {
	f.Add(clientHello(f, &tls.Config{ServerName: "a.example.com", NextProtos: []string{"h2"}}))
	f.Add([]byte{22, 3, 1, 0, 4, 1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) { ParseClientHello(b) })
}

func FuzzDetectHTTP(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Add([]byte(h2Preface))
	f.Fuzz(func(t *testing.T, b []byte) { DetectHTTP(b) })
}

func BenchmarkParseClientHello(b *testing.B) {
	hello := clientHello(b, &tls.Config{ServerName: "reviews.default.svc.cluster.local", NextProtos: []string{"istio-http/1.1", "istio"}})
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		ParseClientHello(hello)
	}
}

func BenchmarkDetectHTTP(b *testing.B) {
	req := []byte("GET /productpage HTTP/1.1\r\nHost: productpage:9080\r\n\r\n")
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		DetectHTTP(req)
	}
}
