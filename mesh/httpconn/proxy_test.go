package httpconn

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestHostAndPrefixRouting: one listener config, two clusters, routed by
// Host (with and without port) and by path prefix, over HTTP/1.1 and h2c.
func TestHostAndPrefixRouting(t *testing.T) {
	a, b := startUpstream(t, named("a")), startUpstream(t, named("b"))
	env := newEnv(t, xdstest.StaticCluster("a", a.addr), xdstest.StaticCluster("b", b.addr))
	cfg := mustParse(t, hcm(routeConfig(
		vhost("a", []string{"a.example", "a.example:80"}, prefixRoute("/api", "b"), prefixRoute("/", "a")),
		vhost("b", []string{"b.example", "b.example:8080"}, prefixRoute("/", "b")),
	)))
	p := startProxy(t, cfg, env)
	for _, h2 := range []bool{false, true} {
		c := client(h2)
		for _, tc := range []struct{ host, path, want string }{
			{"a.example", "/", "a"},
			{"a.example:80", "/x", "a"},
			{"A.Example", "/", "a"},
			{"a.example", "/api/v1", "b"},
			{"b.example", "/", "b"},
			{"b.example:8080", "/api", "b"},
		} {
			resp, body := get(t, c, p, tc.host, tc.path)
			if resp.StatusCode != 200 || body != tc.want {
				t.Errorf("h2=%v %s%s: %d %q, want %q", h2, tc.host, tc.path, resp.StatusCode, body, tc.want)
			}
			wantProto := "HTTP/1.1"
			if h2 {
				wantProto = "HTTP/2.0"
			}
			if resp.Proto != wantProto {
				t.Errorf("downstream proto %s, want %s", resp.Proto, wantProto)
			}
			if got := resp.Header.Get("X-Seen-Proto"); got != "HTTP/1.1" {
				t.Errorf("upstream saw %s, want HTTP/1.1 (cluster without http2 options)", got)
			}
		}
		resp, _ := get(t, c, p, "c.example", "/")
		if resp.StatusCode != 404 {
			t.Errorf("unknown host: %d, want 404", resp.StatusCode)
		}
		if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagNR) {
			t.Errorf("unknown host flags %s, want NR", e.ResponseFlags)
		}
	}
	if v := cfg.Stats().DownstreamCxHTTP2Total.Load(); v == 0 {
		t.Error("downstream_cx_http2_total = 0 after h2c requests")
	}
}

// TestWeightedClusters: 80/20 over 1,000 requests lands within ±5%.
func TestWeightedClusters(t *testing.T) {
	a, b := startUpstream(t, named("a")), startUpstream(t, named("b"))
	env := newEnv(t, xdstest.StaticCluster("a", a.addr), xdstest.StaticCluster("b", b.addr))
	r := prefixRoute("/", "")
	routeAction(r).ClusterSpecifier = &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{
		Clusters: []*routev3.WeightedCluster_ClusterWeight{
			{Name: "a", Weight: wrapperspb.UInt32(80)},
			{Name: "b", Weight: wrapperspb.UInt32(20)},
		},
	}}
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env)
	for _, h2 := range []bool{false, true} {
		c := client(h2)
		count := map[string]int{}
		for i := 0; i < 1000; i++ {
			_, body := get(t, c, p, "any", "/")
			count[body]++
		}
		if count["a"] < 750 || count["a"] > 850 || count["a"]+count["b"] != 1000 {
			t.Errorf("h2=%v: split %v, want a=800±50", h2, count)
		}
	}
}

