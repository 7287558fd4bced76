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
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
)

// upstreamServer is a loopback HTTP server (HTTP/1.1 and h2c) that
// counts accepted connections and requests.
type upstreamServer struct {
	addr     netip.AddrPort
	accepts  atomic.Int64
	requests atomic.Int64
	srv      *http.Server
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

func startUpstream(t testing.TB, h http.HandlerFunc) *upstreamServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &upstreamServer{addr: ln.Addr().(*net.TCPAddr).AddrPort()}
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	u.srv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			u.requests.Add(1)
			h(w, r)
		}),
		Protocols: p,
		ErrorLog:  discardLog,
	}
	go u.srv.Serve(countingListener{ln, &u.accepts})
	t.Cleanup(func() { u.srv.Close() })
	return u
}

// named answers with its name in the body and echoes request facts in
// headers.
func named(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("X-Upstream", name)
		w.Header().Set("X-Seen-Path", r.RequestURI)
		w.Header().Set("X-Seen-Host", r.Host)
		w.Header().Set("X-Seen-Proto", r.Proto)
		w.Header().Set("Server", "upstream-server")
		for k, vs := range r.Header {
			w.Header()["X-Seen-"+k] = vs
		}
		fmt.Fprint(w, name)
	}
}

func withH2(pb *clusterv3.Cluster) *clusterv3.Cluster {
	opts, _ := anypb.New(&httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
		}},
	})
	pb.TypedExtensionProtocolOptions = map[string]*anypb.Any{cluster.HTTPOptionsKey: opts}
	return pb
}

// testEnv is an Env over fixed maps.
type testEnv struct {
	routes   map[string]*Routes
	clusters map[string]*cluster.Cluster
	opts     map[string]cluster.HTTPOptions
	pools    *Pools
}

func newEnv(t testing.TB, pbs ...*clusterv3.Cluster) *testEnv {
	t.Helper()
	e := &testEnv{routes: map[string]*Routes{}, clusters: map[string]*cluster.Cluster{}, opts: map[string]cluster.HTTPOptions{}, pools: NewPools()}
	for _, pb := range pbs {
		c, err := cluster.New(pb, cluster.Options{Dialer: &upstream.Dialer{}, Log: zerolog.Nop()})
		if err != nil {
			t.Fatal(err)
		}
		o, err := cluster.ParseHTTPOptions(pb)
		if err != nil {
			t.Fatal(err)
		}
		e.clusters[pb.GetName()], e.opts[pb.GetName()] = c, o
		t.Cleanup(func() { c.Close() })
	}
	t.Cleanup(func() {
		// The test is over: what its pools still hold is closed now.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		e.pools.Close(ctx)
	})
	return e
}

func (e *testEnv) Routes(name string) *Routes { return e.routes[name] }
func (e *testEnv) Cluster(name string) *cluster.Cluster {
	return e.clusters[name]
}
func (e *testEnv) ClusterHTTP(name string) cluster.HTTPOptions { return e.opts[name] }
func (e *testEnv) Pools() *Pools                               { return e.pools }

// proxy runs Serve for every connection accepted on a loopback listener.
// drain starts the listener's drain (ConnInfo.Draining), cancel ends it
// (Serve's context).
type proxy struct {
	addr   string
	drain  context.CancelFunc
	cancel context.CancelFunc
	mu     sync.Mutex
	log    []Entry
	wg     sync.WaitGroup
	sent   atomic.Int64 // requests sent by get(): lastEntry waits for their entries
}

func startProxy(t testing.TB, cfg *Config, env Env) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	draining, drain := context.WithCancel(ctx)
	p := &proxy{addr: ln.Addr().String(), drain: drain, cancel: cancel}
	var conns sync.Map
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Store(c, true)
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				defer conns.Delete(c)
				defer c.Close()
				info := ConnInfo{
					Peer:  c.RemoteAddr().(*net.TCPAddr).AddrPort(),
					Local: c.LocalAddr().(*net.TCPAddr).AddrPort(),
					AccessLog: func(e Entry) {
						p.mu.Lock()
						p.log = append(p.log, e)
						p.mu.Unlock()
					},
					Draining: draining,
				}
				cfg.Serve(ctx, c, env, info)
			}()
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		conns.Range(func(k, _ any) bool { k.(net.Conn).Close(); return true })
		p.wg.Wait()
	})
	return p
}

