//go:build linux

package integration

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestConnectThroughSidecar (issue #15 item 8): the pod's outbound
// listener allows CONNECT (upgrade_configs on the connection manager) and
// its route configuration has a connect_matcher route whose CONNECT
// upgrade has connect_config: a CONNECT to the service's VIP is
// terminated by the sidecar, which dials the route's cluster and relays
// the tunnel's bytes. curl --proxytunnel fetches a page through the
// tunnel; a Go client sends a 500 KB body through it and reads the echo
// back; an h2c client's CONNECT stream carries a request too; a GET to the same VIP still takes the path route; the access log
// shows the CONNECT's 200 and its bytes. Before, every CONNECT was
// answered 403.
func TestConnectThroughSidecar(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	ep := netip.AddrPortFrom(topo.SvcV4, 9090)
	ln, err := listenTCP(topo.Services, ep.String())
	if err != nil {
		t.Fatal(err)
	}
	// The cluster's endpoint is an HTTP server: what the tunnel carries
	// is the client's own HTTP exchange with it.
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/echo":
			io.Copy(w, r.Body)
		default:
			fmt.Fprintf(w, "%s %s from the upstream", r.Method, r.URL.Path)
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	const name = "outbound|80||tunnel.default.svc.cluster.local"
	v := vip(topo, false, 80)
	route := obj{"name": "80", "validate_clusters": false, "virtual_hosts": []obj{
		{"name": "tunnel.default.svc.cluster.local:80", "domains": []string{"tunnel", "tunnel:80", v.String(), ap(v, 80)},
			"routes": []obj{
				{"name": "connect", "match": obj{"connect_matcher": obj{}},
					"route": obj{"cluster": name, "upgrade_configs": []obj{{"upgrade_type": "CONNECT", "connect_config": obj{}}}}},
				{"name": "default", "match": obj{"prefix": "/"}, "route": obj{"cluster": name}},
			}},
	}}
	l := istioHTTPListener(80)
	hcm := l["filter_chains"].([]obj)[0]["filters"].([]obj)[0]["typed_config"].(obj)
	hcm["upgrade_configs"] = []obj{{"upgrade_type": "websocket"}, {"upgrade_type": "CONNECT"}}
	cp.pushHTTP(t, "1", []obj{virtualOutbound("BlackHoleCluster"), virtualInbound(), l},
		append(istioClusters(), edsCluster(name)), map[string][]netip.AddrPort{name: {ep}}, []obj{route})
	px := startHTTPProxy(t, topo)
	url := "http://" + ap(v, 80)

	// A plain GET takes the path route (and tells that the route is in).
	pc := podClient(topo, false, 1)
	defer pc.CloseIdleConnections()
	deadline := time.Now().Add(10 * time.Second)
	for {
		req, _ := http.NewRequest("GET", url+"/plain", nil)
		req.Host = "tunnel"
		if resp, err := pc.Do(req); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				if string(b) != "GET /plain from the upstream" {
					t.Fatalf("GET through the path route: %q", b)
				}
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the route never arrived")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// curl -p: CONNECT tunnel:80, then its GET inside the tunnel.
	out, err := nsRun(topo.Pod, "curl", "-sS", "--max-time", "10", "-p", "-x", url, "http://tunnel:80/through")
	if err != nil || out != "GET /through from the upstream" {
		t.Fatalf("curl --proxytunnel: %q %v", out, err)
	}

	// A Go client: CONNECT, then 500 KB up the tunnel and back.
	conn, err := dialTCP(topo.Pod, ap(v, 80), dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(conn, "CONNECT tunnel:80 HTTP/1.1\r\nHost: tunnel:80\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	big := strings.Repeat("0123456789", 50<<10)
	go fmt.Fprintf(conn, "POST /echo HTTP/1.1\r\nHost: tunnel\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s", len(big), big)
	inner, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("the response inside the tunnel: %v", err)
	}
	b, err := io.ReadAll(inner.Body)
	if err != nil || string(b) != big {
		t.Fatalf("echo through the tunnel: %d of %d bytes, %v", len(b), len(big), err)
	}
	// The upstream closed (Connection: close): the tunnel ends.
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("after the upstream's close: %v, want EOF", err)
	}
	// An h2c client's CONNECT is a stream: its DATA is the tunnel.
	h2c := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, _, _ string, _ *tls.Config) (net.Conn, error) {
		return dialTCP(topo.Pod, ap(v, 80), dialTimeout)
	}}
	defer h2c.CloseIdleConnections()
	pr, pw := io.Pipe()
	req, _ := http.NewRequest(http.MethodConnect, url, pr)
	req.Host = "tunnel:80"
	hresp, err := h2c.RoundTrip(req)
	if err != nil || hresp.StatusCode != 200 {
		t.Fatalf("h2 CONNECT: %v %v", hresp, err)
	}
	go fmt.Fprintf(pw, "GET /h2 HTTP/1.1\r\nHost: tunnel\r\nConnection: close\r\n\r\n")
	inner, err = http.ReadResponse(bufio.NewReader(hresp.Body), nil)
	if err != nil {
		t.Fatalf("the response inside the h2 tunnel: %v", err)
	}
	if b, _ := io.ReadAll(inner.Body); string(b) != "GET /h2 from the upstream" {
		t.Errorf("through the h2 tunnel: %q", b)
	}
	pw.Close()
	hresp.Body.Close()

	e, ok := px.waitAccess(func(e AccessEntry) bool {
		return strings.Contains(e.Raw, `"method":"CONNECT"`) && e.BytesSent > int64(len(big))
	}, 5*time.Second)
	if !ok {
		t.Fatal("no access line for the CONNECT")
	}
	if !strings.Contains(e.Raw, `"response_code":200`) || e.BytesReceived < int64(len(big)) || e.UpstreamCluster != name {
		t.Errorf("access line: %s", e.Raw)
	}
}
