//go:build linux

package integration

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
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// attackTarget is one HTTP service behind the sidecar for the attack
// tests: a server in the services namespace (GET /big streams 64 MiB,
// anything else answers "ok" after reading the body), Istio's outbound
// HTTP listener with the HCM fields given, a cluster with the fields
// given, and the proxy, ready.
type attackTarget struct {
	topo     *topology
	px       *proxyProc
	addr     string // VIP:80, captured from the pod
	requests atomic.Int64
	accepts  atomic.Int64
}

const attackCluster = "outbound|80||victim.default.svc.cluster.local"

func startAttackTarget(t *testing.T, hcmFields, clusterFields obj) *attackTarget {
	t.Helper()
	requireRoot(t)
	a := &attackTarget{topo: newTopology(t)}
	topo := a.topo
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	ln, err := listenTCP(topo.Services, ap(topo.SvcV4, 9090))
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("x"), 64<<10)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.requests.Add(1)
		if r.URL.Path == "/big" {
			for i := 0; i < 1024; i++ {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
			return
		}
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	})}
	go srv.Serve(countingLn{ln, &a.accepts})
	t.Cleanup(func() { srv.Close() })

	victim := vip(topo, false, 91)
	route := obj{"name": "80", "validate_clusters": false, "virtual_hosts": []obj{
		{"name": "victim", "domains": []string{"*"}, "routes": []obj{routeTo("/", obj{"cluster": attackCluster})}},
	}}
	l := istioHTTPListener(80)
	tc := l["filter_chains"].([]obj)[0]["filters"].([]obj)[0]["typed_config"].(obj)
	for k, v := range hcmFields {
		tc[k] = v
	}
	c := edsCluster(attackCluster)
	for k, v := range clusterFields {
		c[k] = v
	}
	cp.pushHTTP(t, "1", []obj{virtualOutbound("BlackHoleCluster"), virtualInbound(), l},
		append(istioClusters(), c), map[string][]netip.AddrPort{attackCluster: {netip.AddrPortFrom(topo.SvcV4, 9090)}}, []obj{route})
	a.px = startHTTPProxy(t, topo)
	a.addr = ap(victim, 80)
	cl := podClient(topo, false, 1)
	defer cl.CloseIdleConnections()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := cl.Get("http://" + a.addr + "/")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 && string(b) == "ok" {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the victim service was never routed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return a
}

func (a *attackTarget) dial(t *testing.T) net.Conn {
	t.Helper()
	c, err := dialTCP(a.topo.Pod, a.addr, dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return c
}

func (a *attackTarget) stat(t *testing.T, name string) uint64 {
	t.Helper()
	return statValue(t, a.topo, "http.outbound_0.0.0.0_80."+name)
}

// waitStat polls a connection-manager stat until ok(value) (10 s at most).
func (a *attackTarget) waitStat(t *testing.T, name string, ok func(uint64) bool) uint64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		v := a.stat(t, name)
		if ok(v) || time.Now().After(deadline) {
			return v
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// h2Attacker is a raw h2c client connection for flood tests.
type h2Attacker struct {
	c    net.Conn
	fr   *http2.Framer
	hbuf bytes.Buffer
	enc  *hpack.Encoder
	max  uint32 // the server's SETTINGS_MAX_CONCURRENT_STREAMS
}

func (a *attackTarget) h2(t *testing.T, settings ...http2.Setting) *h2Attacker {
	t.Helper()
	c := a.dial(t)
	io.WriteString(c, http2.ClientPreface)
	h := &h2Attacker{c: c, fr: http2.NewFramer(c, c)}
	h.enc = hpack.NewEncoder(&h.hbuf)
	h.fr.WriteSettings(settings...)
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			t.Fatalf("h2c: no SETTINGS: %v", err)
		}
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
			h.max, _ = sf.Value(http2.SettingMaxConcurrentStreams)
			h.fr.WriteSettingsAck()
			return h
		}
	}
}

