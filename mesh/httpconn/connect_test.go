package httpconn

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"golang.org/x/net/http2"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// tcpEcho is a TCP echo server: each connection's bytes come back, and
// its half-close is answered with the server's (after the echo).
func tcpEcho(t testing.TB) netip.AddrPort {
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
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// connectRoute is a connect_matcher route to cluster, terminating CONNECT
// (upgrade_configs [{upgrade_type: CONNECT, connect_config: {}}]).
func connectRoute(cluster string) *routev3.Route {
	return &routev3.Route{
		Name:  "connect",
		Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_ConnectMatcher_{ConnectMatcher: &routev3.RouteMatch_ConnectMatcher{}}},
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster},
			UpgradeConfigs: []*routev3.RouteAction_UpgradeConfig{{
				UpgradeType: "CONNECT", ConnectConfig: &routev3.RouteAction_UpgradeConfig_ConnectConfig{},
			}},
		}},
	}
}

// connectH1 sends an HTTP/1.1 CONNECT (plus extra, bytes pipelined
// behind it) and returns the response head and the connection.
func connectH1(t *testing.T, addr, authority, extra string) (*http.Response, net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, "CONNECT "+authority+" HTTP/1.1\r\nHost: "+authority+"\r\n\r\n"+extra)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatal(err)
	}
	return resp, conn, br
}

// TestConnectTerminatedH1 (issue #15 item 8): with CONNECT in the
// connection manager's upgrade_configs and a connect_matcher route whose
// CONNECT upgrade has connect_config, an HTTP/1.1 CONNECT is answered 200
// once a TCP connection to the cluster is up, and bytes flow both ways:
// those pipelined behind the CONNECT, one larger than the copy buffer,
// and the client's half-close, after which the upstream still answers.
// The access log shows the 200 with the route, cluster and bytes; the
// cluster counts upstream_rq_200. Before, every CONNECT was refused 403.
func TestConnectTerminatedH1(t *testing.T) {
	echo := tcpEcho(t)
	cfg := mustParse(t, wsHCM(routeConfig(vhost("v", []string{"*"}, connectRoute("c"), prefixRoute("/", "c"))), "CONNECT"))
	env := newEnv(t, xdstest.StaticCluster("c", echo))
	p := startProxy(t, cfg, env)

	resp, conn, br := connectH1(t, p.addr, "example.com:443", "early")
	if resp.StatusCode != 200 || resp.Header.Get("Server") != "envoy" || resp.Header.Get("Content-Length") != "" || resp.Header.Get("Transfer-Encoding") != "" {
		t.Fatalf("CONNECT: %d %v, want 200 with the proxy's headers and no body framing", resp.StatusCode, resp.Header)
	}
	big := strings.Repeat("b", 100<<10)
	want := "early" + big
	go io.WriteString(conn, big)
	got := make([]byte, len(want))
	if _, err := io.ReadFull(br, got); err != nil || string(got) != want {
		t.Fatalf("tunnel echo: %d bytes, %v", len(got), err)
	}
	if n := cfg.Stats().DownstreamCxUpgradesActive.Load(); n != 1 {
		t.Errorf("downstream_cx_upgrades_active %d while open, want 1", n)
	}
	io.WriteString(conn, "last")
	conn.(*net.TCPConn).CloseWrite()
	rest, err := io.ReadAll(br)
	if err != nil || string(rest) != "last" {
		t.Errorf("after the client's half-close: %q %v, want the echo then the end", rest, err)
	}
	e := p.waitEntries(t, 1)[0]
	if e.ResponseCode != 200 || e.ResponseCodeDetails != "via_upstream" || e.RouteName != "connect" || e.UpstreamCluster != "c" ||
		e.UpstreamHost != echo || e.Method != "CONNECT" || e.Authority != "example.com:443" ||
		e.BytesSent != int64(len(want)+4) || e.BytesReceived != int64(len(want)+4) {
		t.Errorf("access log: %+v", e)
	}
	if n := clusterStat(t, env.Cluster("c"), "upstream_rq_200"); n != 1 {
		t.Errorf("upstream_rq_200 %d, want 1", n)
	}
	if cfg.Stats().DownstreamCxUpgradesTotal.Load() != 1 || cfg.Stats().DownstreamCxUpgradesActive.Load() != 0 {
		t.Errorf("upgrades total %d active %d, want 1 and 0", cfg.Stats().DownstreamCxUpgradesTotal.Load(), cfg.Stats().DownstreamCxUpgradesActive.Load())
	}
}

