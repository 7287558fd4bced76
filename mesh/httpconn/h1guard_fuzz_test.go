package httpconn

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"testing"
)

// chunkedConn reads src in pieces of at most step bytes.
type chunkedConn struct {
	net.Conn
	src  []byte
	step int
}

func (c *chunkedConn) Read(p []byte) (int, error) {
	if len(c.src) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), c.step, len(c.src))
	copy(p, c.src[:n])
	c.src = c.src[n:]
	return n, nil
}

// guarded returns what net/http would read through an h1Guard over in,
// read step bytes at a time.
func guarded(cfg *Config, in []byte, step int) []byte {
	g := newH1Guard(&chunkedConn{src: in, step: step}, cfg, &ConnInfo{})
	var out bytes.Buffer
	buf := make([]byte, 4096)
	for {
		n, err := g.Read(buf)
		out.Write(buf[:n])
		if err != nil {
			return out.Bytes()
		}
	}
}

// FuzzH1Guard: whatever the bytes and however they are split into reads,
// the guard passes a prefix of them, possibly followed by a refusal line
// (never a byte of its own elsewhere), and the result does not depend on
// the split: the framing is a function of the byte stream alone.
func FuzzH1Guard(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
		"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x\r\nhello\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.0\n\n",
		"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
		"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
		"\r\n",
	} {
		f.Add([]byte(s), uint8(1))
	}
	cfg := &Config{maxHeaderBytes: 4096, stats: &Stats{}}
	f.Fuzz(func(t *testing.T, in []byte, step uint8) {
		whole := guarded(cfg, in, len(in)+1)
		split := guarded(cfg, in, int(step%16)+1)
		if !bytes.Equal(whole, split) {
			t.Fatalf("split reads changed the result:\n%q\n%q", whole, split)
		}
		for k := len(whole); k >= 0; k-- {
			if !bytes.HasPrefix(in, whole[:k]) {
				continue
			}
			rest := string(whole[k:])
			if rest != "" && !bytes.HasSuffix(whole, []byte("\r\n\r\n")) {
				t.Fatalf("guard added %q after %d bytes of the input", rest, k)
			}
			return
		}
	})
}

// TestH1GuardHijackedPassesThrough: once net/http hands the connection
// to a handler (an Upgrade tunnel: StateHijacked), the guard passes the
// bytes as they are, even what it would refuse as a request head.
func TestH1GuardHijackedPassesThrough(t *testing.T) {
	cfg := &Config{maxHeaderBytes: 4096, stats: &Stats{}}
	in := []byte("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
	if out := guarded(cfg, in, len(in)); bytes.Equal(out, in) {
		t.Fatal("the guard passed a refused head before any hijack")
	}
	g := newH1Guard(&chunkedConn{src: in, step: len(in)}, cfg, &ConnInfo{})
	l := newOneConnListener(g)
	l.connState(g, http.StateHijacked)
	out, err := io.ReadAll(g)
	if err != nil || !bytes.Equal(out, in) {
		t.Errorf("after the hijack: %q, %v; want the bytes unchanged", out, err)
	}
}

// BenchmarkH1GuardScan: the guard's work for one typical keep-alive
// request head (what h1Guard adds per HTTP/1.1 request; bodies with a
// Content-Length are skipped by count).
func BenchmarkH1GuardScan(b *testing.B) {
	head := []byte("GET /api/v1/items?page=2 HTTP/1.1\r\nHost: reviews.default.svc.cluster.local\r\n" +
		"User-Agent: curl/8.5.0\r\nAccept: */*\r\nX-Request-Id: 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\r\n\r\n")
	g := newH1Guard(nil, &Config{maxHeaderBytes: 60 << 10, stats: &Stats{}}, &ConnInfo{})
	b.SetBytes(int64(len(head)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if n, refused := g.scan(head); n != len(head) || refused {
			b.Fatal("head not passed")
		}
	}
}
