package httpconn

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// h2Raw is a raw h2c client connection: the preface and our SETTINGS
// are sent, the server's SETTINGS read.
type h2Raw struct {
	c        net.Conn
	fr       *http2.Framer
	settings map[http2.SettingID]uint32
	hbuf     bytes.Buffer
	enc      *hpack.Encoder
}

func dialH2Raw(t testing.TB, addr string, settings ...http2.Setting) *h2Raw {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, http2.ClientPreface)
	h := &h2Raw{c: c, fr: http2.NewFramer(c, c), settings: map[http2.SettingID]uint32{}}
	h.enc = hpack.NewEncoder(&h.hbuf)
	if err := h.fr.WriteSettings(settings...); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading the server's SETTINGS: %v", err)
		}
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
			sf.ForeachSetting(func(s http2.Setting) error { h.settings[s.ID] = s.Val; return nil })
			h.fr.WriteSettingsAck()
			return h
		}
	}
}

// headers opens stream id with a GET of path.
func (h *h2Raw) headers(t testing.TB, id uint32, path string) {
	h.hbuf.Reset()
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "x"}, {":path", path}} {
		h.enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.hbuf.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
		t.Fatalf("HEADERS %d: %v", id, err)
	}
}

// TestH2ProtocolOptions: the downstream HTTP/2 SETTINGS carry
// http2_protocol_options' max_concurrent_streams and
// initial_stream_window_size, and a bounded default (1024) when unset,
// where meshtun advertised 2^20 streams before.
func TestH2ProtocolOptions(t *testing.T) {
	env := newEnv(t)
	rc := routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c")))
	p := startProxy(t, mustParse(t, hcm(rc)), env)
	h := dialH2Raw(t, p.addr)
	if v := h.settings[http2.SettingMaxConcurrentStreams]; v != DefaultMaxConcurrentStreams {
		t.Errorf("default SETTINGS_MAX_CONCURRENT_STREAMS = %d, want %d", v, DefaultMaxConcurrentStreams)
	}

	cfg := hcm(rc)
	cfg.Http2ProtocolOptions = &corev3.Http2ProtocolOptions{
		MaxConcurrentStreams:        wrapperspb.UInt32(7),
		InitialStreamWindowSize:     wrapperspb.UInt32(70000),
		InitialConnectionWindowSize: wrapperspb.UInt32(1 << 21),
	}
	p2 := startProxy(t, mustParse(t, cfg), env)
	h2 := dialH2Raw(t, p2.addr)
	if v := h2.settings[http2.SettingMaxConcurrentStreams]; v != 7 {
		t.Errorf("SETTINGS_MAX_CONCURRENT_STREAMS = %d, want 7", v)
	}
	if v := h2.settings[http2.SettingInitialWindowSize]; v != 70000 {
		t.Errorf("SETTINGS_INITIAL_WINDOW_SIZE = %d, want 70000", v)
	}

	cfg.Http2ProtocolOptions.MaxConcurrentStreams = wrapperspb.UInt32(0)
	if _, err := ParseHCM(cfg); err == nil || !strings.Contains(err.Error(), "MaxConcurrentStreams") {
		t.Errorf("max_concurrent_streams 0: err %v, want a validation error naming it", err)
	}
}

// TestH2RapidResetGoAway: a client that opens streams and resets each
// at once (CVE-2023-44487) gets a GOAWAY once half of its streams were
// reset prematurely (Envoy's premature-reset detection), the connection
// ends, downstream_rq_too_many_premature_resets counts it, and the
// upstream saw a bounded share of the requests. Before, 20,000 such
// streams drew no GOAWAY and dialled thousands of upstream connections.
func TestH2RapidResetGoAway(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(20 * time.Millisecond)
		io.WriteString(w, "ok")
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	cfg := mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c")))))
	p := startProxy(t, cfg, env)
	h := dialH2Raw(t, p.addr)
	const streams = 5000
	go func() {
		for i := uint32(0); i < streams; i++ {
			id := 2*i + 1
			h.headers(t, id, "/")
			if h.fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				return
			}
		}
	}()
	gotGoAway := false
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			break // the connection closed
		}
		if _, ok := f.(*http2.GoAwayFrame); ok {
			gotGoAway = true
		}
	}
	if !gotGoAway {
		t.Error("no GOAWAY before the connection closed")
	}
	if v := cfg.Stats().PrematureResets.Load(); v != 1 {
		t.Errorf("downstream_rq_too_many_premature_resets = %d, want 1", v)
	}
	if n := u.requests.Load(); n > prematureResetTotal {
		t.Errorf("upstream saw %d requests of %d reset streams, want at most %d", n, streams, prematureResetTotal)
	}
	if n := u.accepts.Load(); n > 2*DefaultMaxConcurrentStreams {
		t.Errorf("upstream accepted %d connections", n)
	}
}