// TestConnectTerminatedH2: an h2c client's CONNECT (a stream: :method
// CONNECT and :authority) is terminated the same way; the stream's DATA
// carries the bytes both ways, and the client's END_STREAM half-closes
// the upstream, whose close ends the response.
func TestConnectTerminatedH2(t *testing.T) {
	echo := tcpEcho(t)
	cfg := mustParse(t, wsHCM(routeConfig(vhost("v", []string{"*"}, connectRoute("c"))), "CONNECT"))
	p := startProxy(t, cfg, newEnv(t, xdstest.StaticCluster("c", echo)))
	pr, pw := io.Pipe()
	req, _ := http.NewRequest(http.MethodConnect, "http://"+p.addr, pr)
	req.Host = "example.com:443"
	h2c := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer h2c.CloseIdleConnections()
	resp, err := h2c.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("h2 CONNECT: %d", resp.StatusCode)
	}
	for _, m := range []string{"ping", strings.Repeat("z", 100<<10)} {
		go pw.Write([]byte(m))
		b := make([]byte, len(m))
		if _, err := io.ReadFull(resp.Body, b); err != nil || string(b) != m {
			t.Fatalf("tunnel echo of %d bytes: %v", len(m), err)
		}
	}
	go func() {
		pw.Write([]byte("last"))
		pw.Close()
	}()
	if rest, err := io.ReadAll(resp.Body); err != nil || string(rest) != "last" {
		t.Errorf("after END_STREAM: %q %v, want the echo then the end", rest, err)
	}
	e := p.waitEntries(t, 1)[0]
	if e.ResponseCode != 200 || e.RouteName != "connect" || e.BytesSent < 100<<10 || e.BytesReceived < 100<<10 {
		t.Errorf("access log: %d %s sent %d received %d", e.ResponseCode, e.RouteName, e.BytesSent, e.BytesReceived)
	}
}

// TestConnectRefused: a CONNECT goes through only where CONNECT is an
// allowed upgrade and a connect_matcher route takes it: otherwise 403
// upgrade_failed (not allowed by the connection manager, or disabled by
// the route's upgrade_configs, which decide over the manager's as in
// Envoy) or 404 (allowed, but only path routes, which a CONNECT does not
// match); nothing reaches the upstream, and
// HTTP/1.1 closes the connection (what follows a CONNECT is tunnel data).
// An upstream that refuses the connection is 503 UF.
func TestConnectRefused(t *testing.T) {
	echo := tcpEcho(t)
	dead := func() netip.AddrPort {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		defer ln.Close()
		return ln.Addr().(*net.TCPAddr).AddrPort()
	}()
	off := connectRoute("c")
	routeAction(off).UpgradeConfigs[0].Enabled = wrapperspb.Bool(false)
	for _, tc := range []struct {
		name    string
		h       *hcmv3.HttpConnectionManager
		want    int
		details string
	}{
		{"not in upgrade_configs", hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("", "c")))), 403, "upgrade_failed"},
		{"disabled on the route", wsHCM(routeConfig(vhost("v", []string{"*"}, off)), "CONNECT"), 403, "upgrade_failed"},
		{"no connect route", wsHCM(routeConfig(vhost("v", []string{"*"}, prefixRoute("", "c"))), "CONNECT"), 404, "route_not_found"},
		{"upstream refuses", wsHCM(routeConfig(vhost("v", []string{"*"}, connectRoute("dead"))), "CONNECT"), 503, "upstream_reset_before_response_started{connection_failure}"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newEnv(t, xdstest.StaticCluster("c", echo), xdstest.StaticCluster("dead", dead))
			p := startProxy(t, mustParse(t, tc.h), env)
			resp, conn, br := connectH1(t, p.addr, "example.com:443", "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			if resp.StatusCode != tc.want {
				t.Fatalf("CONNECT: %d, want %d", resp.StatusCode, tc.want)
			}
			io.Copy(io.Discard, resp.Body)
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if b, err := br.ReadByte(); err == nil {
				t.Errorf("after the refused CONNECT the connection answered %q: the bytes behind it were read as a request", b)
			}
			e := p.waitEntries(t, 1)[0]
			if e.ResponseCode != tc.want || e.ResponseCodeDetails != tc.details {
				t.Errorf("access log: %d %s, want %d %s", e.ResponseCode, e.ResponseCodeDetails, tc.want, tc.details)
			}
			if n := clusterStat(t, env.Cluster("c"), "upstream_cx_total"); n != 0 {
				t.Errorf("the upstream was dialled %d times", n)
			}
		})
	}
}

