//go:build scale

package proxy

import (
	"os"
	"runtime"
	"runtime/pprof"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestApplyServicesHeap pushes 10,000 istiod-shaped services (VIP
// listener, EDS cluster, 3-endpoint assignment) through the real xDS
// server into a whole proxy and reports the heap the proxy keeps once the
// update is in force: what integration TestXDSScale sees as RSS, here with
// a heap profile of it (MESHTUN_HEAP_PROFILE=file) to find where it goes.
// A measurement (go test -tags scale -run TestApplyServicesHeap -v
// ./proxy/), not a speed test: it checks that the update is in force.
func TestApplyServicesHeap(t *testing.T) {
	const n = 10000
	srv := xdstest.NewServer(t)
	srv.Set(t, "node", services(t, 1))
	p, _, _ := startServing(t, srv, "node", "GRPC")
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	big := services(t, n)
	last := "10.96.39.250_8080" // service n-1's listener
	start := time.Now()
	srv.Set(t, "node", big)
	xdstest.Eventually(t, 5*time.Minute, "the 10,000-service update in force", func() bool {
		return p.dispatcher.Snapshot().Listener(last) != nil
	})
	took := time.Since(start)
	// The control plane's copy of the resources is the test's, not the
	// proxy's: dropping the references lets GC free what only they hold
	// (the xDS server's cache keeps its own).
	big = nil
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	t.Logf("%d services in force %v after the push; heap in use %.1f MB before, %.1f MB after (%.1f kB per service); Sys %.1f MB",
		n, took.Round(time.Millisecond), float64(before.HeapInuse)/(1<<20), float64(after.HeapInuse)/(1<<20),
		float64(after.HeapInuse-before.HeapInuse)/1024/n, float64(after.Sys)/(1<<20))
	if f := os.Getenv("MESHTUN_HEAP_PROFILE"); f != "" {
		w, err := os.Create(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.WriteHeapProfile(w); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if p.dispatcher.Snapshot().Listener(last) == nil {
		t.Fatal("the update is no longer in force")
	}
}
