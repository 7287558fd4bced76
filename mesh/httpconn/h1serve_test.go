package httpconn

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestH1MalformedHeads: heads net/http's parser or server refuses are
// answered as net/http answered them (400, 431, 501, 505, and the
// connection closed), the request behind them is never served, and the
// access log says why (http1.<reason>, flag DPE). Before the proxy's own
// serving loop these never reached the access log.
func TestH1MalformedHeads(t *testing.T) {
	u := startUpstream(t, echoBody)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	const next = "GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
	for _, tc := range []struct {
		name, req string
		code      int
		details   string
	}{
		{"no version", "GARBAGE\r\n\r\n", 400, "http1.invalid_request_line"},
		{"bad version", "GET / HTTP/x.y\r\nHost: x\r\n\r\n", 400, "http1.invalid_version"},
		{"version 1.2", "GET / HTTP/1.2\r\nHost: x\r\n\r\n", 505, "http1.unsupported_protocol_version"},
		{"invalid method", "G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "http1.invalid_method"},
		{"no host", "GET / HTTP/1.1\r\nX: y\r\n\r\n", 400, "http1.missing_required_Host_header"},
		{"two hosts", "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "http1.too_many_Host_headers"},
		{"bad host", "GET / HTTP/1.1\r\nHost: x y\r\n\r\n", 400, "http1.malformed_Host_header"},
		{"space in header name", "GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n", 400, "http1.invalid_header_name"},
		{"control byte in value", "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", 400, "http1.invalid_header"},
		{"no colon", "GET / HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n", 400, "http1.invalid_header"},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400, "http1.invalid_characters"},
		{"two content lengths", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400, "http1.invalid_content_length"},
		{"bad content length", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\nab", 400, "http1.invalid_content_length"},
		{"gzip transfer encoding", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nab", 501, "http1.invalid_transfer_encoding"},
		{"head too large", "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", 70<<10) + "\r\n\r\n", 431, "http1.headers_too_large"},
		{"bad url", "GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "http1.invalid_url"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := u.requests.Load()
			p.sent.Add(1)
			c := rawConnTo(t, p.addr)
			go io.WriteString(c, tc.req+next)
			rs := readResponses(t, c, 2)
			if len(rs) != 1 || rs[0].StatusCode != tc.code {
				var got []string
				for _, r := range rs {
					got = append(got, r.Status)
				}
				t.Fatalf("responses %q, want one %d and the connection closed", got, tc.code)
			}
			if !rs[0].Close {
				t.Error("response without Connection: close")
			}
			if !closedAfter(c, 2*time.Second) {
				t.Error("connection left open")
			}
			if n := u.requests.Load() - before; n != 0 {
				t.Errorf("upstream saw %d requests, want none", n)
			}
			e := p.lastEntry(t)
			if e.ResponseCode != tc.code || e.ResponseCodeDetails != tc.details || !e.ResponseFlags.Has(FlagDPE) {
				t.Errorf("access log: %d %q %s, want %d %q DPE", e.ResponseCode, e.ResponseCodeDetails, e.ResponseFlags, tc.code, tc.details)
			}
		})
	}
}

// TestH1MalformedBodies: a chunked body whose framing breaks after the
// head (a bad chunk size, a chunk extension over net/http's 4 KiB line
// bound, a chunk not followed by CRLF) fails the request's body read; the
// connection closes and nothing pipelined behind it is served.
func TestH1MalformedBodies(t *testing.T) {
	u := startUpstream(t, echoBody)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	const head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
	const next = "GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
	for _, tc := range []struct{ name, body string }{
		{"bad chunk size", "zz\r\nhello\r\n0\r\n\r\n"},
		{"huge chunk extension", "5;" + strings.Repeat("x", 8<<10) + "\r\nhello\r\n0\r\n\r\n"},
		{"chunk without CRLF", "5\r\nhelloXX0\r\n\r\n"},
		{"chunk size overflow", "fffffffffffffffff\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p.sent.Add(1)
			c := rawConnTo(t, p.addr)
			go io.WriteString(c, head+tc.body+next)
			rs := readResponses(t, c, 2)
			for _, r := range rs {
				if r.StatusCode == 200 {
					t.Errorf("a request was served: %s %q", r.Status, r.Header.Get("X-Test-Body"))
				}
			}
			if !closedAfter(c, 3*time.Second) {
				t.Error("connection left open")
			}
		})
	}
}