// TestConnectMatcher: a connect_matcher route matches CONNECT requests
// only, and CONNECT requests match only such routes (a prefix "" route
// would match any path), as in Envoy; an RFC 8441 extended CONNECT (with
// :protocol) is an upgrade with a path and matches path routes.
func TestConnectMatcher(t *testing.T) {
	rts, err := CompileRoutes(routeConfig(
		vhost("both", []string{"both"}, connectRoute("c"), prefixRoute("", "p")),
		vhost("connect", []string{"connect"}, connectRoute("c")),
		vhost("path", []string{"path"}, prefixRoute("", "p"))))
	if err != nil {
		t.Fatal(err)
	}
	mk := func(method, host string, proto bool) *http.Request {
		r := &http.Request{Method: method, Host: host, Header: http.Header{}, RequestURI: "/x"}
		if method == http.MethodConnect && !proto {
			r.RequestURI = host
		}
		if proto {
			r.Header[":protocol"] = []string{"websocket"}
		}
		r.URL, _ = r.URL.Parse("http://" + host + "/x")
		return r
	}
	for _, tc := range []struct {
		method, host string
		proto        bool
		want         string // the route's cluster, "" for none
	}{
		{"CONNECT", "both", false, "c"},
		{"GET", "both", false, "p"},
		{"CONNECT", "connect", false, "c"},
		{"GET", "connect", false, ""},
		{"POST", "connect", false, ""},
		{"CONNECT", "path", false, ""},
		{"GET", "path", false, "p"},
		{"CONNECT", "both", true, "p"},
		{"CONNECT", "connect", true, ""},
	} {
		_, rt := rts.Match(mk(tc.method, tc.host, tc.proto))
		got := ""
		if rt != nil {
			got = rt.cluster
		}
		if got != tc.want {
			t.Errorf("%s (:protocol %v) to %s: route to %q, want %q", tc.method, tc.proto, tc.host, got, tc.want)
		}
	}
}

// TestParseConnectConfig: connect_config is accepted on the CONNECT
// upgrade of a route, and a connect_matcher route without it (CONNECT
// forwarded upstream); errors name the field for connect_config on
// another type and its unsupported fields.
func TestParseConnectConfig(t *testing.T) {
	withUpgrades := func(r *routev3.Route, ups ...*routev3.RouteAction_UpgradeConfig) *routev3.Route {
		routeAction(r).UpgradeConfigs = ups
		return r
	}
	cc := &routev3.RouteAction_UpgradeConfig_ConnectConfig{}
	off := connectRoute("c")
	routeAction(off).UpgradeConfigs[0].Enabled = wrapperspb.Bool(false)
	direct := connectRoute("c")
	direct.Action = &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 200}}
	for _, tc := range []struct {
		name    string
		r       *routev3.Route
		wantErr string // "" accepted
	}{
		{"terminate", connectRoute("c"), ""},
		{"disabled", off, ""},
		{"direct response", direct, ""},
		{"websocket with connect_config", withUpgrades(prefixRoute("/", "c"), &routev3.RouteAction_UpgradeConfig{UpgradeType: "websocket", ConnectConfig: cc}),
			"routes[0].route.upgrade_configs[0].connect_config: non-CONNECT upgrade type"},
		{"proxy_protocol_config", withUpgrades(connectRoute("c"), &routev3.RouteAction_UpgradeConfig{UpgradeType: "CONNECT",
			ConnectConfig: &routev3.RouteAction_UpgradeConfig_ConnectConfig{ProxyProtocolConfig: &corev3.ProxyProtocolConfig{}}}),
			"routes[0].route.upgrade_configs[0].connect_config.proxy_protocol_config"},
		{"allow_post", withUpgrades(connectRoute("c"), &routev3.RouteAction_UpgradeConfig{UpgradeType: "CONNECT",
			ConnectConfig: &routev3.RouteAction_UpgradeConfig_ConnectConfig{AllowPost: true}}),
			"routes[0].route.upgrade_configs[0].connect_config.allow_post"},
		{"forwarded", withUpgrades(connectRoute("c"), &routev3.RouteAction_UpgradeConfig{UpgradeType: "CONNECT"}), ""},
		{"no upgrade_configs", withUpgrades(connectRoute("c")), ""},
	} {
		_, err := CompileRoutes(routeConfig(vhost("v", []string{"*"}, tc.r)))
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%s: %v, want an error with %q", tc.name, err, tc.wantErr)
		}
	}
}

