// Package gopool runs short-lived per-flow work on goroutines that keep
// their grown stacks between flows.
//
// Every goroutine starts with a small stack and grows it by copying
// (runtime.newstack) the first time a deep call chain runs on it: a
// captured TCP flow's handler goes through gVisor's endpoint creation,
// the upstream dial and the splice, and on a fresh goroutine per flow the
// copies measured about 8% of the proxy's CPU in the connect row. A
// worker that already ran such a flow runs the next one on the stack it
// has. The runtime may still shrink an idle worker's stack at a GC; the
// next flow then grows it once more.
package gopool

import (
	"sync/atomic"
	"time"
)

// maxIdle bounds the parked workers: beyond it a worker that finishes
// ends, as a plain goroutine would. A worker parks at most idleFor, so a
// proxy that stops making connections keeps none.
const (
	maxIdle = 32
	idleFor = 250 * time.Millisecond
)

// work is unbuffered: a send succeeds only when a worker is parked on it,
// so Go never queues f behind busy workers.
var (
	work = make(chan func())
	idle atomic.Int32
)

// Go runs f on a parked worker when one is idle, else on a new goroutine
// that becomes a worker once f returns. f may run for as long as it needs
// (a whole flow): a busy worker is simply not idle.
func Go(f func()) {
	select {
	case work <- f:
	default:
		go worker(f)
	}
}

// Idle is the number of parked workers (tests).
func Idle() int { return int(idle.Load()) }

func worker(f func()) {
	var t *time.Timer
	for {
		f()
		f = nil // drop the flow's references while parked
		if idle.Add(1) > maxIdle {
			idle.Add(-1)
			return
		}
		if t == nil {
			t = time.NewTimer(idleFor)
		} else {
			t.Reset(idleFor)
		}
		select {
		case f = <-work:
			idle.Add(-1)
			t.Stop()
		case <-t.C:
			idle.Add(-1)
			return
		}
	}
}
