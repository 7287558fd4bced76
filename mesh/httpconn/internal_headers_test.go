package httpconn

import (
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// envoyInternalHeaders are the request headers Envoy's
// ConnectionManagerUtility::cleanInternalHeaders removes from a request
// that is not internal; edgeOnly ones only from an edge request
// (use_remote_address and not internal).
var (
	envoyInternalHeaders = []string{
		"X-Envoy-Retriable-Status-Codes",
		"X-Envoy-Retriable-Header-Names",
		"X-Envoy-Retry-On",
		"X-Envoy-Retry-Grpc-On",
		"X-Envoy-Max-Retries",
		"X-Envoy-Upstream-Alt-Stat-Name",
		"X-Envoy-Upstream-Rq-Timeout-Ms",
		"X-Envoy-Upstream-Rq-Per-Try-Timeout-Ms",
		"X-Envoy-Upstream-Rq-Timeout-Alt-Response",
		"X-Envoy-Expected-Rq-Timeout-Ms",
		"X-Envoy-Force-Trace",
		"X-Envoy-Ip-Tags",
		"X-Envoy-Original-Url",
		"X-Envoy-Hedge-On-Per-Try-Timeout",
		"X-Internal-Secret", // the route configuration's internal_only_headers
	}
	envoyEdgeOnlyHeaders = []string{
		"X-Envoy-Decorator-Operation",
		"X-Envoy-Downstream-Service-Cluster",
		"X-Envoy-Downstream-Service-Node",
	}
)

// TestCleanInternalHeaders: a request that is not internal loses Envoy's
// internal x-envoy-* headers (and internal_only_headers) before routing;
// the decorator/downstream-service ones only when it is an edge request
// (use_remote_address); an internal request keeps them all. The proxy
// itself connects from loopback, so XFF decides.
func TestCleanInternalHeaders(t *testing.T) {
	u := startUpstream(t, named("a"))
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	for _, tc := range []struct {
		name      string
		remote    bool   // use_remote_address
		xff       string // sent by the client
		stripped  bool   // envoyInternalHeaders removed
		edgeStrip bool   // envoyEdgeOnlyHeaders removed
	}{
		{"remote, loopback peer, no XFF: internal", true, "", false, false},
		{"remote, external XFF: edge", true, "203.0.113.7", true, true},
		{"remote, internal XFF: not single, edge", true, "10.0.0.1", true, true},
		{"no remote, no XFF: external", false, "", true, false},
		{"no remote, internal XFF: internal", false, "10.1.2.3", false, false},
		{"no remote, external XFF: external", false, "198.51.100.1", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c")))
			rc.InternalOnlyHeaders = []string{"x-internal-secret"}
			h := hcm(rc)
			h.UseRemoteAddress = wrapperspb.Bool(tc.remote)
			p := startProxy(t, mustParse(t, h), env)
			opts := []reqOpt{}
			if tc.xff != "" {
				opts = append(opts, hdr("X-Forwarded-For", tc.xff))
			}
			for _, k := range append(append([]string{}, envoyInternalHeaders...), envoyEdgeOnlyHeaders...) {
				v := "x"
				switch k {
				case "X-Envoy-Upstream-Rq-Timeout-Ms", "X-Envoy-Upstream-Rq-Per-Try-Timeout-Ms":
					v = "5000" // honoured when internal: long enough
				case "X-Envoy-Max-Retries":
					v = "1"
				case "X-Envoy-Retry-On", "X-Envoy-Retry-Grpc-On":
					v = "connect-failure"
				}
				opts = append(opts, hdr(k, v))
			}
			resp, _ := get(t, client(false), p, "x", "/", opts...)
			if resp.StatusCode != 200 {
				t.Fatalf("status %d", resp.StatusCode)
			}
			for _, k := range envoyInternalHeaders {
				_, seen := resp.Header["X-Seen-"+k]
				switch k {
				case "X-Envoy-Upstream-Rq-Timeout-Ms", "X-Envoy-Upstream-Rq-Per-Try-Timeout-Ms":
					// The router consumes them (Envoy's finalTimeout).
					if seen {
						t.Errorf("%s reached the upstream", k)
					}
					continue
				case "X-Envoy-Expected-Rq-Timeout-Ms":
					// Set by the router itself when it has a timeout.
					continue
				}
				if seen == tc.stripped {
					t.Errorf("%s reached upstream = %v, want %v", k, seen, !tc.stripped)
				}
			}
			for _, k := range envoyEdgeOnlyHeaders {
				if _, seen := resp.Header["X-Seen-"+k]; seen == tc.edgeStrip {
					t.Errorf("%s reached upstream = %v, want %v", k, seen, !tc.edgeStrip)
				}
			}
			if _, seen := resp.Header["X-Seen-X-Envoy-Internal"]; seen != !tc.stripped {
				t.Errorf("x-envoy-internal reached upstream = %v, want %v", seen, !tc.stripped)
			}
		})
	}
}