// TestRetryPreviousHosts: a host that answers 503 is retried on the other
// host, never itself again (previous_hosts); counters show the retries.
// The bad host has nearly all the weight, so that without the predicate
// weighted round robin would pick it again for the retry (with equal
// weights plain rotation alternates and the test could not tell).
func TestRetryPreviousHosts(t *testing.T) {
	bad := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(503)
		io.WriteString(w, "bad")
	})
	good := startUpstream(t, named("good"))
	env := newEnv(t, weightedStatic("c", []netip.AddrPort{bad.addr, good.addr}, []uint32{100, 1}))
	r := prefixRoute("/", "c")
	routeAction(r).RetryPolicy = &routev3.RetryPolicy{
		RetryOn:            "5xx",
		NumRetries:         wrapperspb.UInt32(1),
		RetryHostPredicate: []*routev3.RetryPolicy_RetryHostPredicate{{Name: "envoy.retry_host_predicates.previous_hosts"}},
		RetryBackOff:       &routev3.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(time.Millisecond)},
	}
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env)
	c := client(false)
	for i := 0; i < 20; i++ {
		resp, body := get(t, c, p, "x", "/")
		if resp.StatusCode != 200 || body != "good" {
			t.Fatalf("request %d: %d %q, want 200 from the good host", i, resp.StatusCode, body)
		}
	}
	cl := env.clusters["c"]
	retries := clusterStat(t, cl, "upstream_rq_retry")
	if retries == 0 || retries != uint64(bad.requests.Load()) {
		t.Errorf("upstream_rq_retry = %d, bad host hit %d times: each bad answer must be retried once", retries, bad.requests.Load())
	}
	if good.requests.Load() != 20 {
		t.Errorf("good host served %d, want 20", good.requests.Load())
	}
	if v := clusterStat(t, cl, "upstream_rq_retry_success"); v != retries {
		t.Errorf("upstream_rq_retry_success = %d, want %d", v, retries)
	}
	if v := clusterStat(t, cl, "upstream_rq_503"); v != retries {
		t.Errorf("upstream_rq_503 = %d, want %d", v, retries)
	}
	if v := clusterStat(t, cl, "upstream_rq_total"); v != 20+retries {
		t.Errorf("upstream_rq_total = %d, want %d", v, 20+retries)
	}
	for _, h := range cl.Hosts() {
		xdstest.Eventually(t, 2*time.Second, "host stats", func() bool { return hostStat(h, "rq_active") == 0 })
		if h.Address() == bad.addr && hostStat(h, "rq_error") != retries {
			t.Errorf("bad host rq_error = %d, want %d", hostStat(h, "rq_error"), retries)
		}
		if h.Address() == good.addr && hostStat(h, "rq_success") != 20 {
			t.Errorf("good host rq_success = %d, want 20", hostStat(h, "rq_success"))
		}
	}

	// Only the bad host: the retry is exhausted, 503 with URX.
	env2 := newEnv(t, xdstest.StaticCluster("c", bad.addr))
	p2 := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env2)
	resp, _ := get(t, c, p2, "x", "/")
	if resp.StatusCode != 503 {
		t.Fatalf("exhausted retries: %d, want the upstream's 503", resp.StatusCode)
	}
	if e := p2.lastEntry(t); !e.ResponseFlags.Has(FlagURX) || e.Attempts != 2 {
		t.Errorf("flags %s attempts %d, want URX after 2 attempts", e.ResponseFlags, e.Attempts)
	}
}

// TestRetryConnectFailure: a refusing host (UF) is retried on another.
func TestRetryConnectFailure(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	good := startUpstream(t, named("good"))
	env := newEnv(t, xdstest.StaticCluster("c", dead, good.addr))
	r := prefixRoute("/", "c")
	routeAction(r).RetryPolicy = &routev3.RetryPolicy{RetryOn: "connect-failure", NumRetries: wrapperspb.UInt32(2),
		RetryHostPredicate: []*routev3.RetryPolicy_RetryHostPredicate{{Name: previousHostsPredicate}}}
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env)
	for i := 0; i < 6; i++ {
		if resp, body := get(t, client(false), p, "x", "/"); resp.StatusCode != 200 || body != "good" {
			t.Fatalf("%d %q", resp.StatusCode, body)
		}
	}
	// Without retries: 503 UF with Envoy's local reply body.
	env2 := newEnv(t, xdstest.StaticCluster("c", dead))
	p2 := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env2)
	resp, body := get(t, client(false), p2, "x", "/")
	if resp.StatusCode != 503 || !contains(body, "reset reason: connection failure") {
		t.Errorf("%d %q", resp.StatusCode, body)
	}
	if e := p2.lastEntry(t); !e.ResponseFlags.Has(FlagUF) {
		t.Errorf("flags %s, want UF", e.ResponseFlags)
	}
}

