package proxy

import (
	"runtime"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshtun/meshtun/xdsclient"
)

// changedResources counts what an update adds, replaces or removes, by
// pointer: a resource carried over unchanged keeps its pointer and is not
// counted, so routine pushes stay below the release threshold.
func TestChangedResources(t *testing.T) {
	a, b, c := &listenerv3.Listener{Name: "a"}, &listenerv3.Listener{Name: "b"}, &clusterv3.Cluster{Name: "c"}
	prev := &xdsclient.Resources{
		Listeners: map[string]*listenerv3.Listener{"a": a, "b": b},
		Clusters:  map[string]*clusterv3.Cluster{"c": c},
	}
	same := &xdsclient.Resources{Listeners: prev.Listeners, Clusters: map[string]*clusterv3.Cluster{"c": c}}
	if n := changedResources(prev, same); n != 0 {
		t.Errorf("an update carrying everything over: %d changed, want 0", n)
	}
	next := &xdsclient.Resources{
		Listeners: map[string]*listenerv3.Listener{"a": a, "b": {Name: "b"}, "new": {Name: "new"}},
	}
	// b replaced, new added, c removed.
	if n := changedResources(prev, next); n != 3 {
		t.Errorf("%d changed, want 3 (b replaced, new added, c removed)", n)
	}
	if n := changedResources(nil, next); n != 3 {
		t.Errorf("first update: %d changed, want its 3 resources", n)
	}
}

// The release of a big update waits for the burst of updates to end: it
// never runs while an update is in progress, updates of one push pay for
// one release, a small update alone owes none, and stop cancels one
// armed.
func TestReleaserAfterTheBurst(t *testing.T) {
	var (
		mu    sync.Mutex
		calls int
		busy  bool // an update in progress, as the releaser was told
		fired = make(chan struct{}, 10)
	)
	r := &releaser{delay: 300 * time.Millisecond, free: func() {
		mu.Lock()
		defer mu.Unlock()
		if busy {
			t.Error("released during an update")
		}
		calls++
		fired <- struct{}{}
	}}
	update := func(big bool, d time.Duration) {
		r.begin()
		mu.Lock()
		busy = true
		mu.Unlock()
		time.Sleep(d)
		mu.Lock()
		busy = false
		mu.Unlock()
		r.end(big)
	}
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return calls
	}

	// A burst: a big update, then two more within the delay, the last one
	// longer than the delay. One release, after the last.
	update(true, 0)
	update(false, 5*time.Millisecond)
	update(true, 400*time.Millisecond)
	select {
	case <-fired:
	case <-time.After(10 * time.Second):
		t.Fatal("no release after a big update")
	}
	time.Sleep(400 * time.Millisecond)
	if n := count(); n != 1 {
		t.Fatalf("%d releases for one burst, want 1", n)
	}

	// A small update alone owes nothing.
	update(false, 0)
	time.Sleep(400 * time.Millisecond)
	if n := count(); n != 1 {
		t.Fatalf("a small update released memory (%d releases)", n)
	}

	// stop cancels an armed release, and later updates arm none.
	r.delay = time.Hour
	update(true, 0)
	r.stop()
	r.delay = time.Millisecond
	update(true, 0)
	time.Sleep(50 * time.Millisecond)
	if n := count(); n != 1 {
		t.Fatalf("released after stop (%d releases)", n)
	}
}

// xdsBusy gives a large xDS response one processor more than the data
// path's and gives it back; never more than the machine has.
func TestXDSBusyRaisesGOMAXPROCS(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	if runtime.NumCPU() >= 2 {
		done := xdsBusy()
		if n := runtime.GOMAXPROCS(0); n != 2 {
			t.Errorf("GOMAXPROCS %d while busy, want 2", n)
		}
		done()
		if n := runtime.GOMAXPROCS(0); n != 1 {
			t.Errorf("GOMAXPROCS %d after, want 1 again", n)
		}
	}
	runtime.GOMAXPROCS(runtime.NumCPU())
	xdsBusy()()
	if n := runtime.GOMAXPROCS(0); n != runtime.NumCPU() {
		t.Errorf("GOMAXPROCS %d, want the %d CPUs untouched", n, runtime.NumCPU())
	}
}