// TestEnvoyRequestHeadersHonoured: an internal request's
// x-envoy-retry-on / x-envoy-max-retries add retries the route does not
// configure, and x-envoy-upstream-rq-timeout-ms /
// x-envoy-upstream-rq-per-try-timeout-ms replace its timeouts (Envoy's
// router); an external request's are stripped first, so they do nothing.
func TestEnvoyRequestHeadersHonoured(t *testing.T) {
	var calls atomic.Int64
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		switch r.URL.Path {
		case "/flaky": // 503 twice, then 200
			if calls.Add(1)%3 != 0 {
				w.WriteHeader(503)
				return
			}
		case "/slow":
			select {
			case <-time.After(300 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
		}
		w.Header().Set("X-Seen-Expected", r.Header.Get("X-Envoy-Expected-Rq-Timeout-Ms"))
		io.WriteString(w, "ok")
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	route := prefixRoute("/", "c")
	routeAction(route).Timeout = durationpb.New(2 * time.Second)
	h := hcm(routeConfig(vhost("v", []string{"*"}, route)))
	p := startProxy(t, mustParse(t, h), env) // use_remote_address false: XFF decides
	internal := hdr("X-Forwarded-For", "10.0.0.9")
	external := hdr("X-Forwarded-For", "203.0.113.9")
	retry := []reqOpt{hdr("X-Envoy-Retry-On", "5xx"), hdr("X-Envoy-Max-Retries", "2")}

	for _, tc := range []struct {
		name     string
		path     string
		opts     []reqOpt
		code     int
		attempts int
		expected string // x-envoy-expected-rq-timeout-ms seen upstream
	}{
		{"internal: retry headers retry", "/flaky", append([]reqOpt{internal}, retry...), 200, 3, "2000"},
		{"external: retry headers stripped", "/flaky", append([]reqOpt{external}, retry...), 503, 1, ""},
		{"internal: max retries 1 is not enough", "/flaky", []reqOpt{internal, hdr("X-Envoy-Retry-On", "5xx"), hdr("X-Envoy-Max-Retries", "1")}, 503, 2, ""},
		{"internal: rq timeout header", "/slow", []reqOpt{internal, hdr("X-Envoy-Upstream-Rq-Timeout-Ms", "100")}, 504, 1, ""},
		{"external: rq timeout header stripped", "/slow", []reqOpt{external, hdr("X-Envoy-Upstream-Rq-Timeout-Ms", "100")}, 200, 1, "2000"},
		{"internal: per-try timeout header", "/slow", []reqOpt{internal, hdr("X-Envoy-Upstream-Rq-Per-Try-Timeout-Ms", "100")}, 504, 1, ""},
		{"internal: expected timeout from header", "/", []reqOpt{internal, hdr("X-Envoy-Upstream-Rq-Timeout-Ms", "700"), hdr("X-Envoy-Upstream-Rq-Per-Try-Timeout-Ms", "300")}, 200, 1, "300"},
		{"internal: rq timeout 0 disables", "/slow", []reqOpt{internal, hdr("X-Envoy-Upstream-Rq-Timeout-Ms", "0")}, 200, 1, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls.Store(0)
			resp, _ := get(t, client(false), p, "x", tc.path, tc.opts...)
			e := p.lastEntry(t)
			if resp.StatusCode != tc.code || e.Attempts != tc.attempts {
				t.Errorf("%d after %d attempts, want %d after %d", resp.StatusCode, e.Attempts, tc.code, tc.attempts)
			}
			if resp.StatusCode == 200 && resp.Header.Get("X-Seen-Expected") != tc.expected {
				t.Errorf("x-envoy-expected-rq-timeout-ms upstream %q, want %q", resp.Header.Get("X-Seen-Expected"), tc.expected)
			}
		})
	}
}