// TestBlockAll: Istio's REGISTRY_ONLY block_all virtual host answers 502.
func TestBlockAll(t *testing.T) {
	env := newEnv(t)
	blockAll := vhost("block_all", []string{"*"}, &routev3.Route{
		Name:   "block_all",
		Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 502}},
	})
	p := startProxy(t, mustParse(t, hcm(routeConfig(blockAll))), env)
	for _, h2 := range []bool{false, true} {
		resp, _ := get(t, client(h2), p, "unknown.svc:8080", "/anything")
		if resp.StatusCode != 502 {
			t.Errorf("h2=%v: %d, want 502", h2, resp.StatusCode)
		}
		if resp.Header.Get("Server") != "envoy" {
			t.Errorf("server %q", resp.Header.Get("Server"))
		}
	}
	if e := p.lastEntry(t); e.RouteName != "block_all" || e.ResponseCode != 502 {
		t.Errorf("entry %+v", e)
	}
}

// TestKeepAlivePooling: 1,000 requests over 10 client connections use at
// most 10 upstream connections (HTTP/1.1), and one for h2c upstreams.
func TestKeepAlivePooling(t *testing.T) {
	for _, h2up := range []bool{false, true} {
		u := startUpstream(t, named("u"))
		pb := xdstest.StaticCluster("c", u.addr)
		if h2up {
			pb = withH2(pb)
		}
		env := newEnv(t, pb)
		p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
		var wg sync.WaitGroup
		errs := make(chan error, 10)
		for i := 0; i < 10; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := client(false)
				c.Transport.(*http.Transport).MaxConnsPerHost = 1
				for j := 0; j < 100; j++ {
					resp, err := c.Get("http://" + p.addr + "/")
					if err != nil {
						errs <- err
						return
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						errs <- fmt.Errorf("status %d", resp.StatusCode)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		max := int64(10)
		if h2up {
			max = 1
		}
		if u.requests.Load() != 1000 || u.accepts.Load() > max {
			t.Errorf("h2 upstream=%v: %d requests over %d upstream connections, want 1000 over ≤%d", h2up, u.requests.Load(), u.accepts.Load(), max)
		}
		if v := clusterStat(t, env.clusters["c"], "upstream_cx_total"); int64(v) != u.accepts.Load() {
			t.Errorf("upstream_cx_total %d != accepts %d: a pooled connection bypassed the cluster", v, u.accepts.Load())
		}
		proto := "upstream_cx_http1_total"
		if h2up {
			proto = "upstream_cx_http2_total"
		}
		if v := clusterStat(t, env.clusters["c"], proto); int64(v) != u.accepts.Load() {
			t.Errorf("%s = %d", proto, v)
		}
	}
}

// rawExchange writes raw bytes on a new connection and returns the status
// line of the answer.
func rawExchange(t *testing.T, addr, req string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("reading answer to %q: %v", req[:min(len(req), 40)], err)
	}
	return strings.TrimSpace(line)
}

// TestMalformedRequests: a bad request line, oversized headers and an
// invalid chunked body get 4xx, while another connection's keep-alive
// exchange goes on undisturbed.
func TestMalformedRequests(t *testing.T) {
	u := startUpstream(t, named("u"))
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)

	// A healthy keep-alive connection opened before the bad ones.
	good, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	br := bufio.NewReader(good)
	exchange := func() {
		t.Helper()
		io.WriteString(good, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("good connection: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("good connection: %d", resp.StatusCode)
		}
	}
	exchange()

	big := strings.Repeat("a", 61<<10)
	for _, tc := range []struct{ name, req, want string }{
		{"bad request line", "GARBAGE\r\n\r\n", "HTTP/1.1 400"},
		{"bad version", "GET / HTTP/9.9\r\nHost: x\r\n\r\n", "HTTP/1.1 505"},
		{"oversized headers", "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + big + "\r\n\r\n", "HTTP/1.1 431"},
		{"invalid chunk size", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "HTTP/1.1 400"},
		{"bad chunk trailer", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", "HTTP/1.1 400"},
		{"unsupported transfer-encoding", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "HTTP/1.1 501"},
	} {
		if got := rawExchange(t, p.addr, tc.req); !strings.HasPrefix(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
		exchange()
	}
	// Headers just under the limit pass.
	ok := strings.Repeat("a", 50<<10)
	if got := rawExchange(t, p.addr, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: "+ok+"\r\n\r\n"); !strings.HasPrefix(got, "HTTP/1.1 200") {
		t.Errorf("50 KiB header: %q", got)
	}
}

// TestDrain: the listener's drain start (ConnInfo.Draining) lets the
// in-flight request finish with "Connection: close" (HTTP/1.1); an HTTP/2
// connection gets GOAWAY and its in-flight stream still completes. A
// connection that arrives while the listener drains is served, and told
// to close the same way.
func TestDrain(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{}, 2)
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			started <- struct{}{}
			<-release
		}
		io.WriteString(w, "done")
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	cfg := mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c")))))
	for _, h2 := range []bool{false, true} {
		p := startProxy(t, cfg, env)
		c := client(h2)
		type result struct {
			resp *http.Response
			body string
			err  error
		}
		res := make(chan result, 1)
		go func() {
			resp, err := c.Get("http://" + p.addr + "/hold")
			if err != nil {
				res <- result{err: err}
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			res <- result{resp: resp, body: string(b)}
		}()
		<-started
		p.drain()
		time.Sleep(50 * time.Millisecond)
		release <- struct{}{}
		r := <-res
		if r.err != nil || r.resp.StatusCode != 200 || r.body != "done" {
			t.Fatalf("h2=%v: in-flight request during drain: %v %v", h2, r.err, r.resp)
		}
		if !h2 && !r.resp.Close {
			t.Errorf("HTTP/1.1 response during drain lacks Connection: close")
		}
		// A new connection on the draining listener is served; HTTP/1.1
		// says Connection: close (HTTP/2's GOAWAY: TestDrainGoAway).
		resp, err := client(h2).Get("http://" + p.addr + "/")
		if err != nil {
			t.Fatalf("h2=%v: request on a new connection while draining: %v", h2, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 || (!h2 && !resp.Close) {
			t.Errorf("h2=%v: request on a new connection while draining: %d, close %v; want 200 with Connection: close", h2, resp.StatusCode, resp.Close)
		}
	}
}

// TestTimeouts: the route timeout gives 504 UT; a per-try timeout is
// retried only under retry_on conditions that cover an upstream that does
// not respond (5xx, gateway-error, reset: Envoy's "disconnect/reset/read
// timeout"), not under connect-failure (which Envoy documents as not
// including request timeouts), reset-before-request (the request was
// sent) or retriable-status-codes; a route timeout of 0 disables it.
func TestTimeouts(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if d, err := time.ParseDuration(r.Header.Get("X-Sleep")); err == nil {
			select {
			case <-time.After(d):
			case <-r.Context().Done():
			}
		}
		io.WriteString(w, "ok")
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	r1 := prefixRoute("/short", "c")
	routeAction(r1).Timeout = durationpb.New(100 * time.Millisecond)
	r2 := prefixRoute("/pertry", "c")
	routeAction(r2).RetryPolicy = &routev3.RetryPolicy{RetryOn: "reset", NumRetries: wrapperspb.UInt32(2), PerTryTimeout: durationpb.New(50 * time.Millisecond)}
	r3 := prefixRoute("/none", "c")
	routeAction(r3).Timeout = durationpb.New(0)
	var noRetry []*routev3.Route
	for _, on := range []string{"connect-failure", "reset-before-request", "retriable-status-codes", "refused-stream,unavailable"} {
		r := prefixRoute("/"+on, "c")
		routeAction(r).RetryPolicy = &routev3.RetryPolicy{RetryOn: on, NumRetries: wrapperspb.UInt32(2), RetriableStatusCodes: []uint32{504},
			PerTryTimeout: durationpb.New(50 * time.Millisecond)}
		noRetry = append(noRetry, r)
	}
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, append([]*routev3.Route{r1, r2, r3}, noRetry...)...)))), env)
	c := client(false)

	start := time.Now()
	resp, body := get(t, c, p, "x", "/short", hdr("X-Sleep", "2s"))
	if resp.StatusCode != 504 || body != "upstream request timeout" || time.Since(start) > time.Second {
		t.Errorf("route timeout: %d %q after %v", resp.StatusCode, body, time.Since(start))
	}
	if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagUT) {
		t.Errorf("flags %s, want UT", e.ResponseFlags)
	}
	if v := clusterStat(t, env.clusters["c"], "upstream_rq_timeout"); v != 1 {
		t.Errorf("upstream_rq_timeout = %d", v)
	}
	resp, _ = get(t, c, p, "x", "/pertry", hdr("X-Sleep", "1s"))
	if resp.StatusCode != 504 {
		t.Errorf("per-try timeout: %d", resp.StatusCode)
	}
	if v := clusterStat(t, env.clusters["c"], "upstream_rq_per_try_timeout"); v != 3 {
		t.Errorf("upstream_rq_per_try_timeout = %d, want 3 (1 + 2 retries)", v)
	}
	if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagUT|FlagURX) || e.Attempts != 3 {
		t.Errorf("per-try: flags %s attempts %d", e.ResponseFlags, e.Attempts)
	}
	for _, r := range noRetry {
		path := r.GetMatch().GetPrefix()
		before := clusterStat(t, env.clusters["c"], "upstream_rq_per_try_timeout")
		resp, _ = get(t, c, p, "x", path, hdr("X-Sleep", "1s"))
		if resp.StatusCode != 504 {
			t.Errorf("%s: per-try timeout: %d, want 504", path, resp.StatusCode)
		}
		if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagUT) || e.ResponseFlags.Has(FlagURX) || e.Attempts != 1 {
			t.Errorf("retry_on %s: flags %s attempts %d, want UT after 1 attempt (a per-try timeout is not retried)", path[1:], e.ResponseFlags, e.Attempts)
		}
		if v := clusterStat(t, env.clusters["c"], "upstream_rq_per_try_timeout"); v != before+1 {
			t.Errorf("%s: upstream_rq_per_try_timeout +%d, want +1", path, v-before)
		}
	}
	resp, body = get(t, c, p, "x", "/none", hdr("X-Sleep", "300ms"))
	if resp.StatusCode != 200 || body != "ok" {
		t.Errorf("no timeout: %d %q", resp.StatusCode, body)
	}
}

