package httpconn

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/cluster"
)

// retryAll is a policy under which every attempt may be retried, as
// Istio's num_retries: 2 on every virtual host.
func retryAll(on string) *routev3.RetryPolicy {
	return &routev3.RetryPolicy{RetryOn: on, NumRetries: wrapperspb.UInt32(2),
		RetryBackOff: &routev3.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(time.Millisecond)}}
}

// TestStreamingBodyUnderRetryPolicy: with a retry policy the request body
// still streams: a client that sends the first chunk and waits for the
// upstream to have seen it before sending the rest (gRPC client
// streaming, a large upload) completes. Over h2c upstreams an early 503
// (after the first chunk) is retried with the chunk replayed and the rest
// of the stream following.
func TestStreamingBodyUnderRetryPolicy(t *testing.T) {
	for _, tc := range []struct {
		name       string
		down, up   bool // h2c downstream, h2c upstream
		early503   bool // the first attempt answers 503 after the first chunk
		wantTries  int64
		wantUpBody string
	}{
		{name: "h1-h1", wantTries: 1},
		{name: "h2-h1", down: true, wantTries: 1},
		{name: "h2-h2", down: true, up: true, wantTries: 1},
		{name: "h2-h2 early 503 retried", down: true, up: true, early503: true, wantTries: 2},
		{name: "h1-h1 503 retried", early503: true, wantTries: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seen := make(chan struct{}, 4)
			var tries atomic.Int64
			u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				n := tries.Add(1)
				first := make([]byte, len("first"))
				if _, err := io.ReadFull(r.Body, first); err != nil {
					http.Error(w, err.Error(), 400)
					return
				}
				seen <- struct{}{}
				if tc.early503 && n == 1 {
					w.WriteHeader(503)
					return
				}
				rest, _ := io.ReadAll(r.Body)
				w.Write(first)
				w.Write(rest)
			})
			pb := xdstest.StaticCluster("c", u.addr)
			if tc.up {
				pb = withH2(pb)
			}
			env := newEnv(t, pb)
			rt := prefixRoute("/", "c")
			routeAction(rt).RetryPolicy = retryAll("5xx")
			p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, rt)))), env)

			pr, pw := io.Pipe()
			defer pw.Close()
			type result struct {
				code int
				body string
				err  error
			}
			res := make(chan result, 1)
			go func() {
				req, _ := http.NewRequest("POST", "http://"+p.addr+"/", pr)
				resp, err := client(tc.down).Do(req)
				if err != nil {
					res <- result{err: err}
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				res <- result{code: resp.StatusCode, body: string(b)}
			}()
			go pw.Write([]byte("first"))
			select {
			case <-seen:
			case r := <-res:
				t.Fatalf("finished before the upstream saw the first chunk: %+v", r)
			case <-time.After(5 * time.Second):
				t.Fatal("the upstream never saw the first chunk: the proxy holds the body back until its end")
			}
			if tc.early503 && !tc.up {
				// HTTP/1.1 upstream: the 503 is read once the body is written.
			} else if tc.early503 {
				// The retry replays the first chunk before the rest exists.
				select {
				case <-seen:
				case <-time.After(5 * time.Second):
					t.Fatal("the retry did not replay the first chunk")
				}
			}
			io.WriteString(pw, "second")
			pw.Close()
			if tc.early503 && !tc.up {
				<-seen
			}
			var r result
			select {
			case r = <-res:
			case <-time.After(5 * time.Second):
				t.Fatal("no response")
			}
			if r.err != nil || r.code != 200 || r.body != "firstsecond" {
				t.Fatalf("%+v, want 200 firstsecond", r)
			}
			if tries.Load() != tc.wantTries {
				t.Errorf("upstream attempts %d, want %d", tries.Load(), tc.wantTries)
			}
		})
	}
}

