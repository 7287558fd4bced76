//go:build bench

package httpconn

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// memNow is the heap and goroutine stacks in use after a full GC.
func memNow() (heap, stack uint64, goroutines int) {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse, m.StackInuse, runtime.NumGoroutine()
}

// TestMemoryIdleKeepAliveH1 measures what 10,000 idle keep-alive HTTP/1.1
// downstream connections cost the proxy in Go memory: each served one GET
// and waits for its next request. The connections are in-memory pipes
// (10,000 sockets on both ends would pass the test's file limit); the
// pipes' own cost is measured first and subtracted, and kernel socket
// buffers are not counted. A measurement for make bench, not a pass/fail
// test of size.
func TestMemoryIdleKeepAliveH1(t *testing.T) {
	const n = 10000
	h0, s0, _ := memNow()
	pipes := make([][2]net.Conn, n)
	for i := range pipes {
		pipes[i][0], pipes[i][1] = net.Pipe()
	}
	h1, s1, _ := memNow()
	baseHeap, baseStack := int64(h1)-int64(h0), int64(s1)-int64(s0)
	for _, pp := range pipes {
		pp[0].Close()
		pp[1].Close()
	}
	pipes = nil

	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	cfg := mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c")))))
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	h0, s0, g0 := memNow()
	clients := make([]net.Conn, 0, n)
	for i := 0; i < n; i++ {
		c, srv := net.Pipe()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer srv.Close()
			cfg.Serve(ctx, srv, env, ConnInfo{})
		}()
		go io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReaderSize(c, 512), nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		clients = append(clients, c)
	}
	time.Sleep(200 * time.Millisecond)
	h1, s1, g1 := memNow()
	heap := int64(h1) - int64(h0) - baseHeap
	stack := int64(s1) - int64(s0) - baseStack
	t.Logf("10,000 idle keep-alive h1 connections: heap %.1f MiB + stacks %.1f MiB = %.1f KiB per connection, %.2f goroutines per connection",
		float64(heap)/(1<<20), float64(stack)/(1<<20), float64(heap+stack)/n/1024, float64(g1-g0)/n)
	for _, c := range clients {
		c.Close()
	}
}

// TestMemoryH2OpenStreams measures one h2c connection holding 1,000
// open streams (each request waits at the upstream, over its own HTTP/1.1
// upstream connection): the proxy's heap and stacks per stream. The
// upstream server runs in this process, so its share is measured first
// (1,000 requests held by it directly over raw connections) and
// subtracted.
func TestMemoryH2OpenStreams(t *testing.T) {
	const n = 1000
	release := make(chan struct{})
	var arrived atomic.Int64
	hold := func(w http.ResponseWriter, r *http.Request) {
		arrived.Add(1)
		<-release
		io.WriteString(w, "ok")
	}
	defer close(release)
	wait := func(k int64) {
		for deadline := time.Now().Add(30 * time.Second); arrived.Load() < k; {
			if time.Now().After(deadline) {
				t.Fatalf("%d of %d requests reached the upstream", arrived.Load(), k)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	// The upstream's share: n requests held, straight from raw conns.
	direct := startUpstream(t, hold)
	h0, s0, _ := memNow()
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", direct.addr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	}
	wait(n)
	h1, s1, _ := memNow()
	upHeap, upStack := int64(h1)-int64(h0), int64(s1)-int64(s0)

	u := startUpstream(t, hold)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	h0, s0, g0 := memNow()
	h := dialH2Raw(t, p.addr)
	go func() {
		for {
			if _, err := h.fr.ReadFrame(); err != nil {
				return
			}
		}
	}()
	for i := uint32(0); i < n; i++ {
		h.headers(t, 2*i+1, "/")
	}
	wait(2 * n)
	h1, s1, g1 := memNow()
	heap, stack := int64(h1)-int64(h0)-upHeap, int64(s1)-int64(s0)-upStack
	t.Logf("one h2c connection, 1,000 open streams: proxy heap %.1f MiB + stacks %.1f MiB = %.1f KiB per stream (upstream server's %.1f MiB subtracted; %.1f goroutines per stream in all)",
		float64(heap)/(1<<20), float64(stack)/(1<<20), float64(heap+stack)/n/1024, float64(upHeap+upStack)/(1<<20), float64(g1-g0)/n)
}