func (h *h2Attacker) get(id uint32, path string) error {
	h.hbuf.Reset()
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "victim"}, {":path", path}} {
		h.enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	return h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.hbuf.Bytes(), EndStream: true, EndHeaders: true})
}

// TestHTTPAttackH2StreamFlood is issue #15 defect 1 on the wire, through
// capture: an h2c client with a zero flow-control window opening 3,000
// streams gets at most the advertised 1,024 (the rest refused), and
// every one it holds is reset once stream_idle_timeout (1 s) passes, so
// the proxy's active requests fall back to 0; a rapid-reset flood (CVE-
// 2023-44487: 20,000 HEADERS each followed by RST_STREAM) draws a GOAWAY
// (downstream_rq_too_many_premature_resets) and dials a bounded number of
// upstream connections. Before: 2^20 streams advertised, every stream
// held past its idle timeout, no GOAWAY and 2,436 upstream dials.
func TestHTTPAttackH2StreamFlood(t *testing.T) {
	a := startAttackTarget(t, obj{"stream_idle_timeout": "1s"}, nil)

	h := a.h2(t, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	if h.max != 1024 {
		t.Errorf("SETTINGS_MAX_CONCURRENT_STREAMS = %d, want 1024", h.max)
	}
	const streams = 3000
	go func() {
		for i := uint32(0); i < streams; i++ {
			if h.get(2*i+1, "/big") != nil {
				return
			}
		}
	}()
	resets := map[http2.ErrCode]int{}
	for total := 0; total < streams; {
		f, err := h.fr.ReadFrame()
		if err != nil {
			t.Fatalf("after %d resets %v: %v (downstream_rq_active %d)", total, resets, err, a.stat(t, "downstream_rq_active"))
		}
		if rst, ok := f.(*http2.RSTStreamFrame); ok {
			resets[rst.ErrCode]++
			total++
		}
	}
	// Streams over the 1,024 open are refused; as held ones are reset
	// (their idle timeout), later ones take their places.
	if resets[http2.ErrCodeRefusedStream]+resets[http2.ErrCodeProtocol] == 0 || resets[http2.ErrCodeInternal] < 1024 {
		t.Errorf("resets %v: want streams beyond 1,024 refused and at least 1,024 held ones reset", resets)
	}
	t.Logf("3,000 streams at window 0: resets %v", resets)
	if v := a.waitStat(t, "downstream_rq_active", func(v uint64) bool { return v == 0 }); v != 0 {
		t.Errorf("downstream_rq_active = %d after every stream was reset, want 0", v)
	}
	if v := a.stat(t, "downstream_rq_idle_timeout"); v < 1000 {
		t.Errorf("downstream_rq_idle_timeout = %d, want the ~1,024 held streams", v)
	}

	acceptsBefore := a.accepts.Load()
	r := a.h2(t)
	const rapid = 20000
	go func() {
		for i := uint32(0); i < rapid; i++ {
			id := 2*i + 1
			if r.get(id, "/") != nil || r.fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				return
			}
		}
	}()
	goAway := false
	for {
		f, err := r.fr.ReadFrame()
		if err != nil {
			break
		}
		if _, ok := f.(*http2.GoAwayFrame); ok {
			goAway = true
		}
	}
	if !goAway {
		t.Error("rapid reset: no GOAWAY before the connection closed")
	}
	if v := a.stat(t, "downstream_rq_too_many_premature_resets"); v != 1 {
		t.Errorf("downstream_rq_too_many_premature_resets = %d, want 1", v)
	}
	if n := a.accepts.Load() - acceptsBefore; n > 1024 {
		t.Errorf("rapid reset dialled %d upstream connections", n)
	}
}

