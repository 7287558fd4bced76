package httpconn

import (
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestCircuitBreakerMaxConnectionsPending: with max_connections reached,
// an HTTP/1.1 request waits as pending (max_pending_requests) for the
// next connection released to the pool, as in Envoy, instead of failing:
// with max_connections 1 and max_pending_requests 5, three concurrent
// requests to a slow upstream all succeed over one connection; with
// max_pending_requests 1 the third overflows (503 UO,
// upstream_rq_pending_overflow).
func TestCircuitBreakerMaxConnectionsPending(t *testing.T) {
	for _, tc := range []struct {
		maxPending uint32
		want200    int
	}{{5, 3}, {1, 2}} {
		arrived := make(chan struct{}, 8)
		u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
			arrived <- struct{}{}
			time.Sleep(150 * time.Millisecond)
			io.WriteString(w, "ok")
		})
		pb := xdstest.StaticCluster("c", u.addr)
		pb.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{
			MaxConnections:     wrapperspb.UInt32(1),
			MaxPendingRequests: wrapperspb.UInt32(tc.maxPending),
		}}}
		env := newEnv(t, pb)
		p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
		cl := env.clusters["c"]

		var wg sync.WaitGroup
		var mu sync.Mutex
		codes := map[int]int{}
		run := func() {
			defer wg.Done()
			resp, err := client(false).Get("http://" + p.addr + "/")
			if err != nil {
				t.Error(err)
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 503 && (!contains(string(b), "overflow") || resp.Header.Get("Content-Type") != "text/plain") {
				t.Errorf("503 %q, want overflow", b)
			}
			mu.Lock()
			codes[resp.StatusCode]++
			mu.Unlock()
		}
		// The first request holds the only connection; then two more.
		wg.Add(1)
		go run()
		select {
		case <-arrived:
		case <-time.After(5 * time.Second):
			t.Fatal("first request did not arrive")
		}
		wg.Add(2)
		go run()
		time.Sleep(20 * time.Millisecond) // the second is pending first
		go run()
		wg.Wait()

		if codes[200] != tc.want200 || codes[503] != 3-tc.want200 {
			t.Errorf("max_pending_requests %d: statuses %v, want %d× 200", tc.maxPending, codes, tc.want200)
		}
		if n := u.accepts.Load(); n != 1 {
			t.Errorf("max_pending_requests %d: %d upstream connections, want 1", tc.maxPending, n)
		}
		if v := clusterStat(t, cl, "upstream_rq_pending_overflow"); v != uint64(3-tc.want200) {
			t.Errorf("max_pending_requests %d: upstream_rq_pending_overflow = %d, want %d", tc.maxPending, v, 3-tc.want200)
		}
		if v := clusterStat(t, cl, "upstream_cx_overflow"); v == 0 {
			t.Errorf("max_pending_requests %d: upstream_cx_overflow = 0, want counted", tc.maxPending)
		}
		es := p.waitEntries(t, 3)
		uo := 0
		for _, e := range es {
			if e.ResponseFlags.Has(FlagUO) {
				uo++
			}
		}
		if uo != 3-tc.want200 {
			t.Errorf("max_pending_requests %d: %d UO entries, want %d", tc.maxPending, uo, 3-tc.want200)
		}
		xdstest.Eventually(t, 2*time.Second, "pending released", func() bool { return clusterStat(t, cl, "upstream_rq_pending_active") == 0 })
	}
}

// TestMaxConnectionsPendingRouteTimeout: a request waiting for a
// connection at max_connections is bounded by the route timeout (504 UT)
// and leaves the pending queue.
func TestMaxConnectionsPendingRouteTimeout(t *testing.T) {
	arrived := make(chan struct{}, 2)
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		time.Sleep(400 * time.Millisecond)
		io.WriteString(w, "ok")
	})
	pb := xdstest.StaticCluster("c", u.addr)
	pb.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{MaxConnections: wrapperspb.UInt32(1)}}}
	env := newEnv(t, pb)
	route := prefixRoute("/", "c")
	routeAction(route).Timeout = durationpb.New(100 * time.Millisecond)
	long := prefixRoute("/long", "c") // the first request: no timeout
	routeAction(long).Timeout = durationpb.New(0)
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, long, route)))), env)
	cl := env.clusters["c"]

	first := make(chan int, 1)
	go func() {
		resp, err := client(false).Get("http://" + p.addr + "/long")
		if err != nil {
			first <- -1
			return
		}
		resp.Body.Close()
		first <- resp.StatusCode
	}()
	<-arrived
	start := time.Now()
	resp, body := get(t, client(false), p, "x", "/")
	if el := time.Since(start); resp.StatusCode != 504 || body != "upstream request timeout" || el > 300*time.Millisecond {
		t.Errorf("waiting request: %d %q after %v, want 504 after ~100ms", resp.StatusCode, body, el)
	}
	if v := clusterStat(t, cl, "upstream_rq_pending_active"); v != 0 {
		t.Errorf("upstream_rq_pending_active = %d after the timeout", v)
	}
	if code := <-first; code != 200 {
		t.Errorf("first request: %d, want 200", code)
	}
	if n := u.requests.Load(); n != 1 {
		t.Errorf("upstream saw %d requests, want 1", n)
	}
}
