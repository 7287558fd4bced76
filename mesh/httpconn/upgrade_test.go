package httpconn

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// wsEcho is a WebSocket server (coder/websocket) that echoes every
// message, and closes when it reads "bye".
func wsEcho(w http.ResponseWriter, r *http.Request) {
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)
	for {
		typ, b, err := c.Read(r.Context())
		if err != nil {
			return
		}
		if string(b) == "bye" {
			c.Close(websocket.StatusNormalClosure, "bye")
			return
		}
		if err := c.Write(r.Context(), typ, b); err != nil {
			return
		}
	}
}

func wsHCM(rc *routev3.RouteConfiguration, types ...string) *hcmv3.HttpConnectionManager {
	h := hcm(rc)
	for _, t := range types {
		h.UpgradeConfigs = append(h.UpgradeConfigs, &hcmv3.HttpConnectionManager_UpgradeConfig{UpgradeType: t})
	}
	return h
}

// TestWebSocketUpgrade (issue #15 item 11): with Istio's upgrade_configs
// [{upgrade_type: websocket}] a WebSocket client (coder/websocket) and
// server talk through the proxy: text and binary messages echoed, a
// message larger than the copy buffer, and the server's close reaching
// the client; the upgraded connection is counted while open and the
// access log shows the 101 with its bytes. Before, the Upgrade headers
// were stripped as hop-by-hop and the handshake failed.
func TestWebSocketUpgrade(t *testing.T) {
	u := startUpstream(t, wsEcho)
	cfg := mustParse(t, wsHCM(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))), "websocket"))
	p := startProxy(t, cfg, newEnv(t, xdstest.StaticCluster("c", u.addr)))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, "ws://"+p.addr+"/chat", nil)
	if err != nil {
		t.Fatalf("dial: %v (response %v)", err, resp)
	}
	defer c.CloseNow()
	if resp.Header.Get("Server") != "envoy" {
		t.Errorf("101 without the proxy's server header: %v", resp.Header)
	}
	c.SetReadLimit(1 << 20)
	big := strings.Repeat("x", 200<<10)
	for _, m := range []struct {
		typ websocket.MessageType
		msg string
	}{{websocket.MessageText, "hello"}, {websocket.MessageBinary, "\x00\x01\x02"}, {websocket.MessageText, big}} {
		if err := c.Write(ctx, m.typ, []byte(m.msg)); err != nil {
			t.Fatal(err)
		}
		typ, b, err := c.Read(ctx)
		if err != nil || typ != m.typ || string(b) != m.msg {
			t.Fatalf("echo of %d bytes: type %v, %d bytes, %v", len(m.msg), typ, len(b), err)
		}
	}
	if n := cfg.Stats().DownstreamCxUpgradesActive.Load(); n != 1 {
		t.Errorf("downstream_cx_upgrades_active %d while open, want 1", n)
	}
	if err := c.Write(ctx, websocket.MessageText, []byte("bye")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Read(ctx); websocket.CloseStatus(err) != websocket.StatusNormalClosure {
		t.Fatalf("after bye: %v, want the server's normal closure", err)
	}
	e := p.waitEntries(t, 1)[0]
	if e.ResponseCode != 101 || e.ResponseCodeDetails != "via_upstream" || e.BytesSent < int64(len(big)) || e.BytesReceived < int64(len(big)) {
		t.Errorf("access log: %d %s sent %d received %d", e.ResponseCode, e.ResponseCodeDetails, e.BytesSent, e.BytesReceived)
	}
	if cfg.Stats().DownstreamCxUpgradesTotal.Load() != 1 || cfg.Stats().DownstreamCxUpgradesActive.Load() != 0 {
		t.Errorf("upgrades total %d active %d, want 1 and 0", cfg.Stats().DownstreamCxUpgradesTotal.Load(), cfg.Stats().DownstreamCxUpgradesActive.Load())
	}
}

// rawUpgrade sends an HTTP/1.1 Upgrade request and returns the response
// head and the connection (for the tunnel's bytes).
func rawUpgrade(t *testing.T, addr *proxy, path, proto string) (*http.Response, net.Conn, *bufio.Reader) {
	t.Helper()
	addr.sent.Add(1)
	conn, err := net.Dial("tcp", addr.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(conn, "GET "+path+" HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: "+proto+"\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	return resp, conn, br
}

// rawEcho is an upstream that switches to any protocol asked and echoes
// bytes; it records the request's Upgrade and Connection headers.
func rawEcho(seen chan<- http.Header) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		select {
		case seen <- r.Header.Clone():
		default:
		}
		if r.Header.Get("Upgrade") == "" {
			io.WriteString(w, "plain")
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + r.Header.Get("Upgrade") + "\r\n\r\n")
		brw.Flush()
		io.Copy(conn, brw)
	}
}

