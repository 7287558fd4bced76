package mesh

import (
	"context"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/meshtun/meshtun/netstack"
)

// Gate stands in front of the flow handler and is what draining closes:
// Envoy's /drain_listeners stops its listeners taking new connections
// (all of them, or with ?inboundonly the inbound ones) while the
// connections they already accepted go on. A refused captured TCP flow
// gets a RST, so the client fails at once instead of hanging.
//
// It also counts the flows in progress, so a terminating proxy can wait
// for them to end. The cost per flow is two atomic adds.
//
// What it hands flows to and which flows are inbound are fixed by NewGate:
// only the closed flags and the count change while it runs.
type Gate struct {
	h     netstack.Handler
	local LocalAddrs

	closedIn, closedOut atomic.Bool
	active              atomic.Int64
}

var _ netstack.Handler = (*Gate)(nil)

// NewGate is an open gate handing the flows it admits to h (the
// Dispatcher, or Passthrough without a bootstrap); a flow to one of local
// is inbound. h must not be nil.
func NewGate(h netstack.Handler, local LocalAddrs) *Gate {
	if h == nil {
		panic("mesh: NewGate with a nil handler")
	}
	return &Gate{h: h, local: local}
}

func (g *Gate) admit(dst netip.Addr) bool {
	if g.local.Contains(dst) {
		if g.closedIn.Load() {
			return false
		}
	} else if g.closedOut.Load() {
		return false
	}
	g.active.Add(1)
	return true
}

// HandleTCP implements netstack.Handler.
func (g *Gate) HandleTCP(req *netstack.TCPRequest) {
	if !g.admit(req.ID.Dst.Addr()) {
		req.Refuse()
		return
	}
	defer g.active.Add(-1)
	g.h.HandleTCP(req)
}

// HandleUDP implements netstack.Handler.
func (g *Gate) HandleUDP(f *netstack.UDPFlow) {
	if !g.admit(f.ID.Dst.Addr()) {
		f.Close()
		return
	}
	defer g.active.Add(-1)
	g.h.HandleUDP(f)
}

// Close stops new flows: inbound ones only, or all.
func (g *Gate) Close(inboundOnly bool) {
	g.closedIn.Store(true)
	if !inboundOnly {
		g.closedOut.Store(true)
	}
}

// Closed reports whether new inbound and new outbound flows are refused.
func (g *Gate) Closed() (inbound, outbound bool) {
	return g.closedIn.Load(), g.closedOut.Load()
}

// Active is the number of captured flows in progress.
func (g *Gate) Active() int64 { return g.active.Load() }

// Wait returns when no captured flow is in progress, or ctx ends first
// (false). It polls: draining is rare and a flow-end signal would cost
// every flow a channel operation.
func (g *Gate) Wait(ctx context.Context) bool {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for g.active.Load() > 0 {
		select {
		case <-ctx.Done():
			return g.active.Load() == 0
		case <-t.C:
		}
	}
	return true
}
