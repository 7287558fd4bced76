package mesh

import (
	"context"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// listenerDrain is a listener's drain, in Envoy's three steps. It belongs
// to the listener's configuration: snapshots that carry the listener over
// unchanged share it, so its flows, old and new, drain together.
//
// The contexts nest (closed ⊃ drained ⊃ draining: cancelling one cancels
// those inside it), so a later step implies the earlier ones, and a flow
// watches its own step with context.AfterFunc, no goroutine.
type listenerDrain struct {
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

func newListenerDrain() *listenerDrain {
	d := new(listenerDrain)
	d.closed, d.close = context.WithCancel(context.Background())
	d.drained, d.end = context.WithCancel(d.closed)
	d.draining, d.start = context.WithCancel(d.drained)
	return d
}

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