// TestHTTPAttackSlowReader is defect 2 through capture: with
// max_requests 2, two clients that request 64 MiB and read nothing hold
// their upstream requests only until stream_idle_timeout (1 s); a third
// client is then served. Before, it got 503 UO for as long as the slow
// readers stayed.
func TestHTTPAttackSlowReader(t *testing.T) {
	a := startAttackTarget(t, obj{"stream_idle_timeout": "1s"},
		obj{"circuit_breakers": obj{"thresholds": []obj{{"max_requests": 2}}}})
	for i := 0; i < 2; i++ {
		c := a.dial(t)
		io.WriteString(c, "GET /big HTTP/1.1\r\nHost: victim\r\n\r\n")
	}
	if v := a.waitStat(t, "downstream_rq_idle_timeout", func(v uint64) bool { return v >= 2 }); v != 2 {
		t.Fatalf("downstream_rq_idle_timeout = %d, want the 2 slow readers ended", v)
	}
	c := podClient(a.topo, false, 1)
	defer c.CloseIdleConnections()
	if code, body := get1(t, c, "http://"+a.addr+"/", "victim"); code != 200 || body != "ok" {
		t.Errorf("third client: %d %q, want 200 \"ok\"", code, body)
	}
	if e, ok := a.px.waitAccess(func(e AccessEntry) bool { return strings.Contains(e.ResponseFlags, "SI") }, 5*time.Second); !ok {
		t.Error("no access log entry with flag SI")
	} else {
		t.Logf("slow reader: %s", e.Raw)
	}
}

// TestHTTPAttackSlowloris is defect 5 through capture: a client sending
// its request head one byte every 250 ms gets 408 "stream timeout" once
// stream_idle_timeout (500 ms) passes, and the connection closes; with
// request_headers_timeout shorter, its own 408. Before, it held the
// connection as long as it kept sending.
func TestHTTPAttackSlowloris(t *testing.T) {
	a := startAttackTarget(t, obj{"stream_idle_timeout": "0.500s"}, nil)
	c := a.dial(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		head := "GET / HTTP/1.1\r\nHost: victim\r\nX-Slow: " + strings.Repeat("a", 100) + "\r\n\r\n"
		for i := 0; i < len(head) && ctx.Err() == nil; i++ {
			if _, err := c.Write([]byte{head[i]}); err != nil {
				return
			}
			time.Sleep(250 * time.Millisecond)
		}
	}()
	start := time.Now()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("slowloris: no response after %v: %v", time.Since(start), err)
	}
	b, _ := io.ReadAll(resp.Body)
	el := time.Since(start)
	if resp.StatusCode != http.StatusRequestTimeout || string(b) != "stream timeout" || el > 3*time.Second {
		t.Errorf("slowloris: %d %q after %v, want 408 \"stream timeout\" after ~500 ms", resp.StatusCode, b, el)
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || isTimeoutErr(err) {
		t.Errorf("slowloris connection not closed after the 408: %v", err)
	}
	if v := a.stat(t, "downstream_rq_idle_timeout"); v != 1 {
		t.Errorf("downstream_rq_idle_timeout = %d, want 1", v)
	}
}

func isTimeoutErr(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// TestHTTPAttackCLTE is defect 6 through capture: a request with both
// Content-Length and Transfer-Encoding, with a second request pipelined
// behind it, gets 400 and the connection closes; neither reaches the
// upstream. Before, both were served.
func TestHTTPAttackCLTE(t *testing.T) {
	a := startAttackTarget(t, nil, nil)
	before := a.requests.Load()
	c := a.dial(t)
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: victim\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"+
		"GET /smuggled HTTP/1.1\r\nHost: victim\r\n\r\n")
	br := bufio.NewReader(c)
	var codes []int
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			if isTimeoutErr(err) {
				t.Error("connection left open")
			}
			break
		}
		io.Copy(io.Discard, resp.Body)
		codes = append(codes, resp.StatusCode)
	}
	if fmt.Sprint(codes) != "[400]" {
		t.Errorf("responses %v, want [400] and the connection closed", codes)
	}
	if n := a.requests.Load() - before; n != 0 {
		t.Errorf("upstream saw %d requests, want none", n)
	}
}