// TestRetryBufferOverflow: a body larger than the retry buffer streams
// through, is not retried (retry_or_shadow_abandoned), and the upstream's
// answer passes through.
func TestRetryBufferOverflow(t *testing.T) {
	var tries, got atomic.Int64
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		tries.Add(1)
		n, _ := io.Copy(io.Discard, r.Body)
		got.Store(n)
		w.WriteHeader(503)
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	rt := prefixRoute("/", "c")
	routeAction(rt).RetryPolicy = retryAll("5xx")
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, rt)))), env)
	size := maxRetryBuffer + 100<<10
	resp, err := client(false).Post("http://"+p.addr+"/", "application/octet-stream", bytes.NewReader(make([]byte, size)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 503 || tries.Load() != 1 || got.Load() != int64(size) {
		t.Errorf("status %d after %d attempts, upstream got %d bytes; want the upstream's 503 after 1 attempt with %d bytes", resp.StatusCode, tries.Load(), got.Load(), size)
	}
	if v := clusterStat(t, env.clusters["c"], "retry_or_shadow_abandoned"); v != 1 {
		t.Errorf("retry_or_shadow_abandoned = %d, want 1", v)
	}
	if v := clusterStat(t, env.clusters["c"], "upstream_rq_retry"); v != 0 {
		t.Errorf("upstream_rq_retry = %d, want 0", v)
	}
}

// rawUpstream is an HTTP/1.1 server that answers every request with its
// body (200, Content-Length, no "Connection: close") and then either
// closes the connection at once (closeAfter) or, on the connection's
// second request, closes it without answering (dropSecond): the two ways
// an upstream's idle keep-alive close meets a proxy's next request.
type rawUpstream struct {
	addr     netip.AddrPort
	requests atomic.Int64
	accepts  atomic.Int64
	bodies   chan string
}

func startRawUpstream(t *testing.T, closeAfter, dropSecond bool) *rawUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &rawUpstream{addr: ln.Addr().(*net.TCPAddr).AddrPort(), bodies: make(chan string, 100)}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.accepts.Add(1)
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for n := 1; ; n++ {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					b, _ := io.ReadAll(req.Body)
					u.requests.Add(1)
					if dropSecond && n == 2 {
						return
					}
					u.bodies <- string(b)
					fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(b), b)
					if closeAfter {
						return
					}
				}
			}()
		}
	}()
	return u
}

// TestStaleKeepAliveConnection: POSTs with bodies on pooled connections
// the upstream closed while idle all succeed, with or without a retry
// policy: a connection whose FIN has arrived is found dead at checkout
// (no request is written into it), and a request that lost that race
// (the upstream closed on receiving it, no response byte) is resent on a
// new connection.
func TestStaleKeepAliveConnection(t *testing.T) {
	for _, tc := range []struct {
		name       string
		dropSecond bool
		retries    bool
	}{
		{name: "closed after response"},
		{name: "closed after response, retry policy", retries: true},
		{name: "closed on next request", dropSecond: true},
		{name: "closed on next request, retry policy", dropSecond: true, retries: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := startRawUpstream(t, !tc.dropSecond, tc.dropSecond)
			env := newEnv(t, xdstest.StaticCluster("c", u.addr))
			rt := prefixRoute("/", "c")
			if tc.retries {
				routeAction(rt).RetryPolicy = retryAll("connect-failure")
			}
			p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, rt)))), env)
			c := client(false)
			const n = 8
			for i := 0; i < n; i++ {
				if !tc.dropSecond {
					time.Sleep(20 * time.Millisecond) // the upstream's FIN has arrived
				}
				want := fmt.Sprintf("post-%d", i)
				resp, err := c.Post("http://"+p.addr+"/", "text/plain", strings.NewReader(want))
				if err != nil {
					t.Fatal(err)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(b) != want {
					t.Fatalf("POST %d: %d %q, want 200 %q", i, resp.StatusCode, b, want)
				}
			}
			v, _ := env.pools.m.Load("c")
			resent := v.(*clusterPool).h1.resent.Load()
			if tc.dropSecond {
				if resent != n-1 {
					t.Errorf("%d requests resent, want %d (every request but the first met a closing connection)", resent, n-1)
				}
			} else if resent != 0 {
				t.Errorf("%d requests written into dead connections: the idle check missed the upstream's close", resent)
			}
			if v := clusterStat(t, env.clusters["c"], "upstream_rq_retry"); v != 0 {
				t.Errorf("upstream_rq_retry = %d: a resend on a dead connection is not a retry", v)
			}
		})
	}
}