// TestClusterHeaderAndNoCluster: cluster_header picks the cluster; an
// unknown or missing one gives 503 NC.
func TestClusterHeaderAndNoCluster(t *testing.T) {
	a := startUpstream(t, named("a"))
	env := newEnv(t, xdstest.StaticCluster("a", a.addr))
	r := prefixRoute("/hdr", "")
	routeAction(r).ClusterSpecifier = &routev3.RouteAction_ClusterHeader{ClusterHeader: "x-cluster"}
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r, prefixRoute("/gone", "missing"))))), env)
	c := client(false)
	if resp, body := get(t, c, p, "x", "/hdr", hdr("X-Cluster", "a")); resp.StatusCode != 200 || body != "a" {
		t.Errorf("cluster_header a: %d %q", resp.StatusCode, body)
	}
	for _, tc := range []struct {
		path string
		opts []reqOpt
	}{{"/hdr", []reqOpt{hdr("X-Cluster", "nope")}}, {"/hdr", nil}, {"/gone", nil}} {
		resp, _ := get(t, c, p, "x", tc.path, tc.opts...)
		if resp.StatusCode != 503 {
			t.Errorf("%s: %d, want 503", tc.path, resp.StatusCode)
		}
		if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagNC) {
			t.Errorf("%s: flags %s, want NC", tc.path, e.ResponseFlags)
		}
	}
}

