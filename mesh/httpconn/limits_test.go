package httpconn

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// scriptedUpstream accepts connections on loopback and answers each request
// head it reads with answer(w); the connection stays open after.
func scriptedUpstream(t testing.TB, answer func(w io.Writer)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					bw := bufio.NewWriter(c)
					answer(bw)
					if bw.Flush() != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// TestUpstreamResponseHeadLimits: an upstream whose response head is
// larger than 60 KiB (here 4 MiB of headers, the bomb was 256 MiB), has
// more than 100 headers, or sends more informational (1xx) responses
// than the proxy allows before the final one, gets the client Envoy's 503
// for an upstream protocol error (flag UPE, details
// upstream_reset_before_response_started{protocol_error}), and the
// proxy reads no more of the head than the limit. Previously the bomb
// was relayed as 200 and the 1xx stream read for ever.
func TestUpstreamResponseHeadLimits(t *testing.T) {
	const big = 4 << 20
	cases := []struct {
		name   string
		answer func(w io.Writer)
	}{
		{"header bytes", func(w io.Writer) {
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
			line := "X-Bomb: " + strings.Repeat("a", 1000) + "\r\n"
			for n := 0; n < big; n += len(line) {
				if _, err := io.WriteString(w, line); err != nil {
					return
				}
			}
			io.WriteString(w, "\r\nok")
		}},
		{"header count", func(w io.Writer) {
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
			for i := 0; i < 150; i++ {
				fmt.Fprintf(w, "X-H%d: v\r\n", i)
			}
			io.WriteString(w, "\r\nok")
		}},
		{"1xx count", func(w io.Writer) {
			for i := 0; i < 1000; i++ {
				io.WriteString(w, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
			}
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := newEnv(t, xdstest.StaticCluster("c", scriptedUpstream(t, tc.answer)))
			p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
			resp, body := get(t, client(false), p, "x", "/")
			if resp.StatusCode != http.StatusServiceUnavailable || len(resp.Header) > 10 {
				t.Errorf("got %d with %d headers, want 503 from the proxy", resp.StatusCode, len(resp.Header))
			}
			if !strings.Contains(body, "protocol error") {
				t.Errorf("body %q, want the protocol error reset reason", body)
			}
			e := p.lastEntry(t)
			if !e.ResponseFlags.Has(FlagUPE) || e.ResponseCodeDetails != "upstream_reset_before_response_started{protocol_error}" {
				t.Errorf("entry %s %q, want UPE upstream_reset_before_response_started{protocol_error}", e.ResponseFlags, e.ResponseCodeDetails)
			}
		})
	}
}

// TestRequestHeaderCountLimit: a request with more header lines than
// common_http_protocol_options.max_headers_count (default 100, as Envoy)
// is answered 431 and not forwarded, over HTTP/1.1 (which then closes)
// and h2c; the limit is configurable; one under it passes.
func TestRequestHeaderCountLimit(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	many := func(n int) reqOpt {
		return func(r *http.Request) {
			for i := 0; i < n; i++ {
				r.Header.Add(fmt.Sprintf("X-H%d", i%40), "v")
			}
		}
	}
	for _, h2 := range []bool{false, true} {
		resp, _ := get(t, client(h2), p, "x", "/", many(150))
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("h2=%v: 150 headers: %d, want 431", h2, resp.StatusCode)
		}
		e := p.findEntry(t, func(e Entry) bool { return e.ResponseCode == 431 && (e.Protocol == "HTTP/2.0") == h2 })
		if !e.ResponseFlags.Has(FlagDPE) {
			t.Errorf("h2=%v: flags %s, want DPE", h2, e.ResponseFlags)
		}
		if !h2 && !resp.Close {
			t.Errorf("h1: 431 without Connection: close")
		}
		if resp, _ := get(t, client(h2), p, "x", "/", many(90)); resp.StatusCode != http.StatusOK {
			t.Errorf("h2=%v: 90 headers: %d, want 200", h2, resp.StatusCode)
		}
	}
	if n := u.requests.Load(); n != 2 {
		t.Errorf("upstream saw %d requests, want the 2 under the limit", n)
	}

	h := hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))
	h.CommonHttpProtocolOptions = &corev3CommonHTTP{MaxHeadersCount: wrap32(20)}
	p2 := startProxy(t, mustParse(t, h), env)
	if resp, _ := get(t, client(false), p2, "x", "/", many(30)); resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("max_headers_count 20, 30 headers: %d, want 431", resp.StatusCode)
	}
}