func (p *proxy) entries() []Entry {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Entry(nil), p.log...)
}

// lastEntry returns the entry of the last request sent, once every
// request sent through get has been logged (the handler logs after the
// client has its response).
func (p *proxy) lastEntry(t testing.TB) Entry {
	t.Helper()
	return p.waitEntries(t, int(p.sent.Load()))[p.sent.Load()-1]
}

// findEntry waits for an access entry match accepts: entries are written
// as streams finish, so the last one need not be the last request's.
func (p *proxy) findEntry(t testing.TB, match func(Entry) bool) Entry {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		for _, e := range p.entries() {
			if match(e) {
				return e
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no matching access log entry among %d", len(p.entries()))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (p *proxy) waitEntries(t testing.TB, n int) []Entry {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		if es := p.entries(); len(es) >= n && len(es) > 0 {
			return es
		}
		if time.Now().After(deadline) {
			t.Fatal("no access log entry")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// client returns an HTTP/1.1 or h2c client for the proxy.
func client(h2 bool) *http.Client {
	tr := &http.Transport{MaxIdleConnsPerHost: 100, DisableCompression: true}
	p := new(http.Protocols)
	if h2 {
		p.SetUnencryptedHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	tr.Protocols = p
	return &http.Client{Transport: tr, Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

type reqOpt func(*http.Request)

func hdr(k, v string) reqOpt { return func(r *http.Request) { r.Header.Set(k, v) } }

func get(t testing.TB, c *http.Client, p *proxy, host, path string, opts ...reqOpt) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest("GET", "http://"+p.addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	for _, o := range opts {
		o(req)
	}
	p.sent.Add(1)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s%s: %v", host, path, err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

// --- proto builders ---

func vhost(name string, domains []string, routes ...*routev3.Route) *routev3.VirtualHost {
	return &routev3.VirtualHost{Name: name, Domains: domains, Routes: routes}
}

func prefixRoute(prefix, cluster string) *routev3.Route {
	return &routev3.Route{
		Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: prefix}},
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}},
	}
}

func routeAction(r *routev3.Route) *routev3.RouteAction { return r.GetRoute() }

func routeConfig(vhs ...*routev3.VirtualHost) *routev3.RouteConfiguration {
	return &routev3.RouteConfiguration{Name: "rc", VirtualHosts: vhs}
}

func routerFilter() *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: RouterFilter, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: xdstest.Pack(&routerv3.Router{})}}
}

func hcm(rc *routev3.RouteConfiguration, filters ...*hcmv3.HttpFilter) *hcmv3.HttpConnectionManager {
	return &hcmv3.HttpConnectionManager{
		StatPrefix:     "test",
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: rc},
		HttpFilters:    append(filters, routerFilter()),
	}
}

func mustParse(t testing.TB, h *hcmv3.HttpConnectionManager) *Config {
	t.Helper()
	c, err := ParseHCM(h)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func clusterStat(t testing.TB, c *cluster.Cluster, name string) uint64 {
	t.Helper()
	if v, ok := c.Stat(name); ok {
		return v
	}
	for _, s := range c.HTTPStats().Stats() {
		if s.Name == name {
			return s.Value
		}
	}
	t.Fatalf("no stat %q", name)
	return 0
}

func hostStat(h *cluster.Host, name string) uint64 {
	for _, s := range h.Stats() {
		if s.Name == name {
			return s.Value
		}
	}
	panic(name)
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// stalledPOST sends an HTTP/1.1 POST with 5 of its 10 body bytes, then
// waits (5 s at most) for the proxy's answer: status, body, time taken.
func stalledPOST(t *testing.T, addr string) (int, string, time.Duration) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	io.WriteString(conn, "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("stalled POST: %v after %v", err, time.Since(start))
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp.StatusCode, string(b), time.Since(start)
}