// TestH1KeepAliveAndPipelining: responses of pipelined requests come
// back in order on one connection, with their framing: Content-Length
// for a body known whole, chunked for a streaming one, none for HEAD and
// 204; HTTP/1.0 keep-alive is honoured only when asked for.
func TestH1KeepAliveAndPipelining(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/stream":
			w.Header().Set("Trailer", "X-T")
			io.WriteString(w, "part1")
			w.(http.Flusher).Flush()
			io.WriteString(w, "part2")
			w.Header().Set("X-T", "end")
		case "/empty":
			w.WriteHeader(204)
		default:
			io.WriteString(w, "hello "+r.Method)
		}
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	c := rawConnTo(t, p.addr)
	io.WriteString(c, "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"+
		"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"+
		"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n"+
		"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n"+
		"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
	br := bufio.NewReader(c)
	read := func(method string) (*http.Response, string) {
		t.Helper()
		resp, err := http.ReadResponse(br, &http.Request{Method: method})
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp, string(b)
	}
	if r, b := read("GET"); r.StatusCode != 200 || b != "hello GET" || r.ContentLength != 9 {
		t.Errorf("GET: %d %q length %d, want 200 %q 9", r.StatusCode, b, r.ContentLength, "hello GET")
	}
	if r, b := read("GET"); b != "part1part2" || len(r.TransferEncoding) != 1 || r.Trailer.Get("X-T") != "end" {
		t.Errorf("streaming: %q %v trailer %v, want chunked part1part2 with trailer X-T", b, r.TransferEncoding, r.Trailer)
	}
	if r, b := read("HEAD"); r.StatusCode != 200 || b != "" {
		t.Errorf("HEAD: %d %q", r.StatusCode, b)
	}
	if r, _ := read("GET"); r.StatusCode != 204 {
		t.Errorf("204: %d", r.StatusCode)
	}
	if r, b := read("POST"); b != "hello POST" || r.Close {
		t.Errorf("POST: %q close=%v", b, r.Close)
	}

	// HTTP/1.0: keep-alive only when asked.
	c = rawConnTo(t, p.addr)
	io.WriteString(c, "GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /a HTTP/1.0\r\n\r\nGET /a HTTP/1.0\r\n\r\n")
	rs := readResponses(t, c, 3)
	if len(rs) != 2 || rs[0].Header.Get("Connection") != "keep-alive" || rs[1].Header.Get("Connection") == "keep-alive" {
		t.Fatalf("HTTP/1.0: %d responses, want 2 (keep-alive, then close)", len(rs))
	}
	if rs[0].ProtoMinor != 0 || rs[0].ContentLength != 9 {
		t.Errorf("HTTP/1.0 response: %s length %d", rs[0].Proto, rs[0].ContentLength)
	}
}

// TestH1ExpectContinue: a client that waits for 100 Continue gets it when
// the proxy reads the body, then its response; one that asks for an
// expectation the proxy does not know gets 417.
func TestH1ExpectContinue(t *testing.T) {
	u := startUpstream(t, echoBody)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	c := rawConnTo(t, p.addr)
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.1 100 ") {
		t.Fatalf("first line %q (%v), want a 100 Continue", line, err)
	}
	if l, _ := br.ReadString('\n'); l != "\r\n" {
		t.Fatalf("100 Continue followed by %q", l)
	}
	io.WriteString(c, "hello")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(resp.Body); resp.StatusCode != 200 || string(b) != "POST hello" {
		t.Errorf("%d %q, want 200 %q", resp.StatusCode, b, "POST hello")
	}

	c = rawConnTo(t, p.addr)
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\nContent-Length: 5\r\n\r\nhello")
	if rs := readResponses(t, c, 2); len(rs) != 1 || rs[0].StatusCode != http.StatusExpectationFailed {
		t.Errorf("unknown expectation: %d responses, want one 417", len(rs))
	}
}

// FuzzH1RequestHead runs request heads through the serving loop (its
// seed corpus is a unit test): whatever the bytes, the proxy answers with
// well-formed responses or closes, and never panics or hangs.
func FuzzH1RequestHead(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET / HTTP/1.1\nHost: x\n\n",
		"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nT: v\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
		"GET http://x/p?q HTTP/1.0\r\n\r\n",
		"CONNECT x:1 HTTP/1.1\r\nHost: x:1\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\na",
		"\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
	} {
		f.Add(s)
	}
	cfg := mustParse(f, hcm(routeConfig(vhost("v", []string{"*"}, &routev3.Route{
		Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 200}},
	}))))
	env := newEnv(f)
	f.Fuzz(func(t *testing.T, raw string) {
		c := rawConn(t, cfg, env, testPeer)
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		go func() {
			io.WriteString(c, raw)
			// The end of the input: the proxy answers what it has and
			// closes, so a hang shows as a deadline failure.
			c.(*net.TCPConn).CloseWrite()
		}()
		br := bufio.NewReader(c)
		for range 16 {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				break
			}
			if resp.StatusCode < 100 || resp.StatusCode > 599 {
				t.Fatalf("status %d", resp.StatusCode)
			}
			if _, err := io.Copy(io.Discard, resp.Body); err != nil {
				break
			}
		}
		if _, err := io.Copy(io.Discard, br); err != nil {
			t.Fatalf("the proxy did not close after the input ended: %v", err)
		}
	})
}