// TestStaleKeepAliveBodilessRequests: a bodiless request skips the
// checkout peek on a connection idle under idleCheckAfter (raised here so
// that the upstream's FIN has surely arrived), so it is written into the
// connection the upstream closed after the previous response (no
// "Connection: close"); it meets the end of stream before a response byte
// and is resent on a new connection. Every GET succeeds, every one but the
// first is resent (none was checked), none is counted a retry, and the
// upstream's handler sees each once.
func TestStaleKeepAliveBodilessRequests(t *testing.T) {
	defer func(d time.Duration) { idleCheckAfter = d }(idleCheckAfter)
	idleCheckAfter = time.Hour
	u := startRawUpstream(t, true, false)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	c := client(false)
	const n = 6
	for i := 0; i < n; i++ {
		time.Sleep(20 * time.Millisecond) // the upstream's FIN has arrived
		resp, err := c.Get("http://" + p.addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("GET %d: %d, want 200", i, resp.StatusCode)
		}
	}
	v, _ := env.pools.m.Load("c")
	if resent := v.(*clusterPool).h1.resent.Load(); resent != n-1 {
		t.Errorf("%d requests resent, want %d (each but the first went, unchecked, into a closed connection)", resent, n-1)
	}
	if got := u.requests.Load(); got != n {
		t.Errorf("the upstream handled %d requests, want %d", got, n)
	}
	if v := clusterStat(t, env.clusters["c"], "upstream_rq_retry"); v != 0 {
		t.Errorf("upstream_rq_retry = %d: a resend on a dead connection is not a retry", v)
	}
}

// TestRouteTimeoutCutsBackOff: the route timeout bounds the retries'
// back-offs too. It fires in a back-off of up to an hour after a
// retriable 503: the stream is answered 504 (UT) then, and no attempt
// goes after it.
func TestRouteTimeoutCutsBackOff(t *testing.T) {
	var requests atomic.Int64
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	rt := prefixRoute("/", "c")
	routeAction(rt).Timeout = durationpb.New(100 * time.Millisecond)
	routeAction(rt).RetryPolicy = &routev3.RetryPolicy{RetryOn: "5xx", NumRetries: wrapperspb.UInt32(2),
		RetryBackOff: &routev3.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(time.Hour), MaxInterval: durationpb.New(time.Hour)}}
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, rt)))), env)
	resp, body := get(t, client(false), p, "x", "/")
	if resp.StatusCode != 504 || body != "upstream request timeout" {
		t.Errorf("route timeout in a back-off: %d %q, want 504 \"upstream request timeout\"", resp.StatusCode, body)
	}
	if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagUT) || e.Attempts != 1 {
		t.Errorf("flags %s attempts %d, want UT after 1 attempt", e.ResponseFlags, e.Attempts)
	}
	if n := requests.Load(); n != 1 {
		t.Errorf("the upstream saw %d requests, want 1 (none after the route timeout)", n)
	}
	if v := clusterStat(t, env.clusters["c"], "upstream_rq_timeout"); v != 1 {
		t.Errorf("upstream_rq_timeout = %d, want 1", v)
	}
}

// dialPooled connects a pooled upstream connection of cluster "c" to a
// loopback listener and returns it, the listener's end, and the cluster;
// both ends close when the test ends.
func dialPooled(t *testing.T) (*pooledConn, net.Conn, *cluster.Cluster) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	addr := ln.Addr().(*net.TCPAddr).AddrPort()
	env := newEnv(t, xdstest.StaticCluster("c", addr))
	cl := env.clusters["c"]
	cp, err := env.pools.get(cl, env.opts["c"])
	if err != nil {
		t.Fatal(err)
	}
	pc, err := cp.dialHost(context.Background(), addr.String(), cl.Hosts()[0], false, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	server := <-accepted
	t.Cleanup(func() { server.Close() })
	return pc, server, cl
}

// TestIdleCheckAllocationFree: the checkout liveness peek allocates
// nothing and sees the upstream's close.
func TestIdleCheckAllocationFree(t *testing.T) {
	pc, server, _ := dialPooled(t)
	c := newH1Conn(pc, pc.RemoteAddr().String())
	if !c.alive() {
		t.Fatal("open idle connection reported dead")
	}
	if n := testing.AllocsPerRun(100, func() { c.alive() }); n != 0 {
		t.Errorf("alive allocates %v times per call", n)
	}
	server.Close()
	xdstest.Eventually(t, 2*time.Second, "the close to be seen", func() bool { return !c.alive() })
}