// TestConnectTunnelTimeouts: a terminated CONNECT's tunnel is ended by
// stream_idle_timeout once nothing moves (flag SI, the upstream closed
// too), not while bytes move; the route timeout bounds only the connect
// (the 200 is the response head), not the tunnel.
func TestConnectTunnelTimeouts(t *testing.T) {
	echo := tcpEcho(t)
	rt := connectRoute("c")
	routeAction(rt).Timeout = durationpb.New(100 * time.Millisecond)
	h := wsHCM(routeConfig(vhost("v", []string{"*"}, rt)), "CONNECT")
	h.StreamIdleTimeout = durationpb.New(300 * time.Millisecond)
	env := newEnv(t, xdstest.StaticCluster("c", echo))
	p := startProxy(t, mustParse(t, h), env)
	resp, conn, br := connectH1(t, p.addr, "example.com:443", "")
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %d", resp.StatusCode)
	}
	b := make([]byte, 1)
	for i := 0; i < 8; i++ { // 8 × 100 ms of traffic: beyond both timeouts
		io.WriteString(conn, "k")
		if _, err := io.ReadFull(br, b); err != nil {
			t.Fatalf("tunnel cut while busy, after %d round trips: %v", i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := br.ReadByte(); err == nil {
		t.Fatal("an idle tunnel read a byte")
	}
	e := p.waitEntries(t, 1)[0]
	if e.ResponseCode != 200 || !e.ResponseFlags.Has(FlagSI) {
		t.Errorf("idle tunnel: %d flags %v, want 200 SI", e.ResponseCode, e.ResponseFlags)
	}
	if n := clusterStat(t, env.Cluster("c"), "upstream_cx_active"); n != 0 {
		t.Errorf("upstream_cx_active %d after the tunnel, want 0", n)
	}
}

// connectProxy is an HTTP/1.1 upstream that accepts CONNECT (200, then
// echoes the tunnel's bytes and answers a half-close with its own) and
// refuses CONNECT to "forbidden:443" (403); it records each request's
// method and target.
func connectProxy(seen chan<- string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Method + " " + r.RequestURI + " " + r.Host
		if r.Method != http.MethodConnect || r.Host == "forbidden:443" {
			http.Error(w, "no", http.StatusForbidden)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 200 Connection established\r\n\r\n")
		brw.Flush()
		io.Copy(conn, brw)
		conn.(*net.TCPConn).CloseWrite()
	}
}

// TestConnectForwarded: a connect_matcher route without connect_config
// forwards the CONNECT to its HTTP/1.1 upstream as a CONNECT (authority
// form, no Upgrade headers), as Envoy does; the upstream's 2xx starts
// the tunnel (HTTP/1.1 and h2 clients, the client's end half-closing the
// upstream), its refusal is relayed (and HTTP/1.1 closes).
func TestConnectForwarded(t *testing.T) {
	seen := make(chan string, 4)
	u := startUpstream(t, connectProxy(seen))
	rt := connectRoute("c")
	routeAction(rt).UpgradeConfigs = nil
	p := startProxy(t, mustParse(t, wsHCM(routeConfig(vhost("v", []string{"*"}, rt)), "CONNECT")), newEnv(t, xdstest.StaticCluster("c", u.addr)))

	resp, conn, br := connectH1(t, p.addr, "example.com:443", "early")
	if resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %d", resp.StatusCode)
	}
	if got := <-seen; got != "CONNECT example.com:443 example.com:443" {
		t.Errorf("upstream saw %q", got)
	}
	io.WriteString(conn, "-late")
	conn.(*net.TCPConn).CloseWrite()
	if rest, err := io.ReadAll(br); err != nil || string(rest) != "early-late" {
		t.Errorf("tunnel: %q %v, want the echo then the end", rest, err)
	}
	if e := p.waitEntries(t, 1)[0]; e.ResponseCode != 200 || e.BytesSent != 10 || e.BytesReceived != 10 || e.UpstreamCluster != "c" {
		t.Errorf("access log: %d sent %d received %d cluster %q", e.ResponseCode, e.BytesSent, e.BytesReceived, e.UpstreamCluster)
	}

	resp, conn, br = connectH1(t, p.addr, "forbidden:443", "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	<-seen
	io.Copy(io.Discard, resp.Body)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadByte(); resp.StatusCode != 403 || err == nil {
		t.Errorf("refused CONNECT: %d, then read error %v (want 403 and the connection closed)", resp.StatusCode, err)
	}

	pr, pw := io.Pipe()
	req, _ := http.NewRequest(http.MethodConnect, "http://"+p.addr, pr)
	req.Host = "example.com:443"
	h2c := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer h2c.CloseIdleConnections()
	hresp, err := h2c.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer hresp.Body.Close()
	if got := <-seen; hresp.StatusCode != 200 || got != "CONNECT example.com:443 example.com:443" {
		t.Fatalf("h2 CONNECT: %d, upstream saw %q", hresp.StatusCode, got)
	}
	go func() {
		pw.Write([]byte("h2 bytes"))
		pw.Close()
	}()
	if rest, err := io.ReadAll(hresp.Body); err != nil || string(rest) != "h2 bytes" {
		t.Errorf("h2 tunnel: %q %v", rest, err)
	}
}
