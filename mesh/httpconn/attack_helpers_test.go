package httpconn

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// rawConn serves one downstream connection with Serve on a loopback TCP
// pair, with peer as ConnInfo.Peer (a test can play a public client), and
// returns the client side for raw bytes. Serve's end is awaited at cleanup.
func rawConn(t testing.TB, cfg *Config, env Env, peer netip.AddrPort) net.Conn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer s.Close()
		cfg.Serve(ctx, s, env, ConnInfo{Peer: peer, Local: s.LocalAddr().(*net.TCPAddr).AddrPort()})
	}()
	t.Cleanup(func() {
		cancel()
		c.Close()
		<-done
	})
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

// readResponses reads HTTP/1.1 responses from c until it closes or n
// were read; bodies are read whole.
func readResponses(t testing.TB, c net.Conn, n int) []*http.Response {
	t.Helper()
	br := bufio.NewReader(c)
	var out []*http.Response
	for len(out) < n {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			break
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		resp.Body = io.NopCloser(stringsReader(string(b)))
		resp.Header.Set("X-Test-Body", string(b))
		out = append(out, resp)
	}
	return out
}

type stringsReaderT struct {
	s string
	i int
}

func stringsReader(s string) io.Reader { return &stringsReaderT{s: s} }

func (r *stringsReaderT) Read(p []byte) (int, error) {
	if r.i >= len(r.s) {
		return 0, io.EOF
	}
	n := copy(p, r.s[r.i:])
	r.i += n
	return n, nil
}

// closedAfter reports whether c is closed by the proxy (EOF or reset)
// within d.
func closedAfter(c net.Conn, d time.Duration) bool {
	_ = c.SetReadDeadline(time.Now().Add(d))
	var b [64 << 10]byte
	for {
		_, err := c.Read(b[:])
		if err != nil {
			ne, ok := err.(net.Error)
			return !(ok && ne.Timeout())
		}
	}
}

type corev3CommonHTTP = corev3.HttpProtocolOptions

func wrap32(v uint32) *wrapperspb.UInt32Value { return wrapperspb.UInt32(v) }

// rawConnTo dials addr for raw bytes.
func rawConnTo(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}