// TestPendingOnlyWhileConnecting: a request that finds an idle pooled
// connection is not pending. With max_pending_requests 1, N concurrent
// requests over N idle connections all succeed, and
// upstream_rq_pending_total counts only the requests that waited for a
// dial.
func TestPendingOnlyWhileConnecting(t *testing.T) {
	const n = 6
	var phase2 atomic.Bool
	arrived := make(chan struct{}, n)
	release := make(chan struct{})
	var inFlight atomic.Int64
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if !phase2.Load() {
			arrived <- struct{}{}
			<-release
			return
		}
		// All n in flight at once: each needs its own connection.
		inFlight.Add(1)
		deadline := time.Now().Add(2 * time.Second)
		for inFlight.Load() < n && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
	})
	pb := xdstest.StaticCluster("c", u.addr)
	pb.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{MaxPendingRequests: wrapperspb.UInt32(1)}}}
	env := newEnv(t, pb)
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	cl := env.clusters["c"]

	run := func(wg *sync.WaitGroup, codes chan<- int) {
		defer wg.Done()
		resp, err := client(false).Get("http://" + p.addr + "/")
		if err != nil {
			codes <- -1
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		codes <- resp.StatusCode
	}
	// Phase 1: n connections, opened one at a time (each dial pending).
	var wg sync.WaitGroup
	codes := make(chan int, 2*n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go run(&wg, codes)
		select {
		case <-arrived:
		case <-time.After(5 * time.Second):
			t.Fatal("warm-up request did not arrive")
		}
	}
	close(release)
	wg.Wait()
	xdstest.Eventually(t, 2*time.Second, "idle connections", func() bool { return clusterStat(t, cl, "upstream_rq_active") == 0 })
	if got := clusterStat(t, cl, "upstream_rq_pending_total"); got != n {
		t.Fatalf("warm-up: upstream_rq_pending_total = %d, want %d", got, n)
	}

	// Phase 2: n concurrent requests, n idle connections.
	phase2.Store(true)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go run(&wg, codes)
	}
	wg.Wait()
	close(codes)
	for c := range codes {
		if c != 200 {
			t.Errorf("status %d, want 200 (no request waited for a connection)", c)
		}
	}
	if got := clusterStat(t, cl, "upstream_rq_pending_total"); got != n {
		t.Errorf("upstream_rq_pending_total = %d, want %d: requests that found an idle connection were counted pending", got, n)
	}
	if v := clusterStat(t, cl, "upstream_rq_pending_overflow"); v != 0 {
		t.Errorf("upstream_rq_pending_overflow = %d", v)
	}
	if u.accepts.Load() != n {
		t.Errorf("%d upstream connections, want %d", u.accepts.Load(), n)
	}
}

// TestRouteIdleTimeout: a route's idle_timeout applies at once, shorter
// than the connection manager's or with the connection manager's disabled;
// 0 disables the connection manager's.
func TestRouteIdleTimeout(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(1500 * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "late")
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	short := prefixRoute("/short", "c")
	routeAction(short).IdleTimeout = durationpb.New(100 * time.Millisecond)
	long := prefixRoute("/long", "c")
	routeAction(long).IdleTimeout = durationpb.New(3 * time.Second)
	off := prefixRoute("/off", "c")
	routeAction(off).IdleTimeout = durationpb.New(0)
	for _, tc := range []struct {
		name     string
		hcmIdle  time.Duration
		path     string
		wantCode int
	}{
		{"hcm disabled, route 100ms", 0, "/short", 408},
		{"hcm 5s, route 100ms", 5 * time.Second, "/short", 408},
		{"hcm 100ms, route 0", 100 * time.Millisecond, "/off", 200},
		// The connection manager's timer fires while the route's replaces it.
		{"hcm 50ms, route 3s", 50 * time.Millisecond, "/long", 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := hcm(routeConfig(vhost("v", []string{"*"}, short, long, off)))
			h.StreamIdleTimeout = durationpb.New(tc.hcmIdle)
			p := startProxy(t, mustParse(t, h), env)
			start := time.Now()
			resp, _ := get(t, client(false), p, "x", tc.path)
			took := time.Since(start)
			if resp.StatusCode != tc.wantCode {
				t.Fatalf("%d after %v, want %d", resp.StatusCode, took, tc.wantCode)
			}
			if tc.wantCode == 408 {
				if took > time.Second {
					t.Errorf("408 after %v: the route's 100ms idle timeout was not applied at once", took)
				}
				if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagSI) {
					t.Errorf("flags %s, want SI", e.ResponseFlags)
				}
			}
		})
	}
}