// TestSlowReaderIdleTimeout: clients that never read their response
// hold the proxy's write (HTTP/1.1: the socket; h2c: a zero flow-control
// window) only until stream_idle_timeout: the stream is then ended (SI),
// its upstream request slot freed, so with max_requests 2 a third client
// is served. Before, the relay blocked in Write for ever and every later
// client got 503 UO.
func TestSlowReaderIdleTimeout(t *testing.T) {
	chunk := strings.Repeat("x", 64<<10)
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/small" {
			io.WriteString(w, "ok")
			return
		}
		for i := 0; i < 1024; i++ { // 64 MiB: more than the sockets buffer
			if _, err := io.WriteString(w, chunk); err != nil {
				return
			}
		}
	})
	pb := xdstest.StaticCluster("c", u.addr)
	pb.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{MaxRequests: wrapperspb.UInt32(2)}}}
	env := newEnv(t, pb)
	h := hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))
	h.StreamIdleTimeout = durationpb.New(300 * time.Millisecond)
	cfg := mustParse(t, h)
	p := startProxy(t, cfg, env)

	// Slow reader 1: HTTP/1.1, reads nothing.
	c1, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	io.WriteString(c1, "GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
	// Slow reader 2: h2c with a zero stream window.
	h2 := dialH2Raw(t, p.addr, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	h2.headers(t, 1, "/big")

	// Both end within a few idle timeouts: h1 closed, h2 reset.
	h2ended := make(chan error, 1)
	go func() {
		for {
			f, err := h2.fr.ReadFrame()
			if err != nil {
				h2ended <- err
				return
			}
			if rst, ok := f.(*http2.RSTStreamFrame); ok && rst.StreamID == 1 {
				h2ended <- nil
				return
			}
		}
	}()
	start := time.Now()
	select {
	case err := <-h2ended:
		if err != nil {
			t.Errorf("h2c slow reader: connection ended (%v), want the stream reset", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("h2c slow reader: stream not reset 5 s after it stalled (stream_idle_timeout 300ms)")
	}
	// The h1 client reads nothing until its stream was ended: reading
	// would be progress.
	for deadline := time.Now().Add(5 * time.Second); cfg.Stats().DownstreamRqIdle.Load() < 2; {
		if time.Now().After(deadline) {
			t.Fatalf("downstream_rq_idle_timeout = %d 5 s after the stall, want 2 (h1 slow reader not ended)", cfg.Stats().DownstreamRqIdle.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("slow readers ended after %v", time.Since(start))
	// The h1 connection is closed by the proxy (its response cut short);
	// the h2c one stays, its stream reset.
	for deadline := time.Now().Add(5 * time.Second); cfg.Stats().DownstreamCxActive.Load() != 1; {
		if time.Now().After(deadline) {
			t.Fatalf("downstream_cx_active = %d, want 1 (the h1 slow reader's connection closed)", cfg.Stats().DownstreamCxActive.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, e := range p.waitEntries(t, 2) {
		if !e.ResponseFlags.Has(FlagSI) {
			t.Errorf("entry %s %q, want SI", e.ResponseFlags, e.ResponseCodeDetails)
		}
	}
	if resp, body := get(t, client(false), p, "x", "/small"); resp.StatusCode != 200 || body != "ok" {
		t.Errorf("third client: %d %q, want 200 (the slow readers' slots freed)", resp.StatusCode, body)
	}
}
