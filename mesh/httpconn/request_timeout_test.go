package httpconn

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestRequestTimeout: request_timeout bounds how long the whole request
// may take to arrive (Envoy: 408 "request timeout",
// request_overall_timeout, downstream_rq_timeout); a request received in
// time is not cut by it however long the upstream then takes.
func TestRequestTimeout(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if r.URL.Path == "/slow" {
			time.Sleep(400 * time.Millisecond)
		}
		io.WriteString(w, "ok")
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	h := hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))
	h.RequestTimeout = durationpb.New(200 * time.Millisecond)
	cfg := mustParse(t, h)
	p := startProxy(t, cfg, env)

	// The body stalls half way: 408 once request_timeout passes.
	if code, body, el := stalledPOST(t, p.addr); code != http.StatusRequestTimeout || body != "request timeout" || el < 200*time.Millisecond || el > 2*time.Second {
		t.Fatalf("stalled body: %d %q after %v, want 408 \"request timeout\" after ~200ms", code, body, el)
	}
	e := p.waitEntries(t, 1)[0]
	if e.ResponseCodeDetails != "request_overall_timeout" || e.ResponseCode != 408 {
		t.Errorf("entry: %d %q, want 408 request_overall_timeout", e.ResponseCode, e.ResponseCodeDetails)
	}
	if v := cfg.Stats().DownstreamRqTimeout.Load(); v != 1 {
		t.Errorf("downstream_rq_timeout = %d, want 1", v)
	}

	// The whole body in time: the upstream may take longer than
	// request_timeout to answer.
	c := client(false)
	req, _ := http.NewRequest("POST", "http://"+p.addr+"/slow", strings.NewReader("0123456789"))
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "ok" {
		t.Errorf("complete request, slow upstream: %d %q, want 200", resp.StatusCode, body)
	}
	if v := cfg.Stats().DownstreamRqTimeout.Load(); v != 1 {
		t.Errorf("downstream_rq_timeout = %d after a request received in time, want 1", v)
	}
}
