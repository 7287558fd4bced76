package httpconn

import (
	"io"
	"net/http"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestStreamIdleTimeoutStalledBody: a client that sends the headers and
// part of the body, then goes silent, gets Envoy's 408 "stream timeout"
// (flag SI, downstream_rq_idle_timeout) once stream_idle_timeout passes,
// over HTTP/1.1 and h2c, although the router is blocked reading the body
// while it streams it upstream.
func TestStreamIdleTimeoutStalledBody(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	h := hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))
	h.StreamIdleTimeout = durationpb.New(200 * time.Millisecond)
	cfg := mustParse(t, h)
	p := startProxy(t, cfg, env)

	check := func(proto string, code int, body string, el time.Duration, n int) {
		t.Helper()
		if code != http.StatusRequestTimeout || body != "stream timeout" || el < 200*time.Millisecond || el > 2*time.Second {
			t.Errorf("%s: %d %q after %v, want 408 \"stream timeout\" after ~200ms", proto, code, body, el)
		}
		e := p.waitEntries(t, n)[n-1]
		if e.ResponseCode != 408 || e.ResponseCodeDetails != "stream_idle_timeout" || !e.ResponseFlags.Has(FlagSI) {
			t.Errorf("%s: entry %d %q %s, want 408 stream_idle_timeout SI", proto, e.ResponseCode, e.ResponseCodeDetails, e.ResponseFlags)
		}
		if v := cfg.Stats().DownstreamRqIdle.Load(); v != uint64(n) {
			t.Errorf("%s: downstream_rq_idle_timeout = %d, want %d", proto, v, n)
		}
	}

	// HTTP/1.1: 5 of 10 body bytes, then silence.
	code, b, el := stalledPOST(t, p.addr)
	check("h1", code, b, el, 1)

	// h2c: the same over a stream whose body pipe stalls.
	pr, pw := io.Pipe()
	defer pw.Close()
	req, _ := http.NewRequest("POST", "http://"+p.addr+"/up", pr)
	req.ContentLength = 10
	go pw.Write([]byte("hello"))
	start := time.Now()
	resp, err := client(true).Do(req)
	if err != nil {
		t.Fatalf("h2c: %v after %v", err, time.Since(start))
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	check("h2c", resp.StatusCode, string(body), time.Since(start), 2)
}