// TestRDS: routes come from Env by name; an unknown name is 404 NR.
func TestRDS(t *testing.T) {
	a := startUpstream(t, named("a"))
	env := newEnv(t, xdstest.StaticCluster("a", a.addr))
	h := hcm(nil)
	h.RouteSpecifier = &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: "r1", ConfigSource: &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}}}
	cfg := mustParse(t, h)
	if cfg.RDSName() != "r1" {
		t.Fatalf("RDSName %q", cfg.RDSName())
	}
	p := startProxy(t, cfg, env)
	c := client(false)
	if resp, _ := get(t, c, p, "x", "/"); resp.StatusCode != 404 {
		t.Errorf("before RDS: %d, want 404", resp.StatusCode)
	}
	rt, err := CompileRoutes(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "a"))))
	if err != nil {
		t.Fatal(err)
	}
	env.routes["r1"] = rt
	if resp, body := get(t, c, p, "x", "/"); resp.StatusCode != 200 || body != "a" {
		t.Errorf("after RDS: %d %q", resp.StatusCode, body)
	}
}

// TestCircuitBreakerMaxRequests: max_requests 1 with a request in flight
// makes the next one 503 UO and counts upstream_rq_pending_overflow.
func TestCircuitBreakerMaxRequests(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		<-release
	})
	pb := xdstest.StaticCluster("c", u.addr)
	pb.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{MaxRequests: wrapperspb.UInt32(1)}}}
	env := newEnv(t, pb)
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	done := make(chan struct{})
	go func() {
		defer close(done)
		get(t, client(false), p, "x", "/")
	}()
	<-started
	resp, body := get(t, client(false), p, "x", "/")
	close(release)
	<-done
	if resp.StatusCode != 503 || !contains(body, "overflow") {
		t.Errorf("%d %q, want 503 overflow", resp.StatusCode, body)
	}
	if v := clusterStat(t, env.clusters["c"], "upstream_rq_pending_overflow"); v != 1 {
		t.Errorf("upstream_rq_pending_overflow = %d", v)
	}
	es := p.waitEntries(t, 2)
	found := false
	for _, e := range es {
		found = found || e.ResponseFlags.Has(FlagUO)
	}
	if !found {
		t.Error("no UO entry")
	}
}

