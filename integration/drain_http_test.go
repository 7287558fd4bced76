//go:build linux

package integration

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// httpInbound is Istio's virtualInbound with an HTTP chain for port 8080
// (an inline route to the InboundPassthroughCluster with timeout 0, as
// Istio's inbound routes) besides its TCP catch-all.
func httpInbound() obj {
	l := virtualInbound()
	hcm := obj{"name": "envoy.filters.network.http_connection_manager", "typed_config": obj{
		"@type":       "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
		"stat_prefix": "inbound_0.0.0.0_8080",
		"route_config": obj{"name": "inbound|8080||", "virtual_hosts": []obj{{"name": "inbound|http|8080", "domains": []string{"*"},
			"routes": []obj{routeTo("/", obj{"cluster": "InboundPassthroughCluster", "timeout": "0s"})}}}},
		"http_filters": []obj{{"name": "envoy.filters.http.router", "typed_config": obj{"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}}}}
	l["filter_chains"] = append([]obj{{"name": "inbound-http-8080", "filter_chain_match": obj{"destination_port": 8080}, "filters": []obj{hcm}}},
		l["filter_chains"].([]obj)...)
	return l
}

// holdingApp is the pod's HTTP/1.1 and h2c application on port 8080: /hold
// never answers (the handler ends when the proxy gives the request up),
// anything else answers at once. arrived receives each /hold.
func holdingApp(t *testing.T, topo *topology) (arrived chan string) {
	t.Helper()
	ln, err := listenTCP(topo.Pod, ap(topo.PodV4, 8080))
	if err != nil {
		t.Fatal(err)
	}
	arrived = make(chan string, 8)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			arrived <- r.Proto
			<-r.Context().Done()
			return
		}
		io.WriteString(w, "ok")
	})}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return arrived
}

// httpDrainConns are inbound connections from the services namespace
// through the proxy: idle is an HTTP/1.1 keep-alive connection after one
// exchange, held an HTTP/1.1 connection whose request the app holds, h2 an
// h2c connection with such a stream. Each reports when it is closed; h2
// also when a GOAWAY arrives.
type httpDrainConns struct {
	idleClosed, heldClosed, h2Closed <-chan time.Time
	goAway                           <-chan http2.ErrCode
}

func openHTTPDrainConns(t *testing.T, topo *topology, arrived <-chan string) httpDrainConns {
	t.Helper()
	dst := ap(topo.PodV4, 8080)
	dial := func() *net.TCPConn {
		c, err := dialTCP(topo.Services, dst, dialTimeout)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	var cs httpDrainConns
	idle := dial()
	io.WriteString(idle, "GET /ok HTTP/1.1\r\nHost: app\r\n\r\n")
	idle.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(idle), nil)
	if err != nil {
		t.Fatalf("keep-alive exchange through the proxy: %v", err)
	}
	io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || resp.Close {
		t.Fatalf("keep-alive exchange through the proxy: %d close=%v", resp.StatusCode, resp.Close)
	}
	cs.idleClosed = closedWhen(idle)
	held := dial()
	io.WriteString(held, "GET /hold HTTP/1.1\r\nHost: app\r\n\r\n")
	cs.heldClosed = closedWhen(held)
	cs.h2Closed, cs.goAway = h2Hold(t, dial(), "/hold")
	for i := 0; i < 2; i++ {
		select {
		case <-arrived:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of 2 held requests reached the app", i)
		}
	}
	return cs
}

// closedWhen reads c until the peer closes it and reports when (the zero
// time if not within 30 s).
func closedWhen(c net.Conn) <-chan time.Time {
	ch := make(chan time.Time, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		_, err := io.Copy(io.Discard, c)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			ch <- time.Time{}
			return
		}
		ch <- time.Now()
	}()
	return ch
}

// h2Hold speaks h2c on c with one stream for path, answers SETTINGS and
// PINGs, and reports GOAWAYs and the connection's close.
func h2Hold(t *testing.T, c net.Conn, path string) (<-chan time.Time, <-chan http2.ErrCode) {
	t.Helper()
	fr := http2.NewFramer(c, c)
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "app"}, {":path", path}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	closed, goAway := make(chan time.Time, 1), make(chan http2.ErrCode, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					closed <- time.Time{}
				} else {
					closed <- time.Now()
				}
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					fr.WriteSettingsAck()
				}
			case *http2.PingFrame:
				if !f.IsAck() {
					fr.WritePing(true, f.Data)
				}
			case *http2.GoAwayFrame:
				select {
				case goAway <- f.ErrCode:
				default:
				}
			}
		}
	}()
	return closed, goAway
}