// TestUpgradeConfigs: upgrade_configs decide which Upgrade requests go
// through, the route's list over the connection manager's type by type
// (Envoy's per-route upgrade map): a type not allowed is answered 403
// (upgrade_failed) without reaching the upstream; an allowed one reaches
// it with its Connection: Upgrade and Upgrade headers and its bytes flow
// both ways; "h2c" is no upgrade (served as a plain request).
func TestUpgradeConfigs(t *testing.T) {
	seen := make(chan http.Header, 1)
	u := startUpstream(t, rawEcho(seen))
	off := prefixRoute("/off", "c")
	routeAction(off).UpgradeConfigs = []*routev3.RouteAction_UpgradeConfig{{UpgradeType: "WebSocket", Enabled: wrapperspb.Bool(false)}}
	on := prefixRoute("/on", "c")
	routeAction(on).UpgradeConfigs = []*routev3.RouteAction_UpgradeConfig{{UpgradeType: "custom"}}
	rc := routeConfig(vhost("v", []string{"*"}, off, on, prefixRoute("/", "c")))
	p := startProxy(t, mustParse(t, wsHCM(rc, "websocket")), newEnv(t, xdstest.StaticCluster("c", u.addr)))

	for _, tc := range []struct {
		path, proto string
		want        int
	}{
		{"/ws", "websocket", 101},
		{"/ws", "WebSocket", 101}, // types compare without case
		{"/ws", "custom", 403},    // not in the connection manager's list
		{"/off", "websocket", 403},
		{"/on", "custom", 101},
		{"/on", "websocket", 101}, // the route lists only custom: the HCM decides
		{"/ws", "h2c", 200},
	} {
		<-drainSeen(seen)
		failedBefore := 0
		if n := int(p.sent.Load()); n > 0 {
			failedBefore = upgradeFailures(p.waitEntries(t, n))
		}
		resp, conn, br := rawUpgrade(t, p, tc.path, tc.proto)
		if resp.StatusCode != tc.want {
			t.Errorf("%s Upgrade: %s: %d, want %d", tc.path, tc.proto, resp.StatusCode, tc.want)
			continue
		}
		switch tc.want {
		case 403:
			if n := upgradeFailures(p.waitEntries(t, int(p.sent.Load()))); n != failedBefore+1 {
				t.Errorf("%s %s: %d upgrade_failed entries, want %d", tc.path, tc.proto, n, failedBefore+1)
			}
			select {
			case h := <-seen:
				t.Errorf("%s %s: refused, yet the upstream saw %v", tc.path, tc.proto, h)
			default:
			}
		case 200:
			h := <-seen
			if h.Get("Upgrade") != "" {
				t.Errorf("h2c: the upstream saw Upgrade %q", h.Get("Upgrade"))
			}
		case 101:
			h := <-seen
			if h.Get("Upgrade") != tc.proto || !strings.EqualFold(h.Get("Connection"), "upgrade") {
				t.Errorf("%s %s: upstream saw Connection %q Upgrade %q", tc.path, tc.proto, h.Get("Connection"), h.Get("Upgrade"))
			}
			if resp.Header.Get("Upgrade") != tc.proto || !strings.EqualFold(resp.Header.Get("Connection"), "upgrade") {
				t.Errorf("%s %s: 101 with Connection %q Upgrade %q", tc.path, tc.proto, resp.Header.Get("Connection"), resp.Header.Get("Upgrade"))
			}
			io.WriteString(conn, "ping")
			b := make([]byte, 4)
			if _, err := io.ReadFull(br, b); err != nil || string(b) != "ping" {
				t.Errorf("%s %s: tunnel echo %q %v", tc.path, tc.proto, b, err)
			}
		}
		conn.Close()
	}
}

func upgradeFailures(es []Entry) int {
	n := 0
	for _, e := range es {
		if e.ResponseCodeDetails == "upgrade_failed" {
			n++
		}
	}
	return n
}

func drainSeen(seen chan http.Header) <-chan struct{} {
	select {
	case <-seen:
	default:
	}
	c := make(chan struct{})
	close(c)
	return c
}

