package proxy

import (
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestAdminAnswersWhileApplying: /stats and /ready answer within 100 ms
// (p99 of 20 requests each) while an update of 10,000 istiod-shaped
// services (EDS cluster, assignment, VIP listener) is being applied: they
// read atomics and immutable values, never the lock updates hold for a
// whole build. The requests are made while the update holds that lock and
// before it is in force, which the test checks.
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
	for range 20 {
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
	}
	inForce := p.dispatcher.Snapshot().Listener(last) != nil
	for _, m := range []struct {
		path  string
		times []time.Duration
	}{{"/stats", statsTimes}, {"/ready", readyTimes}} {
		slices.Sort(m.times)
		if p99 := m.times[(len(m.times)*99+99)/100-1]; p99 >= 100*time.Millisecond {
			t.Errorf("%s p99 %v while the update applied, want < 100ms (all: %v)", m.path, p99, m.times)
		}
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
