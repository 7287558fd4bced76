package mesh

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// listenerDrain is a listener's drain, in Envoy's three steps. It belongs
// to the listener's configuration: snapshots that carry the listener over
// unchanged share it, so its flows, old and new, drain together.
//
// The contexts nest (closed ⊃ drained ⊃ draining: cancelling one cancels
// those inside it), so a later step implies the earlier ones, and a flow
// watches its own step with context.AfterFunc, no goroutine. They are made
// by the listener's first flow, not by the build: three nested contexts
// were ~1.3 kB per listener, 13 MB of a 10,000-service configuration whose
// listeners mostly never see a flow. A step taken before then is
// remembered and the contexts are born in it.
type listenerDrain struct {
	ctxs atomic.Pointer[drainContexts]

	mu   sync.Mutex // makes ctxs; orders it with the steps
	step int        // 0 serving, 1 draining, 2 drained, 3 closed
}

type drainContexts struct {
	// draining is done when the drain starts (an update removed or changed
	// the listener, /drain_listeners, the proxy terminating): HTTP
	// connections are asked to close (Connection: close, GOAWAY), as
	// Envoy's drain manager with Istio's immediate strategy does.
	draining context.Context
	// drained is done when the drain period is over: HTTP connections
	// still open are closed, whatever they have in flight.
	drained context.Context
	// closed is done when every flow of the listener is closed, TCP ones
	// too: the update that removed or changed it is --drain-duration old
	// (Envoy's --drain-time-s, after which the listener is gone).
	closed context.Context

	start, end, close context.CancelFunc
}

func newListenerDrain() *listenerDrain { return new(listenerDrain) }

// contexts returns the drain's contexts, making them on first use in the
// step the drain has reached.
func (ld *listenerDrain) contexts() *drainContexts {
	if c := ld.ctxs.Load(); c != nil {
		return c
	}
	ld.mu.Lock()
	defer ld.mu.Unlock()
	if c := ld.ctxs.Load(); c != nil {
		return c
	}
	c := new(drainContexts)
	c.closed, c.close = context.WithCancel(context.Background())
	c.drained, c.end = context.WithCancel(c.closed)
	c.draining, c.start = context.WithCancel(c.drained)
	c.cancelTo(ld.step)
	ld.ctxs.Store(c)
	return c
}

func (c *drainContexts) cancelTo(step int) {
	switch step {
	case 3:
		c.close()
	case 2:
		c.end()
	case 1:
		c.start()
	}
}

func (ld *listenerDrain) draining() context.Context { return ld.contexts().draining }
func (ld *listenerDrain) drained() context.Context  { return ld.contexts().drained }
func (ld *listenerDrain) closed() context.Context   { return ld.contexts().closed }

// to takes the drain to step (never back).
func (ld *listenerDrain) to(step int) {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	ld.step = max(ld.step, step)
	if c := ld.ctxs.Load(); c != nil {
		c.cancelTo(step)
	}
}

func (ld *listenerDrain) start() { ld.to(1) }
func (ld *listenerDrain) end()   { ld.to(2) }
func (ld *listenerDrain) close() { ld.to(3) }

// after starts the drain now and closes the listener's flows after d
// (at once when d <= 0).
func (ld *listenerDrain) after(d time.Duration) {
	ld.start()
	if d <= 0 {
		ld.close()
		return
	}
	time.AfterFunc(d, ld.close)
}

// proxyDrain is the drain of the whole proxy (/drain_listeners, SIGTERM):
// of the inbound listeners (traffic_direction INBOUND, Envoy's
// ?inboundonly) or of all, started and perhaps ended. It holds for the
// listeners of later snapshots too, as Envoy's drain manager is the
// server's, not a listener's.
type proxyDrain struct {
	startedIn, startedAll bool
	endedIn, endedAll     bool
}

func (pd proxyDrain) applyTo(s *Snapshot) {
	if s == nil || pd == (proxyDrain{}) {
		return
	}
	for _, l := range s.Listeners {
		in := l.Direction == corev3.TrafficDirection_INBOUND
		if pd.startedAll || (in && pd.startedIn) {
			l.drain.start()
		}
		if pd.endedAll || (in && pd.endedIn) {
			l.drain.end()
		}
	}
}

// StartDrain starts the drain of the listeners in force, and of those
// later updates add: all of them, or with inboundOnly those whose
// traffic_direction is INBOUND (Envoy's /drain_listeners?inboundonly,
// what pilot-agent asks on termination). Their HTTP connections are asked
// to close: the next HTTP/1.1 response says "Connection: close" and idle
// keep-alive connections close; HTTP/2 connections get a GOAWAY at once
// and finish the streams they have. TCP flows go on. Whether the
// listeners still take new flows is the Gate's business.
func (s *Server) StartDrain(inboundOnly bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if inboundOnly {
		s.drain.startedIn = true
	} else {
		s.drain.startedAll = true
	}
	s.drain.applyTo(s.D.Snapshot())
}

// EndDrain ends the drain StartDrain began (it starts it too, if it was
// not): the HTTP connections still open on those listeners are closed,
// even with a request the upstream holds. TCP flows still go on, as
// Envoy's do on a stopped listener; the proxy's exit ends them.
func (s *Server) EndDrain(inboundOnly bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if inboundOnly {
		s.drain.startedIn, s.drain.endedIn = true, true
	} else {
		s.drain.startedAll, s.drain.endedAll = true, true
	}
	s.drain.applyTo(s.D.Snapshot())
}