// checkHTTPDrain checks what a drain that started at start and ends at
// end did to cs: at once, the idle HTTP/1.1 connection closed and the h2c
// one got a graceful GOAWAY; the connections holding a request closed at
// the end, not before, and within slack after it.
func checkHTTPDrain(t *testing.T, cs httpDrainConns, start, end time.Time, slack time.Duration) {
	t.Helper()
	if at := <-cs.idleClosed; at.IsZero() || !at.Before(end) {
		t.Errorf("idle HTTP/1.1 keep-alive connection closed at %v, want at once (the drain ends at %v)", since(at, start), end.Sub(start))
	}
	select {
	case code := <-cs.goAway:
		if code != http2.ErrCodeNo {
			t.Errorf("GOAWAY %v, want NO_ERROR (graceful)", code)
		}
		if time.Now().After(end) {
			t.Errorf("GOAWAY %v after the drain started, want at once", time.Since(start))
		}
	case <-time.After(time.Until(end)):
		t.Error("no GOAWAY on the h2c connection before the drain's end")
	}
	for what, ch := range map[string]<-chan time.Time{"HTTP/1.1": cs.heldClosed, "h2c": cs.h2Closed} {
		at := <-ch
		switch {
		case at.IsZero():
			t.Errorf("%s connection holding a request: never closed", what)
		case at.Before(end):
			t.Errorf("%s connection holding a request closed %v after the drain started, before its end (%v)", what, at.Sub(start), end.Sub(start))
		case at.After(end.Add(slack)):
			t.Errorf("%s connection holding a request closed %v after the drain started, want at its end (%v)", what, at.Sub(start), end.Sub(start))
		}
	}
}

func since(at, start time.Time) string {
	if at.IsZero() {
		return "never"
	}
	return at.Sub(start).String()
}

// TestAdminGracefulDrainHTTP: POST /drain_listeners?graceful with
// --drain-duration 2s on a proxy serving inbound HTTP (HTTP/1.1 and h2c)
// whose app holds requests open: at once the idle keep-alive connection is
// closed, the h2c connection gets GOAWAY, and a new request (new flows are
// still taken in the graceful window) is answered with "Connection:
// close"; the connections holding a request are closed when the 2 s are
// over, after which new inbound flows are refused.
func TestAdminGracefulDrainHTTP(t *testing.T) {
	requireRoot(t)
	const drain = 2 * time.Second
	topo := newTopology(t)
	arrived := holdingApp(t, topo)
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), httpInbound()}, istioClusters())
	startProxy(t, topo, "--bootstrap", bs, "--drain-duration", drain.String())
	cs := openHTTPDrainConns(t, topo, arrived)

	start := time.Now()
	if code, body := adminDo(t, topo, "POST", "/drain_listeners?graceful"); code != 200 || body != "OK\n" {
		t.Fatalf("drain_listeners?graceful = %d %q", code, body)
	}
	end := start.Add(drain)
	c, err := dialTCP(topo.Services, ap(topo.PodV4, 8080), dialTimeout)
	if err != nil {
		t.Fatalf("new inbound connection in the graceful window: %v", err)
	}
	defer c.Close()
	fmt.Fprint(c, "GET /ok HTTP/1.1\r\nHost: app\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("request in the graceful window: %v", err)
	}
	if resp.StatusCode != 200 || !resp.Close {
		t.Errorf("request in the graceful window: %d close=%v, want 200 with Connection: close", resp.StatusCode, resp.Close)
	}
	checkHTTPDrain(t, cs, start, end, time.Second)
	if c, err := dialTCP(topo.Services, ap(topo.PodV4, 8080), dialTimeout); err == nil {
		c.Close()
		t.Error("a new inbound flow was accepted after the graceful drain")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("new inbound flow after the graceful drain: %v, want refused", err)
	}
}

// TestProxySIGTERMDrainsHTTP: SIGTERM with --termination-drain-duration 2s
// on a proxy serving inbound HTTP (HTTP/1.1 and h2c) whose app holds
// requests open: at once the idle keep-alive connection is closed and the
// h2c connection gets GOAWAY; the connections holding a request are closed
// at the end of the 2 s, and the process exits then (within ± 1 s).
func TestProxySIGTERMDrainsHTTP(t *testing.T) {
	requireRoot(t)
	const drain = 2 * time.Second
	topo := newTopology(t)
	arrived := holdingApp(t, topo)
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), httpInbound()}, istioClusters())
	px := startProxy(t, topo, "--bootstrap", bs, "--termination-drain-duration", drain.String())
	cs := openHTTPDrainConns(t, topo, arrived)

	start := time.Now()
	if err := px.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	end := start.Add(drain)
	checkHTTPDrain(t, cs, start, end, time.Second)
	select {
	case <-px.done:
	case <-time.After(time.Until(end.Add(time.Second))):
		t.Fatalf("the proxy still runs %v after SIGTERM with a %v termination drain", time.Since(start), drain)
	}
	took := time.Since(start)
	t.Logf("exited %v after SIGTERM", took.Round(time.Millisecond))
	if px.waitErr != nil || took < drain-time.Second {
		t.Errorf("exit %v after SIGTERM (%v), want status 0 within %v ± 1s", took, px.waitErr, drain)
	}
}