// TestHeadersEnvoyAdds: x-request-id (generated or kept),
// x-forwarded-proto, x-forwarded-for with use_remote_address,
// x-envoy-upstream-service-time, server: server_name, attempt count.
func TestHeadersEnvoyAdds(t *testing.T) {
	u := startUpstream(t, named("u"))
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	v := vhost("v", []string{"*"}, prefixRoute("/", "c"))
	v.IncludeRequestAttemptCount, v.IncludeAttemptCountInResponse = true, true
	h := hcm(routeConfig(v))
	h.UseRemoteAddress = wrapperspb.Bool(true)
	h.ServerName = "meshtun"
	p := startProxy(t, mustParse(t, h), env)
	c := client(false)
	resp, _ := get(t, c, p, "x", "/", hdr("X-Forwarded-For", "10.0.0.1"), hdr("User-Agent", ""))
	rh := resp.Header
	if id := rh.Get("X-Seen-X-Request-Id"); len(id) != 36 || id[14] != '4' {
		t.Errorf("generated x-request-id %q", id)
	}
	if rh.Get("X-Seen-X-Forwarded-Proto") != "http" {
		t.Errorf("x-forwarded-proto %q", rh.Get("X-Seen-X-Forwarded-Proto"))
	}
	if got := rh.Get("X-Seen-X-Forwarded-For"); got != "10.0.0.1,127.0.0.1" {
		t.Errorf("x-forwarded-for %q", got)
	}
	if rh.Get("X-Envoy-Upstream-Service-Time") == "" {
		t.Error("no x-envoy-upstream-service-time")
	}
	if rh.Get("Server") != "meshtun" {
		t.Errorf("server %q, want server_name", rh.Get("Server"))
	}
	if rh.Get("X-Seen-X-Envoy-Attempt-Count") != "1" || rh.Get("X-Envoy-Attempt-Count") != "1" {
		t.Errorf("attempt count %q %q", rh.Get("X-Seen-X-Envoy-Attempt-Count"), rh.Get("X-Envoy-Attempt-Count"))
	}
	if rh.Get("X-Seen-X-Envoy-Expected-Rq-Timeout-Ms") != "15000" {
		t.Errorf("x-envoy-expected-rq-timeout-ms %q", rh.Get("X-Seen-X-Envoy-Expected-Rq-Timeout-Ms"))
	}
	if rh.Get("X-Seen-User-Agent") != "" {
		t.Errorf("the proxy added a user-agent: %q", rh.Get("X-Seen-User-Agent"))
	}
	resp, _ = get(t, c, p, "x", "/", hdr("X-Request-Id", "keep-me"))
	if resp.Header.Get("X-Seen-X-Request-Id") != "keep-me" {
		t.Errorf("x-request-id not kept: %q", resp.Header.Get("X-Seen-X-Request-Id"))
	}
	if e := p.lastEntry(t); e.RequestID != "keep-me" || e.Method != "GET" || e.Path != "/" || e.ResponseCode != 200 ||
		e.UpstreamCluster != "c" || e.UpstreamHost != u.addr || e.BytesSent != 1 {
		t.Errorf("access log entry %+v", e)
	}
}

