package httpconn

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

var testPeer = netip.MustParseAddrPort("10.0.0.9:5000")

// echoBody answers with the method and the request body it read.
func echoBody(w http.ResponseWriter, r *http.Request) {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	fmt.Fprintf(w, "%s %s", r.Method, b)
}

// TestH1SmugglingRefused: requests whose framing is ambiguous, hidden
// from the handler by net/http, are answered 400 (or CONNECT 403) and
// the connection closed, so that nothing pipelined behind them is
// served, and the upstream sees none of it. Before, Content-Length with
// Transfer-Encoding was served and so was the request behind it;
// HTTP/1.0 with chunked went upstream as Content-Length: 0 (its chunks
// then read as the next request); CONNECT went upstream as
// "CONNECT / HTTP/1.1".
func TestH1SmugglingRefused(t *testing.T) {
	u := startUpstream(t, echoBody)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	cfg := mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c")))))
	const next = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
	for _, tc := range []struct {
		name, req string
		code      int
	}{
		{"content-length and chunked", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400},
		{"chunked and content-length, lower case", "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 40\r\n\r\n0\r\n\r\n", 400},
		{"HTTP/1.0 chunked", "POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400},
		{"obs-fold transfer-encoding", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400},
		{"CONNECT", "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 403},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := u.requests.Load()
			c := rawConn(t, cfg, env, testPeer)
			io.WriteString(c, tc.req+next)
			rs := readResponses(t, c, 2)
			if len(rs) != 1 || rs[0].StatusCode != tc.code {
				var got []string
				for _, r := range rs {
					got = append(got, r.Status+" "+r.Header.Get("X-Test-Body"))
				}
				t.Fatalf("responses %q, want one %d and the connection closed", got, tc.code)
			}
			if !closedAfter(c, 2*time.Second) {
				t.Error("connection left open")
			}
			if n := u.requests.Load() - before; n != 0 {
				t.Errorf("upstream saw %d requests, want none", n)
			}
		})
	}

	// allow_chunked_length: chunked wins, Content-Length is dropped, and
	// the connection goes on.
	h := hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))
	h.HttpProtocolOptions = &corev3.Http1ProtocolOptions{AllowChunkedLength: true}
	c := rawConn(t, mustParse(t, h), env, testPeer)
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"+next)
	rs := readResponses(t, c, 2)
	if len(rs) != 2 || rs[0].Header.Get("X-Test-Body") != "POST hello" || rs[1].Header.Get("X-Test-Body") != "GET " {
		t.Errorf("allow_chunked_length: %d responses, want the chunked POST and the GET served", len(rs))
	}
}

// TestH1FramingPipelined: the framing the guard follows agrees with
// net/http's on valid traffic: pipelined requests with Content-Length,
// chunked bodies with extensions and trailers, bare-LF heads, and a
// request written one byte at a time are all served, bodies intact.
func TestH1FramingPipelined(t *testing.T) {
	u := startUpstream(t, echoBody)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	cfg := mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c")))))
	reqs := []struct{ raw, want string }{
		{"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", "POST hello"},
		{"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n3;ext=1\r\nabc\r\nA \r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n", "POST abc0123456789"},
		{"GET / HTTP/1.1\nHost: x\nX-Other: Content-Length: 9\n\n", "GET "},
		{"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:  0011 \r\n\r\nGET / HTTP/", "POST GET / HTTP/"},
		{"POST / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi", "POST hi"},
		{"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", "POST ok"},
	}
	var all strings.Builder
	for _, r := range reqs {
		all.WriteString(r.raw)
	}
	check := func(name string, rs []*http.Response) {
		t.Helper()
		if len(rs) != len(reqs) {
			t.Fatalf("%s: %d responses, want %d", name, len(rs), len(reqs))
		}
		for i, r := range rs {
			if got := r.Header.Get("X-Test-Body"); r.StatusCode != 200 || got != reqs[i].want {
				t.Errorf("%s: request %d: %d %q, want 200 %q", name, i, r.StatusCode, got, reqs[i].want)
			}
		}
	}
	c := rawConn(t, cfg, env, testPeer)
	io.WriteString(c, all.String())
	check("pipelined", readResponses(t, c, len(reqs)))

	c = rawConn(t, cfg, env, testPeer)
	go func() {
		for _, b := range []byte(all.String()) {
			if _, err := c.Write([]byte{b}); err != nil {
				return
			}
		}
	}()
	check("byte by byte", readResponses(t, c, len(reqs)))
}

// TestH1HeadTimeout: a client that sends a request head one byte at a
// time (slowloris) gets Envoy's 408 once stream_idle_timeout (or the
// shorter request_headers_timeout) passes from the head's first bytes,
// and the connection closes. An idle keep-alive connection between
// requests is not cut by it (the connection's idle_timeout applies).
// Before, the head could take as long as the client liked.
func TestH1HeadTimeout(t *testing.T) {
	u := startUpstream(t, echoBody)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	for _, tc := range []struct {
		name           string
		idle, headers  time.Duration
		body, details  string
		idleStat, hdrs uint64
	}{
		{"stream_idle_timeout", 300 * time.Millisecond, 0, "stream timeout", "stream_idle_timeout", 1, 0},
		{"request_headers_timeout", time.Minute, 300 * time.Millisecond, "request header timeout", "request_header_timeout", 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))
			h.StreamIdleTimeout = durationpb.New(tc.idle)
			if tc.headers > 0 {
				h.RequestHeadersTimeout = durationpb.New(tc.headers)
			}
			cfg := mustParse(t, h)
			p := startProxy(t, cfg, env)

			// A keep-alive connection idle past the timeout still serves.
			c := rawConn(t, cfg, env, testPeer)
			io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			if rs := readResponses(t, c, 1); len(rs) != 1 || rs[0].StatusCode != 200 {
				t.Fatal("first request not served")
			}
			time.Sleep(500 * time.Millisecond)
			io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			if rs := readResponses(t, c, 1); len(rs) != 1 || rs[0].StatusCode != 200 {
				t.Error("request after an idle keep-alive pause not served")
			}

			s := rawConnTo(t, p.addr)
			start := time.Now()
			go func() {
				head := "GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + strings.Repeat("a", 100)
				for i := 0; i < len(head); i++ {
					if _, err := s.Write([]byte{head[i]}); err != nil {
						return
					}
					time.Sleep(50 * time.Millisecond)
				}
			}()
			rs := readResponses(t, s, 1)
			el := time.Since(start)
			if len(rs) != 1 || rs[0].StatusCode != http.StatusRequestTimeout || rs[0].Header.Get("X-Test-Body") != tc.body {
				t.Fatalf("slowloris: %v after %v, want 408 %q", rs, el, tc.body)
			}
			if el > 2*time.Second {
				t.Errorf("slowloris answered after %v, want about 300ms", el)
			}
			if !closedAfter(s, 2*time.Second) {
				t.Error("slowloris connection left open")
			}
			e := p.waitEntries(t, 1)[0]
			if e.ResponseCode != 408 || e.ResponseCodeDetails != tc.details {
				t.Errorf("entry %d %q, want 408 %q", e.ResponseCode, e.ResponseCodeDetails, tc.details)
			}
			st := cfg.Stats()
			if st.DownstreamRqIdle.Load() != tc.idleStat || st.DownstreamRqHeaderTimeout.Load() != tc.hdrs {
				t.Errorf("downstream_rq_idle_timeout %d, downstream_rq_header_timeout %d, want %d, %d",
					st.DownstreamRqIdle.Load(), st.DownstreamRqHeaderTimeout.Load(), tc.idleStat, tc.hdrs)
			}
		})
	}
}
