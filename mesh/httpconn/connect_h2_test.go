package httpconn

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"golang.org/x/net/http2"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestExtendedConnectWebSocket (issue #15 item 11, RFC 8441): with
// http2_protocol_options.allow_connect an h2c client's extended CONNECT
// (:protocol websocket) goes to an HTTP/1.1 upstream as a WebSocket
// upgrade (GET, Upgrade: websocket, a Sec-WebSocket-Key made up), the
// 101 comes back as 200, and the stream's DATA frames carry the tunnel's
// bytes both ways. net/http serves extended CONNECT only under
// GODEBUG=http2xconnect=1, read at process start: the test runs itself
// again with it.
func TestExtendedConnectWebSocket(t *testing.T) {
	if !strings.Contains(os.Getenv("GODEBUG"), "http2xconnect=1") {
		cmd := exec.Command(os.Args[0], "-test.run=^TestExtendedConnectWebSocket$", "-test.count=1")
		cmd.Env = append(os.Environ(), "GODEBUG=http2xconnect=1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "PASS") {
			t.Fatalf("with GODEBUG=http2xconnect=1: %v\n%s", err, out)
		}
		return
	}
	seen := make(chan http.Header, 1)
	u := startUpstream(t, rawEcho(seen))
	h := wsHCM(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))), "websocket")
	h.Http2ProtocolOptions = &corev3.Http2ProtocolOptions{AllowConnect: true}
	p := startProxy(t, mustParse(t, h), newEnv(t, xdstest.StaticCluster("c", u.addr)))
	pr, pw := io.Pipe()
	req, _ := http.NewRequest(http.MethodConnect, "http://"+p.addr+"/chat", pr)
	req.Header.Set(":protocol", "websocket")
	req.Header.Set("Sec-Websocket-Version", "13")
	p.sent.Add(1)
	// net/http's client refuses the :protocol header; x/net's HTTP/2
	// transport (the same code, unbundled) sends extended CONNECT.
	h2c := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer h2c.CloseIdleConnections()
	resp, err := h2c.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Sec-Websocket-Accept") != "" {
		t.Fatalf("extended CONNECT: %d %v, want 200 without the HTTP/1.1 accept", resp.StatusCode, resp.Header)
	}
	up := <-seen
	if up.Get("Upgrade") != "websocket" || up.Get("Sec-Websocket-Key") == "" || up.Get(":protocol") != "" {
		t.Errorf("upstream request headers: %v", up)
	}
	for _, m := range []string{"ping", strings.Repeat("z", 100<<10)} {
		go pw.Write([]byte(m))
		b := make([]byte, len(m))
		if _, err := io.ReadFull(resp.Body, b); err != nil || string(b) != m {
			t.Fatalf("tunnel echo of %d bytes: %v", len(m), err)
		}
	}
	pw.Close()
	if _, err := io.ReadAll(resp.Body); err != nil {
		t.Errorf("after the client's end: %v", err)
	}
	if e := p.lastEntry(t); e.ResponseCode != 200 || e.BytesSent < 100<<10 {
		t.Errorf("access log: %d sent %d", e.ResponseCode, e.BytesSent)
	}

	// Without allow_connect: 403 (upgrade_failed).
	h.Http2ProtocolOptions = nil
	p2 := startProxy(t, mustParse(t, h), newEnv(t, xdstest.StaticCluster("c", u.addr)))
	req, _ = http.NewRequest(http.MethodConnect, "http://"+p2.addr+"/chat", http.NoBody)
	req.Header.Set(":protocol", "websocket")
	resp, err = h2c.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("without allow_connect: %d, want 403", resp.StatusCode)
	}
}
