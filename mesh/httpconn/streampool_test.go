package httpconn

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/cluster"
	"google.golang.org/protobuf/types/known/durationpb"
)

// TestStreamReleaseResets: a released stream keeps only its reusable
// parts (streamReuse), and those hold nothing of the request.
func TestStreamReleaseResets(t *testing.T) {
	for _, withBody := range []bool{false, true} {
		s := new(stream)
		r := httptest.NewRequest("POST", "/secret?q=1", strings.NewReader("body"))
		h := &connHandler{cfg: &Config{stats: new(Stats)}}
		s.init(h, r.Context(), httptest.NewRecorder(), r)
		s.ctx, s.cancel = context.WithCancelCause(context.Background())
		s.idle.reset(s.cancel)
		s.idle.arm(time.Hour)
		s.e.RequestID, s.e.UserAgent, s.e.ResponseCode, s.e.Attempts = "rid", "ua", 200, 2
		s.wroteHeader, s.aborted = true, true
		s.reqTimer = time.NewTimer(time.Hour)
		s.reqTimer.Stop()
		if withBody {
			s.body = &countingBody{rc: r.Body, idle: s.idle}
		}
		s.tried = append(s.tried, new(cluster.Host), new(cluster.Host))
		s.h1s = new(h1Scratch)
		s.h1s.url = url.URL{Host: "10.0.0.1:80", Path: "/secret"}
		s.h1s.req = http.Request{Method: "POST", URL: &s.h1s.url, Header: http.Header{"X-Secret": {"1"}}}
		s.h1s.body = h1Body{keep: true, done: true}
		s.rto = new(deadlineTimer)
		s.rto.startCause(time.Hour, s.cancel, errRouteTimeout)
		s.rto.stop()
		idle, rto, h1s := s.idle, s.rto, s.h1s
		s.idle.stop()

		s.release()

		v := reflect.ValueOf(s).Elem()
		for i := 0; i < v.NumField(); i++ {
			if f := v.Type().Field(i); f.Name != "streamReuse" && !v.Field(i).IsZero() {
				t.Errorf("withBody=%v: released stream keeps %s", withBody, f.Name)
			}
		}
		if withBody {
			if s.idle != nil {
				t.Error("idle watch of a request with a body is reused (its body may still touch it)")
			}
		} else if s.idle != idle {
			t.Error("idle watch not kept")
		}
		if s.rto != rto || s.h1s != h1s {
			t.Error("timer or h1 scratch not kept")
		}
		if !reflect.ValueOf(s.h1s.req).IsZero() || !reflect.ValueOf(s.h1s.url).IsZero() || !reflect.ValueOf(s.h1s.body).IsZero() {
			t.Error("h1 scratch request, URL or body not reset")
		}
		if len(s.tried) != 0 || s.tried[:cap(s.tried)][0] != nil || s.tried[:cap(s.tried)][1] != nil {
			t.Error("tried hosts not cleared")
		}
		streamPool.Get() // not for other tests
	}
}

// TestPooledStreamNoLeak: requests on a keep-alive connection (pooled
// streams, reused upstream request) never see the headers, body, path,
// timeouts or log fields of the one before.
func TestPooledStreamNoLeak(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if d, err := time.ParseDuration(r.Header.Get("X-Sleep")); err == nil {
			time.Sleep(d)
		}
		b, _ := io.ReadAll(r.Body)
		var keys []string
		for k := range r.Header {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		fmt.Fprintf(w, "%s %s cl=%d te=%v body=%q keys=%v rid=%s", r.Method, r.RequestURI, r.ContentLength, r.TransferEncoding, b, keys, r.Header.Get("X-Request-Id"))
	})
	for _, h2 := range []bool{false, true} {
		pb := xdstest.StaticCluster("c", u.addr)
		if h2 {
			pb = withH2(pb)
		}
		env := newEnv(t, pb)
		rt := prefixRoute("/t", "c")
		// 400 ms leaves a 20 ms request room on a loaded 2-core CI machine.
		routeAction(rt).Timeout = durationpb.New(400 * time.Millisecond)
		p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, rt, prefixRoute("/", "c"))))), env)
		c := client(h2)
		for i := 0; i < 30; i++ {
			// With a body, headers, a request ID and a user agent.
			req, _ := http.NewRequest("POST", "http://"+p.addr+"/a/secret", strings.NewReader("secret-body"))
			req.Header.Set("X-Secret", "s3cret")
			req.Header.Set("X-Request-Id", "rid-1")
			req.Header.Set("User-Agent", "ua-1")
			p.sent.Add(1)
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if !strings.Contains(string(b), `body="secret-body"`) || !strings.Contains(string(b), "X-Secret") {
				t.Fatalf("h2=%v first request: %s", h2, b)
			}
			if e := p.lastEntry(t); e.BytesReceived != 11 || e.RequestID != "rid-1" {
				t.Fatalf("h2=%v first entry: %+v", h2, e)
			}

			// Then a bare GET: nothing of the first may show.
			req, _ = http.NewRequest("GET", "http://"+p.addr+"/b", nil)
			req.Header["User-Agent"] = nil
			p.sent.Add(1)
			resp, err = c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
			got := string(b)
			if !strings.HasPrefix(got, "GET /b cl=0 te=[] body=\"\"") || strings.Contains(got, "X-Secret") || strings.Contains(got, "rid-1") || strings.Contains(got, "secret") {
				t.Fatalf("h2=%v second request leaks: %s", h2, got)
			}
			e := p.lastEntry(t)
			if e.Path != "/b" || e.Method != "GET" || e.UserAgent != "" || e.RequestID == "rid-1" || e.BytesReceived != 0 ||
				e.Attempts != 1 || e.ResponseFlags != 0 || e.ResponseCode != 200 || e.ResponseCodeDetails != "via_upstream" {
				t.Fatalf("h2=%v second entry leaks: %+v", h2, e)
			}

			// The reused route timer: a request within the timeout
			// passes after one that timed out, and one past it fails.
			if i%10 == 0 {
				if resp, _ := get(t, c, p, "x", "/t", hdr("X-Sleep", "900ms")); resp.StatusCode != 504 {
					t.Fatalf("h2=%v slow: %d, want 504", h2, resp.StatusCode)
				}
			}
			if resp, _ := get(t, c, p, "x", "/t", hdr("X-Sleep", "20ms")); resp.StatusCode != 200 {
				t.Fatalf("h2=%v within timeout: %d (flags %s)", h2, resp.StatusCode, p.lastEntry(t).ResponseFlags)
			}
		}
	}
}