// TestRewritesAndHeaderOps: prefix_rewrite, regex_rewrite,
// host_rewrite_literal and header edits at route, virtual host and route
// configuration levels.
func TestRewritesAndHeaderOps(t *testing.T) {
	u := startUpstream(t, named("u"))
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	r1 := prefixRoute("/old/", "c")
	routeAction(r1).PrefixRewrite = "/new/"
	routeAction(r1).HostRewriteSpecifier = &routev3.RouteAction_HostRewriteLiteral{HostRewriteLiteral: "rewritten.example"}
	r1.RequestHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-level", Value: "route"}}}
	r1.RequestHeadersToRemove = []string{"x-drop"}
	r1.ResponseHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-resp", Value: "route"}}}
	r2 := prefixRoute("/re/", "c")
	routeAction(r2).RegexRewrite = &matcherv3.RegexMatchAndSubstitute{Pattern: &matcherv3.RegexMatcher{Regex: "^/re/(\\w+)/(\\w+)$"}, Substitution: "/\\2/\\1"}
	v := vhost("v", []string{"*"}, r1, r2)
	v.RequestHeadersToAdd = []*corev3.HeaderValueOption{
		{Header: &corev3.HeaderValue{Key: "x-level", Value: "vhost"}},
		{Header: &corev3.HeaderValue{Key: "x-peer", Value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}},
	}
	rc := routeConfig(v)
	rc.RequestHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-level", Value: "config"}, AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD}}
	rc.ResponseHeadersToRemove = []string{"x-upstream"}
	p := startProxy(t, mustParse(t, hcm(rc)), env)
	c := client(false)
	resp, _ := get(t, c, p, "orig.example", "/old/a/b?q=1", hdr("X-Drop", "1"))
	rh := resp.Header
	if rh.Get("X-Seen-Path") != "/new/a/b?q=1" {
		t.Errorf("prefix_rewrite: upstream saw %q", rh.Get("X-Seen-Path"))
	}
	if rh.Get("X-Seen-X-Envoy-Original-Path") != "/old/a/b?q=1" {
		t.Errorf("x-envoy-original-path %q", rh.Get("X-Seen-X-Envoy-Original-Path"))
	}
	if rh.Get("X-Seen-Host") != "rewritten.example" {
		t.Errorf("host_rewrite_literal: %q", rh.Get("X-Seen-Host"))
	}
	if got := rh.Values("X-Seen-X-Level"); len(got) != 1 || got[0] != "config" {
		t.Errorf("x-level %q: the route configuration level overwrites last (Envoy's default order)", got)
	}
	if rh.Get("X-Seen-X-Drop") != "" {
		t.Error("x-drop not removed")
	}
	if rh.Get("X-Seen-X-Peer") != "127.0.0.1" {
		t.Errorf("%%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%% = %q", rh.Get("X-Seen-X-Peer"))
	}
	if rh.Get("X-Resp") != "route" || rh.Get("X-Upstream") != "" {
		t.Errorf("response headers: x-resp %q x-upstream %q", rh.Get("X-Resp"), rh.Get("X-Upstream"))
	}
	resp, _ = get(t, c, p, "x", "/re/one/two")
	if resp.Header.Get("X-Seen-Path") != "/two/one" {
		t.Errorf("regex_rewrite: %q", resp.Header.Get("X-Seen-Path"))
	}
}