// weightedStatic is a STATIC cluster whose endpoints have the given
// load-balancing weights (ROUND_ROBIN, which is then weighted).
func weightedStatic(name string, addrs []netip.AddrPort, weights []uint32) *clusterv3.Cluster {
	pb := xdstest.StaticCluster(name, addrs...)
	for i, ep := range pb.LoadAssignment.Endpoints[0].LbEndpoints {
		ep.LoadBalancingWeight = wrapperspb.UInt32(weights[i])
	}
	return pb
}

// TestRetryPreviousHostsPredicate: two failing hosts with nearly all the
// weight and one good host. Weighted round robin would send a retry to a
// failing host again (the control run without the predicate shows it);
// with previous_hosts no attempt of a request goes to a host it already
// tried, so two retries always reach the good host.
func TestRetryPreviousHostsPredicate(t *testing.T) {
	var mu sync.Mutex
	seen := map[string]int{} // host name + request id → attempts
	repeats := 0
	bad := func(name string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			k := name + " " + r.Header.Get("X-Request-Id")
			seen[k]++
			if seen[k] > 1 {
				repeats++
			}
			mu.Unlock()
			w.WriteHeader(503)
		}
	}
	b1, b2, good := startUpstream(t, bad("b1")), startUpstream(t, bad("b2")), startUpstream(t, named("good"))
	addrs := []netip.AddrPort{b1.addr, b2.addr, good.addr}
	weights := []uint32{50, 50, 1}
	for _, withPredicate := range []bool{true, false} {
		mu.Lock()
		clear(seen)
		repeats = 0
		mu.Unlock()
		env := newEnv(t, weightedStatic("c", addrs, weights))
		r := prefixRoute("/", "c")
		routeAction(r).RetryPolicy = retryAll("5xx")
		if withPredicate {
			routeAction(r).RetryPolicy.RetryHostPredicate = []*routev3.RetryPolicy_RetryHostPredicate{{Name: previousHostsPredicate}}
		}
		p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env)
		c := client(false)
		ok := 0
		for i := 0; i < 30; i++ {
			resp, body := get(t, c, p, "x", "/")
			if resp.StatusCode == 200 && body == "good" {
				ok++
			}
		}
		mu.Lock()
		rep := repeats
		mu.Unlock()
		if withPredicate {
			if ok != 30 || rep != 0 {
				t.Errorf("previous_hosts: %d/30 reached the good host, %d attempts repeated a host already tried", ok, rep)
			}
		} else if rep == 0 {
			t.Errorf("control without previous_hosts: no attempt repeated a host, so the test cannot tell the predicate works")
		}
	}
}

