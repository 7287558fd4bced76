package proxy

import (
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestAdminAnswersWhileApplying: /stats and /ready answer while an update
// of 10,000 istiod-shaped services (EDS cluster, assignment, VIP listener)
// is being applied: they read atomics and immutable values, never the lock
// updates hold for a whole build. Each answer comes back while the update
// still holds that lock, and all of them before it is in force, which the
// test checks; an admin that waited for the lock would answer only after.
// (Latencies are logged, not asserted: speed is for benchmarks.)
func TestAdminAnswersWhileApplying(t *testing.T) {
	const n = 10000
	srv := xdstest.NewServer(t)
	srv.Set(t, "node", services(t, 1))
	p, _, _ := startServing(t, srv, "node", "GRPC")
	big := services(t, n)
	last := "10.96.39.250_8080" // service n-1's listener
	if l := big["type.googleapis.com/envoy.config.listener.v3.Listener"]; len(l) != n {
		t.Fatalf("%d listeners built, want %d", len(l), n)
	}

	srv.Set(t, "node", big)
	xdstest.Eventually(t, time.Minute, "the 10,000-service update being applied", func() bool {
		if p.src.applyMu.TryLock() {
			p.src.applyMu.Unlock()
			return false
		}
		return true
	})
	// The admin handler is called in process: what is measured is the
	// handler's wait and work, not the loopback's goroutine hand-offs on a
	// machine the update keeps busy.
	h := p.adminHTTP.Handler
	var statsTimes, readyTimes []time.Duration
	held := func() bool {
		if p.src.applyMu.TryLock() {
			p.src.applyMu.Unlock()
			return false
		}
		return true
	}
	for i := range 20 {
		start := time.Now()
		code, body := serve(h, "/stats")
		statsTimes = append(statsTimes, time.Since(start))
		if code != 200 || len(body) == 0 {
			t.Fatalf("/stats: %d %q", code, body)
		}
		start = time.Now()
		code, body = serve(h, "/ready")
		readyTimes = append(readyTimes, time.Since(start))
		if code != 200 || body != "LIVE\n" {
			t.Fatalf("/ready: %d %q while an update applies, want 200 LIVE", code, body)
		}
		if !held() {
			t.Fatalf("request %d answered only after the update released its lock: the admin waited for it", i+1)
		}
	}
	inForce := p.dispatcher.Snapshot().Listener(last) != nil
	for _, m := range []struct {
		path  string
		times []time.Duration
	}{{"/stats", statsTimes}, {"/ready", readyTimes}} {
		slices.Sort(m.times)
		t.Logf("%s while the update applied: median %v, max %v", m.path, m.times[len(m.times)/2], m.times[len(m.times)-1])
	}
	if inForce {
		t.Error("the update was in force before the 20 requests ended: they did not overlap it")
	}
	// The update does complete.
	xdstest.Eventually(t, 5*time.Minute, "the 10,000-service update in force", func() bool {
		return p.dispatcher.Snapshot().Listener(last) != nil
	})
}

// serve calls h for GET path and returns the status and body.
func serve(h http.Handler, path string) (int, string) {
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, path, nil)
	req.Host = "127.0.0.1:15000" // the admin answers loopback names only
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}
