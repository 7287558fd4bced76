//go:build linux

package integration

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestWebSocketThroughSidecar (issue #15 item 11): a WebSocket client
// (coder/websocket) in the pod talks to a WebSocket echo server through
// capture and Istio's outbound listener, whose connection manager carries
// istiod's upgrade_configs [{upgrade_type: websocket}]: messages both
// ways, a server push the client did not ask for, and the server's close
// reaching the client; an Upgrade the configuration does not list is
// answered 403. Before, the Upgrade headers were stripped as hop-by-hop
// and the handshake failed.
func TestWebSocketThroughSidecar(t *testing.T) {
	requireRoot(t)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ws" {
			return
		}
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		// A push first: the server speaks before the client does.
		if c.Write(r.Context(), websocket.MessageText, []byte("welcome")) != nil {
			return
		}
		for {
			typ, b, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if string(b) == "bye" {
				c.Close(websocket.StatusNormalClosure, "bye")
				return
			}
			if c.Write(r.Context(), typ, b) != nil {
				return
			}
		}
	})
	s := startStreamService(t, handler, false, nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	hc := &http.Client{Transport: &http.Transport{DialContext: s.dialPod}}
	c, resp, err := websocket.Dial(ctx, s.url+"/ws", &websocket.DialOptions{HTTPClient: hc, Host: s.host})
	if err != nil {
		t.Fatalf("WebSocket handshake through the sidecar: %v (response %v)", err, resp)
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)
	if typ, b, err := c.Read(ctx); err != nil || typ != websocket.MessageText || string(b) != "welcome" {
		t.Fatalf("server push: %v %q %v", typ, b, err)
	}
	big := strings.Repeat("0123456789", 50<<10) // 500 KB: many TCP segments each way
	for i, m := range []string{"hello", "\x00binary\xff", big} {
		typ := websocket.MessageText
		if i == 1 {
			typ = websocket.MessageBinary
		}
		if err := c.Write(ctx, typ, []byte(m)); err != nil {
			t.Fatal(err)
		}
		gt, b, err := c.Read(ctx)
		if err != nil || gt != typ || string(b) != m {
			t.Fatalf("echo %d (%d bytes): %v, %d bytes, %v", i, len(m), gt, len(b), err)
		}
	}
	if err := c.Write(ctx, websocket.MessageText, []byte("bye")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Read(ctx); websocket.CloseStatus(err) != websocket.StatusNormalClosure {
		t.Fatalf("after bye: %v, want the server's normal closure", err)
	}
	e, ok := s.px.waitAccess(func(e AccessEntry) bool { return strings.Contains(e.Raw, `"path":"/ws"`) }, 5*time.Second)
	if !ok {
		t.Fatal("no access line for /ws")
	}
	if !strings.Contains(e.Raw, `"response_code":101`) || e.BytesSent < int64(len(big)) || e.BytesReceived < int64(len(big)) {
		t.Errorf("access line: %s", e.Raw)
	}

	// An upgrade type the connection manager does not list: 403.
	conn, err := dialTCP(s.topo.Pod, s.addr, dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(conn, "GET /ws HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: spdy/3.1\r\n\r\n", s.host)
	buf := make([]byte, 12)
	if n, _ := conn.Read(buf); string(buf[:n]) != "HTTP/1.1 403" {
		t.Errorf("Upgrade: spdy/3.1 answered %q, want 403", buf[:n])
	}
}
