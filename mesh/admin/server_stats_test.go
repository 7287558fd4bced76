package admin

import (
	"sync"
	"testing"
	"time"

	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/bootstrap"
)

// TestServerConnectionsAndGoroutines: server.total_connections sums the
// listeners' open downstream connections, and server.goroutines follows
// the process's goroutines, both up and back down.
func TestServerConnectionsAndGoroutines(t *testing.T) {
	b, err := bootstrap.Load("../../examples/sidecar-bootstrap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	snap := build(t, b)
	d := &mesh.Dispatcher{}
	d.Swap(snap)
	s := &Server{D: d, Start: time.Now()}
	value := func(name string) uint64 {
		t.Helper()
		for _, st := range s.collect() {
			if st.name == name {
				if !st.gauge || !st.used {
					t.Errorf("%s: gauge %v used %v, want a used gauge", name, st.gauge, st.used)
				}
				return st.value
			}
		}
		t.Fatalf("no stat %s", name)
		return 0
	}
	if got := value("server.total_connections"); got != 0 {
		t.Errorf("server.total_connections = %d before any flow, want 0", got)
	}
	snap.Listeners[0].Stats.DownstreamCxActive.Add(3)
	snap.Listeners[1].Stats.DownstreamCxActive.Add(2)
	if got := value("server.total_connections"); got != 5 {
		t.Errorf("server.total_connections = %d, want 5", got)
	}
	snap.Listeners[0].Stats.DownstreamCxActive.Add(-3)
	snap.Listeners[1].Stats.DownstreamCxActive.Add(-2)
	if got := value("server.total_connections"); got != 0 {
		t.Errorf("server.total_connections = %d after the flows closed, want 0", got)
	}

	before := value("server.goroutines")
	const n = 50
	release := make(chan struct{})
	var started, stopped sync.WaitGroup
	started.Add(n)
	stopped.Add(n)
	for range n {
		go func() {
			defer stopped.Done()
			started.Done()
			<-release
		}()
	}
	started.Wait()
	if got := value("server.goroutines"); got < before+n {
		t.Errorf("server.goroutines = %d with %d more running, want at least %d", got, n, before+n)
	}
	close(release)
	stopped.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for value("server.goroutines") > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := value("server.goroutines"); got > before {
		t.Errorf("server.goroutines = %d after they ended, want at most %d", got, before)
	}
}