// TestRetriableStatusCodes: Istio's default retry policy
// ("connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
// with retriable_status_codes [503]) retries a 503, not another 5xx.
func TestRetriableStatusCodes(t *testing.T) {
	var n atomic.Int64
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if n.Add(1) == 1 {
			code := 503
			if r.URL.Path == "/500" {
				code = 500
			}
			w.WriteHeader(code)
			return
		}
		w.Write(b)
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	r := prefixRoute("/", "c")
	routeAction(r).RetryPolicy = &routev3.RetryPolicy{
		RetryOn:              "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
		NumRetries:           wrapperspb.UInt32(2),
		RetriableStatusCodes: []uint32{503},
		RetryBackOff:         &routev3.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(time.Millisecond)},
	}
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env)
	c := client(false)
	for _, tc := range []struct {
		path     string
		wantCode int
		wantTry  int
	}{{"/503", 200, 2}, {"/500", 500, 1}} {
		n.Store(0)
		p.sent.Add(1)
		resp, err := c.Post("http://"+p.addr+tc.path, "text/plain", strings.NewReader("body"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.wantCode || (tc.wantCode == 200 && string(b) != "body") {
			t.Errorf("%s: %d %q, want %d", tc.path, resp.StatusCode, b, tc.wantCode)
		}
		if e := p.lastEntry(t); e.Attempts != tc.wantTry {
			t.Errorf("%s: %d attempts, want %d", tc.path, e.Attempts, tc.wantTry)
		}
	}
}

// TestForwardedHeaders: Envoy's x-forwarded-for examples
// (config_http_conn_man_headers_x-forwarded-for) and the
// x-forwarded-proto / x-envoy-internal rules.
func TestForwardedHeaders(t *testing.T) {
	const chain = "203.0.113.128, 203.0.113.10, 203.0.113.1"
	for _, tc := range []struct {
		name         string
		remote       bool
		hops         uint32
		skipAppend   bool
		peer         string
		xff, xfp     string // incoming ("" absent)
		inInternal   bool   // incoming x-envoy-internal: true
		wantXFF      string
		wantXFP      string
		wantExternal string // "" not set
		wantInternal bool
	}{
		{name: "example 1: edge, no trusted hop", remote: true, peer: "192.0.2.5", xff: chain, inInternal: true,
			wantXFF: chain + ",192.0.2.5", wantXFP: "http", wantExternal: "192.0.2.5"},
		{name: "example 2: internal behind edge", peer: "10.11.12.13", xff: chain + ", 192.0.2.5", inInternal: true,
			wantXFF: chain + ", 192.0.2.5", wantXFP: "http"},
		{name: "example 3: edge, two trusted hops", remote: true, hops: 2, peer: "192.0.2.5", xff: chain, xfp: "https",
			wantXFF: chain + ",192.0.2.5", wantXFP: "https", wantExternal: "203.0.113.10"},
		{name: "example 4: internal, two trusted hops", hops: 2, peer: "10.11.12.13", xff: chain + ", 192.0.2.5", xfp: "https",
			wantXFF: chain + ", 192.0.2.5", wantXFP: "https"},
		{name: "example 5: internal client, no XFF", peer: "10.20.30.40", wantXFP: "http"},
		{name: "example 6: proxied internal client", peer: "10.20.30.50", xff: "10.20.30.40", wantXFF: "10.20.30.40", wantXFP: "http", wantInternal: true},
		{name: "edge, internal peer without XFF", remote: true, peer: "10.1.2.3", wantXFF: "10.1.2.3", wantXFP: "http", wantInternal: true},
		{name: "edge, untrusted XFP overwritten", remote: true, peer: "192.0.2.5", xfp: "https", wantXFF: "192.0.2.5", wantXFP: "http", wantExternal: "192.0.2.5"},
		{name: "edge, fewer XFF entries than trusted hops", remote: true, hops: 3, peer: "192.0.2.5", xff: "203.0.113.1",
			wantXFF: "203.0.113.1,192.0.2.5", wantXFP: "http", wantExternal: "192.0.2.5"},
		{name: "edge, skip_xff_append", remote: true, skipAppend: true, peer: "192.0.2.5", xff: "203.0.113.1",
			wantXFF: "203.0.113.1", wantXFP: "http", wantExternal: "192.0.2.5"},
		{name: "sidecar keeps XFP", peer: "10.0.0.1", xfp: "https", wantXFP: "https"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := &Config{useRemoteAddress: tc.remote, xffTrustedHops: tc.hops, skipXFFAppend: tc.skipAppend}
			h := http.Header{}
			if tc.xff != "" {
				h["X-Forwarded-For"] = []string{tc.xff}
			}
			if tc.xfp != "" {
				h["X-Forwarded-Proto"] = []string{tc.xfp}
			}
			if tc.inInternal {
				h["X-Envoy-Internal"] = []string{"true"}
			}
			cfg.mutateForwarded(h, netip.MustParseAddr(tc.peer), false)
			if got := h.Get("X-Forwarded-For"); got != tc.wantXFF {
				t.Errorf("x-forwarded-for %q, want %q", got, tc.wantXFF)
			}
			if got := h.Get("X-Forwarded-Proto"); got != tc.wantXFP {
				t.Errorf("x-forwarded-proto %q, want %q", got, tc.wantXFP)
			}
			if got := h.Get("X-Envoy-External-Address"); got != tc.wantExternal {
				t.Errorf("x-envoy-external-address %q, want %q", got, tc.wantExternal)
			}
			if got := h.Get("X-Envoy-Internal") == "true"; got != tc.wantInternal {
				t.Errorf("x-envoy-internal %v, want %v", got, tc.wantInternal)
			}
		})
	}
	// The sidecar's usual request (no XFF, use_remote_address false)
	// allocates nothing beyond x-forwarded-proto.
	cfg := &Config{}
	h := http.Header{"X-Forwarded-Proto": {"http"}}
	if n := testing.AllocsPerRun(100, func() { cfg.mutateForwarded(h, netip.MustParseAddr("10.0.0.1"), false) }); n != 0 {
		t.Errorf("mutateForwarded allocates %v times", n)
	}
}