// TestRedirect: redirect actions build Location as Envoy does.
func TestRedirect(t *testing.T) {
	env := newEnv(t)
	redir := func(prefix string, ra *routev3.RedirectAction) *routev3.Route {
		return &routev3.Route{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: prefix}},
			Action: &routev3.Route_Redirect{Redirect: ra}}
	}
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"},
		redir("/https", &routev3.RedirectAction{SchemeRewriteSpecifier: &routev3.RedirectAction_HttpsRedirect{HttpsRedirect: true}}),
		redir("/host", &routev3.RedirectAction{HostRedirect: "other.example", PortRedirect: 8443, ResponseCode: routev3.RedirectAction_FOUND}),
		redir("/path", &routev3.RedirectAction{PathRewriteSpecifier: &routev3.RedirectAction_PathRedirect{PathRedirect: "/elsewhere"}, StripQuery: true}),
		redir("/pre/", &routev3.RedirectAction{PathRewriteSpecifier: &routev3.RedirectAction_PrefixRewrite{PrefixRewrite: "/post/"}, ResponseCode: routev3.RedirectAction_PERMANENT_REDIRECT}),
	)))), env)
	c := client(false)
	for _, tc := range []struct {
		path string
		code int
		loc  string
	}{
		{"/https/x?a=1", 301, "https://site.example/https/x?a=1"},
		{"/host/y", 302, "http://other.example:8443/host/y"},
		{"/path/z?q=1", 301, "http://site.example/elsewhere"},
		{"/pre/k?q=2", 308, "http://site.example/post/k?q=2"},
	} {
		resp, _ := get(t, c, p, "site.example", tc.path)
		if resp.StatusCode != tc.code || resp.Header.Get("Location") != tc.loc {
			t.Errorf("%s: %d %q, want %d %q", tc.path, resp.StatusCode, resp.Header.Get("Location"), tc.code, tc.loc)
		}
	}
}

// TestUnknownClusterAndNoHealthy: an empty cluster gives 503 UH with
// Envoy's body.
func TestNoHealthyUpstream(t *testing.T) {
	env := newEnv(t, xdstest.Cluster("empty"))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "empty"))))), env)
	resp, body := get(t, client(false), p, "x", "/")
	if resp.StatusCode != 503 || body != "no healthy upstream" {
		t.Errorf("%d %q", resp.StatusCode, body)
	}
	if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagUH) {
		t.Errorf("flags %s", e.ResponseFlags)
	}
}

// TestPostBodyRetried: a request body is replayed on a retry.
func TestPostBodyRetried(t *testing.T) {
	var mu sync.Mutex
	var bodies []string
	n := 0
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies = append(bodies, string(b))
		n++
		first := n == 1
		mu.Unlock()
		if first {
			w.WriteHeader(503)
			return
		}
		w.Write(b)
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	r := prefixRoute("/", "c")
	routeAction(r).RetryPolicy = &routev3.RetryPolicy{RetryOn: "gateway-error", NumRetries: wrapperspb.UInt32(1)}
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env)
	for _, h2 := range []bool{false, true} {
		mu.Lock()
		n, bodies = 0, nil
		mu.Unlock()
		resp, err := client(h2).Post("http://"+p.addr+"/", "text/plain", strings.NewReader("payload"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "payload" || len(bodies) != 2 || bodies[0] != "payload" {
			t.Errorf("h2=%v: %d %q, upstream saw %q", h2, resp.StatusCode, b, bodies)
		}
	}
}

// TestStreamIdleTimeout: an upstream silent past stream_idle_timeout
// gives 408 with flag SI... as Envoy when the response has not started.
func TestStreamIdleTimeout(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
		case <-r.Context().Done():
		}
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	h := hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))
	h.StreamIdleTimeout = durationpb.New(100 * time.Millisecond)
	p := startProxy(t, mustParse(t, h), env)
	resp, _ := get(t, client(false), p, "x", "/")
	if resp.StatusCode != 408 {
		t.Errorf("%d, want 408", resp.StatusCode)
	}
	if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagSI) {
		t.Errorf("flags %s, want SI", e.ResponseFlags)
	}
}

// TestDownstreamCancel: a client that goes away cancels the upstream
// request (flag DC).
func TestDownstreamCancel(t *testing.T) {
	gotCancel := make(chan struct{}, 1)
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done()
		gotCancel <- struct{}{}
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+p.addr+"/", nil)
	p.sent.Add(1)
	if _, err := client(false).Do(req); err == nil {
		t.Fatal("request did not time out")
	}
	select {
	case <-gotCancel:
	case <-time.After(3 * time.Second):
		t.Fatal("upstream request not cancelled")
	}
	if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagDC) {
		t.Errorf("flags %s, want DC", e.ResponseFlags)
	}
}