// TestUpgradeTunnelEnds: a tunnel ends when either side closes (the
// other sees its connection closed) and, idle, by stream_idle_timeout
// (flag SI), which a tunnel that moves bytes does not meet.
func TestUpgradeTunnelEnds(t *testing.T) {
	u := startUpstream(t, rawEcho(nil))
	h := wsHCM(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))), "websocket")
	h.StreamIdleTimeout = durationpb.New(300 * time.Millisecond)
	p := startProxy(t, mustParse(t, h), newEnv(t, xdstest.StaticCluster("c", u.addr)))

	// The client closes: the upstream's echo loop ends (it sees EOF) and
	// the stream is logged.
	resp, conn, _ := rawUpgrade(t, p, "/", "websocket")
	if resp.StatusCode != 101 {
		t.Fatalf("upgrade: %d", resp.StatusCode)
	}
	conn.Close()
	if e := p.waitEntries(t, 1)[0]; e.ResponseCode != 101 || e.ResponseFlags.Has(FlagSI) {
		t.Errorf("client close: %d %v", e.ResponseCode, e.ResponseFlags)
	}

	// Busy for longer than the idle timeout, then idle: closed, SI.
	resp, conn, br := rawUpgrade(t, p, "/", "websocket")
	if resp.StatusCode != 101 {
		t.Fatalf("upgrade: %d", resp.StatusCode)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 1)
	for i := 0; i < 8; i++ { // 8 × 100 ms of traffic: beyond 300 ms in all
		io.WriteString(conn, "k")
		if _, err := io.ReadFull(br, b); err != nil {
			t.Fatalf("tunnel cut while busy, after %d round trips: %v", i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := br.ReadByte(); err == nil {
		t.Fatal("an idle tunnel read a byte")
	}
	es := p.waitEntries(t, 2)
	if e := es[1]; !e.ResponseFlags.Has(FlagSI) {
		t.Errorf("idle tunnel: flags %v, want SI", e.ResponseFlags)
	}

	// The end of the listener's drain (Serve's context) cuts a tunnel
	// (one without an idle timeout), and Serve returns once it is gone.
	p3 := startProxy(t, mustParse(t, wsHCM(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))), "websocket")), newEnv(t, xdstest.StaticCluster("c", u.addr)))
	resp, conn, br = rawUpgrade(t, p3, "/", "websocket")
	if resp.StatusCode != 101 {
		t.Fatalf("upgrade: %d", resp.StatusCode)
	}
	io.WriteString(conn, "k")
	if _, err := io.ReadFull(br, b); err != nil {
		t.Fatal(err)
	}
	p3.cancel()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadByte(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("tunnel after the drain's end: %v, want it closed", err)
	}

	// The upstream closes: the client sees the end.
	u2 := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		conn, brw, _ := http.NewResponseController(w).Hijack()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nbye")
		brw.Flush()
		conn.Close()
	})
	p2 := startProxy(t, mustParse(t, wsHCM(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))), "websocket")), newEnv(t, xdstest.StaticCluster("c", u2.addr)))
	resp, _, br = rawUpgrade(t, p2, "/", "websocket")
	rest, err := io.ReadAll(br)
	if resp.StatusCode != 101 || string(rest) != "bye" || err != nil {
		t.Errorf("upstream close: %d %q %v, want 101, \"bye\", then the end", resp.StatusCode, rest, err)
	}
}

// TestParseUpgradeConfigs: errors name the field.
func TestParseUpgradeConfigs(t *testing.T) {
	h := wsHCM(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))), "websocket", "WEBSOCKET")
	if _, err := ParseHCM(h); err == nil || !strings.Contains(err.Error(), "http_connection_manager.upgrade_configs[1].upgrade_type") {
		t.Errorf("duplicate type: %v", err)
	}
	h = wsHCM(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))), "websocket")
	h.UpgradeConfigs[0].Filters = []*hcmv3.HttpFilter{routerFilter()}
	if _, err := ParseHCM(h); err == nil || !strings.Contains(err.Error(), "upgrade_configs[0].filters") {
		t.Errorf("filters: %v", err)
	}
	r := prefixRoute("/", "c")
	routeAction(r).UpgradeConfigs = []*routev3.RouteAction_UpgradeConfig{{UpgradeType: "a"}, {UpgradeType: "A"}}
	if _, err := CompileRoutes(routeConfig(vhost("v", []string{"*"}, r))); err == nil || !strings.Contains(err.Error(), "virtual_hosts[0].routes[0].route.upgrade_configs[1].upgrade_type") {
		t.Errorf("route duplicate: %v", err)
	}
}

// TestUpgradeOutlivesRouteTimeout: the route timeout bounds the wait for
// an upgrade's 101 only. A tunnel that moves bytes for longer than the
// route timeout is not cut by it (the timeout cancels the stream's
// context, which the tunnel watches, so the tunnel must stop it), and no
// upstream timeout is counted.
func TestUpgradeOutlivesRouteTimeout(t *testing.T) {
	u := startUpstream(t, rawEcho(nil))
	rt := prefixRoute("/", "c")
	routeAction(rt).Timeout = durationpb.New(100 * time.Millisecond)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	p := startProxy(t, mustParse(t, wsHCM(routeConfig(vhost("v", []string{"*"}, rt)), "websocket")), env)
	resp, conn, br := rawUpgrade(t, p, "/", "websocket")
	if resp.StatusCode != 101 {
		t.Fatalf("upgrade: %d", resp.StatusCode)
	}
	b := make([]byte, 1)
	for i := 0; i < 5; i++ { // 5 × 60 ms of traffic: three times the route timeout
		io.WriteString(conn, "k")
		if _, err := io.ReadFull(br, b); err != nil {
			t.Fatalf("tunnel cut after %d round trips: %v", i, err)
		}
		time.Sleep(60 * time.Millisecond)
	}
	conn.Close()
	if e := p.waitEntries(t, 1)[0]; e.ResponseCode != 101 || e.ResponseFlags.Has(FlagUT) {
		t.Errorf("tunnel: %d flags %v, want 101 without UT", e.ResponseCode, e.ResponseFlags)
	}
	if v := clusterStat(t, env.clusters["c"], "upstream_rq_timeout"); v != 0 {
		t.Errorf("upstream_rq_timeout = %d, want 0", v)
	}
}
