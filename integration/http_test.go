//go:build linux

package integration

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// httpServer is an HTTP server in a namespace that answers with its name
// (or with 503 while fail is set) and counts the connections it accepted.
type httpServer struct {
	name    string
	accepts atomic.Int64
	fail    atomic.Bool
}

type countingLn struct {
	net.Listener
	n *atomic.Int64
}

func (l countingLn) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func startHTTPServer(t *testing.T, ns, addr, name string) *httpServer {
	t.Helper()
	ln, err := listenTCP(ns, addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &httpServer{name: name}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.fail.Load() {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintf(w, "%s %s", s.name, r.URL.Path)
	})}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	go srv.Serve(countingLn{ln, &s.accepts})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	return s
}

// podClient is an HTTP client whose connections start in the pod
// namespace, so they are captured; h2c speaks HTTP/2 with prior knowledge.
func podClient(topo *topology, h2c bool, conns int) *http.Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialTCP(topo.Pod, addr, dialTimeout)
		},
		MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns,
	}
	tr.Protocols = new(http.Protocols)
	if h2c {
		tr.Protocols.SetUnencryptedHTTP2(true)
	} else {
		tr.Protocols.SetHTTP1(true)
	}
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func get1(t *testing.T, c *http.Client, url, host string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	req.Host = host
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s (Host %s): %v", url, host, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// pushHTTP serves the listeners, clusters, endpoints and route
// configurations to the proxy.
func (cp *controlPlane) pushHTTP(t *testing.T, version string, listeners, clusters []obj, endpoints map[string][]netip.AddrPort, routes []obj) {
	t.Helper()
	res := map[resource.Type][]types.Resource{}
	for _, l := range listeners {
		res[resource.ListenerType] = append(res[resource.ListenerType], xdsListener(t, l))
	}
	for _, c := range clusters {
		res[resource.ClusterType] = append(res[resource.ClusterType], toProto(t, c, &clusterv3.Cluster{}))
	}
	for name, eps := range endpoints {
		c := staticCluster(name, "ROUND_ROBIN", eps...)["load_assignment"].(obj)
		res[resource.EndpointType] = append(res[resource.EndpointType], toProto(t, c, &endpointv3.ClusterLoadAssignment{}))
	}
	for _, r := range routes {
		res[resource.RouteType] = append(res[resource.RouteType], toProto(t, r, &routev3.RouteConfiguration{}))
	}
	snap, err := cachev3.NewSnapshot(version, res)
	if err != nil {
		t.Fatal(err)
	}
	if err := cp.cache.SetSnapshot(context.Background(), xdsNode, snap); err != nil {
		t.Fatal(err)
	}
}

// startHTTPProxy starts a proxy on delta ADS and waits (10 s at most)
// until the pushed 0.0.0.0_80 listener is in force.
func startHTTPProxy(t *testing.T, topo *topology) *proxyProc {
	t.Helper()
	px := startProxy(t, topo, "--bootstrap", adsBootstrap(t, topo, "DELTA_GRPC"))
	waitReady := time.Now().Add(10 * time.Second)
	for !strings.Contains(adminGet(t, topo, "/listeners"), "0.0.0.0_80::") {
		if time.Now().After(waitReady) {
			t.Fatal("0.0.0.0_80 never arrived")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return px
}

// istioHTTPListener is Istio's outbound HTTP listener for a port: bound to
// nothing, every VIP:port flow handed to it, routes from RDS, path
// normalization and the file access log on /dev/stdout as Istio sets them
// (meshConfig.accessLogFile; without an access_log no request is logged).
func istioHTTPListener(port uint16) obj {
	return obj{"name": fmt.Sprintf("0.0.0.0_%d", port), "address": sockAddr(netip.IPv4Unspecified(), port),
		"bind_to_port": false, "traffic_direction": "OUTBOUND",
		"filter_chains": []obj{{"filters": []obj{{"name": "envoy.filters.network.http_connection_manager", "typed_config": obj{
			"@type":                            "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
			"stat_prefix":                      fmt.Sprintf("outbound_0.0.0.0_%d", port),
			"rds":                              obj{"route_config_name": fmt.Sprint(port), "config_source": obj{"ads": obj{}, "resource_api_version": "V3"}},
			"normalize_path":                   true,
			"path_with_escaped_slashes_action": "KEEP_UNCHANGED",
			"access_log": []obj{{"name": "envoy.access_loggers.file", "typed_config": obj{
				"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": "/dev/stdout"}}},
			"http_filters": []obj{
				{"name": "istio.stats", "typed_config": obj{"@type": "type.googleapis.com/stats.PluginConfig"}},
				{"name": "envoy.filters.http.router", "typed_config": obj{"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
			}}}}}}}
}

// load sends 1,000 GETs, 100 on each of 10 concurrent workers sharing c,
// and counts the answers by their first word (the server's name).
func load(t *testing.T, c *http.Client, url, host string) map[string]int {
	t.Helper()
	var mu sync.Mutex
	counts := map[string]int{}
	var wg sync.WaitGroup
	for w := 0; w < 10; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				req, _ := http.NewRequest("GET", url, nil)
				req.Host = host
				resp, err := c.Do(req)
				if err != nil {
					t.Error(err)
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				mu.Lock()
				counts[strings.Fields(string(b) + " ?")[0]]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return counts
}

func routeTo(prefix string, action obj) obj {
	return obj{"match": obj{"prefix": prefix}, "route": action}
}

// TestHTTPThroughSidecar is the HTTP issue's end-to-end case: Istio's
// 0.0.0.0_80 listener with RDS, through capture in namespaces, for HTTP/1.1
// and h2c clients: host-based routing of two services on one port, a
// path-prefix route, an 80/20 weighted split over 1,000 requests, a retry
// of a 503 on another host, block_all's 502 for an unknown host, upstream
// keep-alive pooling (1,000 requests over 10 connections → at most 10
// upstream connections), and a malformed request answered 400 without
// disturbing another connection.
func TestHTTPThroughSidecar(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	startHTTPServer(t, topo.Services, ap(topo.SvcV4, 9080), "reviews-v1")
	startHTTPServer(t, topo.Services, ap(topo.Svc2V4, 9080), "reviews-v2")
	ratings := startHTTPServer(t, topo.Services, ap(topo.SvcV4, 9081), "ratings")
	flakyBad := startHTTPServer(t, topo.Services, ap(topo.SvcV4, 9082), "flaky-bad")
	startHTTPServer(t, topo.Services, ap(topo.Svc2V4, 9082), "flaky-good")
	flakyBad.fail.Store(true)

	const (
		cV1      = "outbound|80|v1|reviews.default.svc.cluster.local"
		cV2      = "outbound|80|v2|reviews.default.svc.cluster.local"
		cRatings = "outbound|80||ratings.default.svc.cluster.local"
		cFlaky   = "outbound|80||flaky.default.svc.cluster.local"
	)
	vipReviews, vipRatings := vip(topo, false, 71), vip(topo, false, 72)
	route := obj{"name": "80", "validate_clusters": false, "virtual_hosts": []obj{
		{"name": "reviews.default.svc.cluster.local:80", "domains": []string{"reviews.default.svc.cluster.local", "reviews", vipReviews.String()},
			"routes": []obj{routeTo("/", obj{"weighted_clusters": obj{"clusters": []obj{{"name": cV1, "weight": 80}, {"name": cV2, "weight": 20}}}})}},
		{"name": "ratings.default.svc.cluster.local:80", "domains": []string{"ratings.default.svc.cluster.local", "ratings", vipRatings.String()},
			"routes": []obj{routeTo("/api", obj{"cluster": cRatings}), routeTo("/", obj{"cluster": cV1})}},
		{"name": "flaky.default.svc.cluster.local:80", "domains": []string{"flaky"},
			"routes": []obj{routeTo("/", obj{"cluster": cFlaky, "retry_policy": obj{"retry_on": "5xx", "num_retries": 2,
				"retry_host_predicate": []obj{{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": obj{
					"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}},
				"host_selection_retry_max_attempts": 5}})}},
		{"name": "block_all", "domains": []string{"*"},
			"routes": []obj{{"name": "block_all", "match": obj{"prefix": "/"}, "direct_response": obj{"status": 502}}}},
	}}
	clusters := append(istioClusters(), edsCluster(cV1), edsCluster(cV2), edsCluster(cRatings), edsCluster(cFlaky))
	listeners := []obj{virtualOutbound("BlackHoleCluster"), virtualInbound(), istioHTTPListener(80)}
	cp.pushHTTP(t, "1", listeners, clusters, map[string][]netip.AddrPort{
		cV1: {netip.AddrPortFrom(topo.SvcV4, 9080)}, cV2: {netip.AddrPortFrom(topo.Svc2V4, 9080)},
		cRatings: {netip.AddrPortFrom(topo.SvcV4, 9081)},
		cFlaky:   {netip.AddrPortFrom(topo.SvcV4, 9082), netip.AddrPortFrom(topo.Svc2V4, 9082)},
	}, []obj{route})
	px := startHTTPProxy(t, topo)
	urlReviews := "http://" + ap(vipReviews, 80)
	urlRatings := "http://" + ap(vipRatings, 80)

	for _, h2c := range []bool{false, true} {
		t.Run(map[bool]string{false: "http1", true: "h2c"}[h2c], func(t *testing.T) {
			c := podClient(topo, h2c, 10)
			defer c.CloseIdleConnections()
			// Host-based routing and the path prefix.
			if code, body := get1(t, c, urlRatings+"/api/stars", "ratings"); code != 200 || body != "ratings /api/stars" {
				t.Errorf("ratings /api: %d %q", code, body)
			}
			if code, body := get1(t, c, urlRatings+"/other", "ratings.default.svc.cluster.local"); code != 200 || body != "reviews-v1 /other" {
				t.Errorf("ratings /: %d %q, want the prefix \"/\" route to reviews-v1", code, body)
			}
			// 80/20 over 1,000 requests, 10 at a time.
			counts := load(t, c, urlReviews+"/", "reviews")
			if n := counts["reviews-v1"]; n < 750 || n > 850 || counts["reviews-v1"]+counts["reviews-v2"] != 1000 {
				t.Errorf("weighted 80/20 over 1000: %v", counts)
			}
			// Retry on another host: every request succeeds.
			for i := 0; i < 10; i++ {
				if code, body := get1(t, c, urlReviews+"/", "flaky"); code != 200 || !strings.HasPrefix(body, "flaky-good") {
					t.Fatalf("flaky: %d %q, want a retry onto the good host", code, body)
				}
			}
			// block_all: a host nobody registered.
			if code, _ := get1(t, c, urlReviews+"/", "unknown.example.com"); code != 502 {
				t.Errorf("unknown host: %d, want block_all's 502", code)
			}
		})
	}
	if n := flakyBad.accepts.Load(); n == 0 {
		t.Error("the failing flaky host was never tried")
	}
	stats := adminGet(t, topo, "/stats?filter="+strings.NewReplacer("|", "\\|", ".", "\\.").Replace(cFlaky)+"\\.upstream_rq_retry$")
	if !strings.Contains(stats, ".upstream_rq_retry: ") || strings.Contains(stats, ".upstream_rq_retry: 0\n") {
		t.Errorf("retry counter: %q", stats)
	}

	// Keep-alive pooling: 1,000 requests over 10 client connections.
	before := ratings.accepts.Load()
	c := podClient(topo, false, 10)
	load(t, c, urlRatings+"/api/x", "ratings")
	c.CloseIdleConnections()
	if n := ratings.accepts.Load() - before; n > 10 || n < 1 {
		t.Errorf("1000 requests over 10 client connections used %d upstream connections, want 1..10", n)
	}

	// Malformed request: 400 on its connection, the other one unaffected.
	good := podClient(topo, false, 1)
	if code, _ := get1(t, good, urlRatings+"/api/a", "ratings"); code != 200 {
		t.Fatalf("before the malformed request: %d", code)
	}
	bad, err := dialTCP(topo.Pod, ap(vipRatings, 80), dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	bad.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(bad, "GARBAGE\r\n\r\n")
	status, _ := bufio.NewReader(bad).ReadString('\n')
	bad.Close()
	if !strings.HasPrefix(status, "HTTP/1.1 400") {
		t.Errorf("malformed request answered %q, want 400", status)
	}
	if code, _ := get1(t, good, urlRatings+"/api/b", "ratings"); code != 200 {
		t.Errorf("after the malformed request: %d", code)
	}
	if _, ok := px.waitAccess(func(e AccessEntry) bool { return e.UpstreamCluster == cRatings }, 5*time.Second); !ok {
		t.Error("no HTTP access line for ratings")
	}

	// An RDS update applies to the next request of a connection already
	// open, as in Envoy: ratings' /api now goes to reviews-v1.
	route["virtual_hosts"].([]obj)[1]["routes"] = []obj{routeTo("/", obj{"cluster": cV1})}
	cp.pushHTTP(t, "2", listeners, clusters, map[string][]netip.AddrPort{
		cV1: {netip.AddrPortFrom(topo.SvcV4, 9080)}, cV2: {netip.AddrPortFrom(topo.Svc2V4, 9080)},
		cRatings: {netip.AddrPortFrom(topo.SvcV4, 9081)},
		cFlaky:   {netip.AddrPortFrom(topo.SvcV4, 9082), netip.AddrPortFrom(topo.Svc2V4, 9082)},
	}, []obj{route})
	deadline := time.Now().Add(5 * time.Second)
	for {
		var reused bool
		req, _ := http.NewRequest("GET", urlRatings+"/api/c", nil)
		req.Host = "ratings"
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
			GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused }}))
		resp, err := good.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !reused {
			t.Fatal("the keep-alive connection was not reused")
		}
		if string(b) == "reviews-v1 /api/c" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("an open connection still routes by the old route configuration: %q", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestHTTPMalformedRequestsThroughSidecar: malformed requests reaching
// Istio's 0.0.0.0_80 through capture are each answered on their own
// connection — a bad request line 400, headers over max_request_headers_kb
// (60 KiB) 431 as Envoy answers, an invalid chunked body 400 — while a
// well-formed keep-alive connection opened before them goes on exchanging
// requests throughout on the same connection. A path with a dot segment
// is normalized before routing (normalize_path, as Istio sets it).
func TestHTTPMalformedRequestsThroughSidecar(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	ratings := startHTTPServer(t, topo.Services, ap(topo.SvcV4, 9081), "ratings")
	startHTTPServer(t, topo.Services, ap(topo.Svc2V4, 9081), "other")
	const cRatings, cOther = "outbound|80||ratings.default.svc.cluster.local", "outbound|80||other.default.svc.cluster.local"
	vipRatings := vip(topo, false, 73)
	route := obj{"name": "80", "validate_clusters": false, "virtual_hosts": []obj{
		{"name": "ratings.default.svc.cluster.local:80", "domains": []string{"ratings", vipRatings.String()},
			"routes": []obj{routeTo("/api", obj{"cluster": cRatings}), routeTo("/", obj{"cluster": cOther})}},
	}}
	clusters := append(istioClusters(), edsCluster(cRatings), edsCluster(cOther))
	listeners := []obj{virtualOutbound("BlackHoleCluster"), virtualInbound(), istioHTTPListener(80)}
	cp.pushHTTP(t, "1", listeners, clusters, map[string][]netip.AddrPort{
		cRatings: {netip.AddrPortFrom(topo.SvcV4, 9081)}, cOther: {netip.AddrPortFrom(topo.Svc2V4, 9081)},
	}, []obj{route})
	px := startHTTPProxy(t, topo)
	addr := ap(vipRatings, 80)
	c := podClient(topo, false, 1)
	defer c.CloseIdleConnections()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if code, body := get1(t, c, "http://"+addr+"/api/x", "ratings"); code == 200 && body == "ratings /api/x" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ratings never routed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// normalize_path: "/api/../x" is "/x", the "/" route's.
	if code, body := get1(t, c, "http://"+addr+"/api/../x", "ratings"); code != 200 || body != "other /x" {
		t.Errorf("/api/../x: %d %q, want the normalized /x on other", code, body)
	}

	// The well-formed keep-alive connection, exchanging until the bad
	// requests are done.
	good, err := dialTCP(topo.Pod, addr, dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	before := ratings.accepts.Load()
	stop := make(chan struct{})
	done := make(chan error, 1)
	var exchanges atomic.Int64
	go func() {
		br := bufio.NewReader(good)
		for {
			good.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.WriteString(good, "GET /api/ok HTTP/1.1\r\nHost: ratings\r\n\r\n"); err != nil {
				done <- err
				return
			}
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				done <- err
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(b) != "ratings /api/ok" {
				done <- fmt.Errorf("%d %q", resp.StatusCode, b)
				return
			}
			n := exchanges.Add(1)
			select {
			case <-stop:
				if n >= 2 {
					done <- nil
					return
				}
			default:
			}
		}
	}()

	big := strings.Repeat("a", 61<<10)
	for _, tc := range []struct{ name, req, want string }{
		{"bad request line", "GARBAGE\r\n\r\n", "HTTP/1.1 400"},
		{"oversized headers", "GET /api/x HTTP/1.1\r\nHost: ratings\r\nX-Big: " + big + "\r\n\r\n", "HTTP/1.1 431"},
		{"invalid chunk size", "POST /api/x HTTP/1.1\r\nHost: ratings\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "HTTP/1.1 400"},
		{"bad chunk terminator", "POST /api/x HTTP/1.1\r\nHost: ratings\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", "HTTP/1.1 400"},
	} {
		bad, err := dialTCP(topo.Pod, addr, dialTimeout)
		if err != nil {
			t.Fatal(err)
		}
		bad.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(bad, tc.req)
		status, err := bufio.NewReader(bad).ReadString('\n')
		bad.Close()
		if !strings.HasPrefix(status, tc.want) {
			t.Errorf("%s: answered %q (%v), want %s", tc.name, strings.TrimSpace(status), err, tc.want)
		}
	}
	close(stop)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the keep-alive connection failed during the malformed requests after %d exchanges: %v", exchanges.Load(), err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the keep-alive connection stalled")
	}
	// Still the one connection, and the proxy still serves new ones.
	if code, body := get1(t, c, "http://"+addr+"/api/after", "ratings"); code != 200 || body != "ratings /api/after" {
		t.Errorf("after the malformed requests: %d %q", code, body)
	}
	t.Logf("%d exchanges on the keep-alive connection; ratings accepted %d upstream connections meanwhile", exchanges.Load(), ratings.accepts.Load()-before)
	if _, ok := px.waitAccess(func(e AccessEntry) bool { return e.UpstreamCluster == cRatings }, 5*time.Second); !ok {
		t.Error("no HTTP access line for ratings")
	}
}
