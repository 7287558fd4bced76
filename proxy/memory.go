package proxy

import (
	"runtime/debug"
	"sync"
	"time"

	"github.com/meshtun/meshtun/xdsclient"
)

// releaseThreshold is how many resources an xDS update must add, change
// or remove for the proxy to hand the memory its build freed back to the
// OS. Building a large configuration (10,000 services: ~100 MB kept)
// leaves as much garbage again, which the Go runtime would keep mapped as
// headroom (GOGC) and return only slowly: RSS stayed at 2.4 times the
// configuration's size. Small updates (an endpoint moving, Istio's usual
// push) leave little and do not pay for a full collection.
const releaseThreshold = 1000

// releaseDelay is how long the release waits after the last xDS update
// that ended: the updates of one push (clusters with their endpoints,
// then the listeners that use them) follow one another within a fraction
// of a second, and the release, a full collection plus ~0.2–0.3 s of
// madvise at 10,000 services, is paid once after the last of them, not
// on the way to each ACK (it was a quarter of the time to ACK).
const releaseDelay = time.Second

// releaser returns freed memory to the OS after big updates, off the xDS
// path: an update marks a release due when it ends, and the release runs
// releaseDelay after the last update, never while one is in progress
// (with GOMAXPROCS 1 it would take the CPU the update needs). The zero
// value is ready to use.
type releaser struct {
	delay time.Duration // 0: releaseDelay; tests shorten it
	free  func()        // nil: debug.FreeOSMemory; tests count calls

	mu      sync.Mutex
	timer   *time.Timer // armed release; nil when none
	busy    bool        // an update is in progress
	due     bool        // a release is owed once no update is in progress
	stopped bool
	running sync.WaitGroup
}

// begin is called when an update starts: an armed release waits for it.
func (r *releaser) begin() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.busy = true
	if r.timer != nil && r.timer.Stop() {
		r.due = true
	}
	r.timer = nil
}

// end is called when the update ends; big says it changed enough to owe
// a release.
func (r *releaser) end(big bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.busy = false
	r.due = r.due || big
	if r.due && !r.stopped {
		r.due = false
		d := r.delay
		if d == 0 {
			d = releaseDelay
		}
		r.timer = time.AfterFunc(d, r.run)
	}
}

func (r *releaser) run() {
	r.mu.Lock()
	if r.stopped || r.busy {
		// An update started as the timer fired: its end re-arms.
		r.due = r.due || r.busy
		r.mu.Unlock()
		return
	}
	r.timer = nil
	r.running.Add(1)
	r.mu.Unlock()
	defer r.running.Done()
	if r.free != nil {
		r.free()
		return
	}
	debug.FreeOSMemory()
}

// stop cancels an armed release and waits for one running.
func (r *releaser) stop() {
	r.mu.Lock()
	r.stopped = true
	if r.timer != nil {
		r.timer.Stop()
		r.timer = nil
	}
	r.mu.Unlock()
	r.running.Wait()
}

// bigUpdate reports whether next differs from prev by at least
// releaseThreshold resources. Resources that did not change keep their
// pointers from one Resources to the next (xdsclient.Resources), so
// counting changes is map lookups, no comparison of messages.
func bigUpdate(prev, next *xdsclient.Resources) bool {
	return changedResources(prev, next) >= releaseThreshold
}

// changedResources counts the resources of next that prev lacks or holds
// in another version, and those prev has and next lacks.
func changedResources(prev, next *xdsclient.Resources) int {
	if prev == nil {
		prev = &xdsclient.Resources{}
	}
	return changed(prev.Listeners, next.Listeners) + changed(prev.Clusters, next.Clusters) +
		changed(prev.Endpoints, next.Endpoints) + changed(prev.Routes, next.Routes)
}

func changed[M comparable](prev, next map[string]M) int {
	n := 0
	for name, m := range next {
		if old, ok := prev[name]; !ok || old != m {
			n++
		}
	}
	for name := range prev {
		if _, ok := next[name]; !ok {
			n++
		}
	}
	return n
}
