package mesh

import (
	"context"
	"net"
	"net/netip"
	"time"

	"github.com/meshtun/meshtun/internal/gopool"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/tcpproxy"
	"github.com/meshtun/meshtun/mesh/udpproxy"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/netstack"
)

// Istio's names for the passthrough clusters.
const (
	PassthroughCluster        = "PassthroughCluster"
	InboundPassthroughCluster = "InboundPassthroughCluster"
)

// Passthrough forwards every flow to its original destination over a
// marked socket. An outbound flow is dialed before the client's handshake
// completes, so a destination that refuses or does not answer is seen by
// the client as a refused connection (RST) rather than an accepted one
// that closes; except under a SYN flood (netstack.TCPRequest.DialFirst
// false), when the handshake completes first, and for a destination that
// accepted an upstream connect within reachableFor, whose handshake
// completes while it is dialed (optimistic accept, reachable.go): if that
// dial fails after all, the flow is reset. An inbound flow is never
// dialed before its handshake completes (its source may be spoofed): it
// is refused at once when the ListenProbe finds nothing listening on its
// destination in the pod, else accepted, dialed, and reset if the dial
// fails.
// NewPassthrough fixes everything it uses but the table of recently
// reached destinations.
type Passthrough struct {
	o     PassthroughOptions
	reach *reachable
	// dial is o.Dialer.DialTCP from no particular source address; tests
	// send it elsewhere.
	dial func(context.Context, netip.AddrPort) (*net.TCPConn, error)
}

// PassthroughOptions is what a Passthrough is made with.
type PassthroughOptions struct {
	// Dialer opens the upstream sockets; required.
	Dialer *upstream.Dialer
	// Local are the pod's own addresses: flows to them are inbound (and
	// logged with InboundPassthroughCluster).
	Local LocalAddrs
	// TCPIdleTimeout closes TCP flows idle in both directions (Envoy's
	// tcp_proxy default is 1 h); 0 disables.
	TCPIdleTimeout time.Duration
	// Access receives one entry per flow; nil logs nothing.
	Access *accesslog.Logger
	// Listening tells whether the pod listens on an inbound flow's
	// destination; nil never knows, and such flows are accepted, then
	// reset if their dial fails.
	Listening *netstack.ListenProbe
}

var _ netstack.Handler = (*Passthrough)(nil)

// NewPassthrough is a Passthrough with o. o.Dialer must not be nil.
func NewPassthrough(o PassthroughOptions) *Passthrough {
	if o.Dialer == nil {
		panic("mesh: NewPassthrough without a Dialer")
	}
	p := &Passthrough{o: o, reach: newReachable()}
	p.dial = func(ctx context.Context, dst netip.AddrPort) (*net.TCPConn, error) {
		return o.Dialer.DialTCP(ctx, dst, netip.Addr{})
	}
	return p
}

func (p *Passthrough) direction(dst netip.Addr) (string, string) {
	if p.o.Local.Contains(dst) {
		return "inbound", InboundPassthroughCluster
	}
	return "outbound", PassthroughCluster
}

// HandleTCP implements netstack.Handler.
func (p *Passthrough) HandleTCP(req *netstack.TCPRequest) {
	dir, cluster := p.direction(req.ID.Dst.Addr())
	e := accesslog.Entry{
		Transport: "tcp", Direction: dir, Start: time.Now(),
		DownstreamLocal: req.ID.Dst, DownstreamPeer: req.ID.Src,
		UpstreamHost: req.ID.Dst, UpstreamCluster: cluster,
	}
	// Inbound, or under a SYN flood, the stack says not to dial first:
	// the handshake must prove the client real before anything is dialed
	// for it. A port nothing in the pod listens on is still refused.
	var down netstack.Conn
	if !req.DialFirst() {
		if dir == "inbound" {
			if listening, known := p.o.Listening.Listening(req.ID.Dst); known && !listening {
				req.Refuse()
				e.ResponseFlags, e.Details = "UF", "nothing listens on "+req.ID.Dst.String()
				p.o.Access.Log(&e)
				return
			}
		}
		var err error
		if down, err = req.Accept(); err != nil {
			e.ResponseFlags, e.Details = "DC", err.Error()
			p.o.Access.Log(&e)
			return
		}
	}
	var up *net.TCPConn
	var err error
	// sp, when not nil, is the goroutine that dialed: it runs the
	// splice's second direction, or is released on any other way out.
	var sp spare
	rfd, optimistic := -1, false
	if down == nil && p.reach.known(req.ID.Dst, "") {
		rfd, optimistic = upstream.ReserveFD()
	}
	if optimistic {
		var aerr error
		down, up, sp, aerr, err = acceptWhileDialing(req.Accept, func() (*net.TCPConn, error) {
			upstream.ReleaseFD(rfd)
			return p.dial(context.Background(), req.ID.Dst)
		})
		if err != nil || aerr != nil {
			sp.release()
			sp = nil
		}
		if aerr != nil {
			if err == nil {
				up.SetLinger(0)
				up.Close()
			} else {
				p.reach.failed(req.ID.Dst, "")
			}
			e.ResponseFlags, e.Details = "DC", aerr.Error()
			p.o.Access.Log(&e)
			return
		}
	} else {
		up, err = p.dial(context.Background(), req.ID.Dst)
	}
	if err != nil {
		p.reach.failed(req.ID.Dst, "")
		if down != nil {
			down.Reset()
		} else {
			req.Refuse()
		}
		e.ResponseFlags = "UF"
		e.Details = err.Error()
		p.o.Access.Log(&e)
		return
	}
	p.reach.connected(req.ID.Dst, "")
	e.UpstreamLocal = up.LocalAddr().(*net.TCPAddr).AddrPort()
	if down == nil {
		if down, err = req.Accept(); err != nil {
			up.SetLinger(0)
			up.Close()
			e.ResponseFlags = "DC"
			e.Details = err.Error()
			p.o.Access.Log(&e)
			return
		}
	}
	spawn := gopool.Go
	if sp != nil {
		spawn = sp.run
	}
	r := tcpproxy.SpliceOn(down, up, p.o.TCPIdleTimeout, spawn)
	e.BytesReceived, e.BytesSent, e.ResponseFlags = r.Received, r.Sent, r.ResponseFlags()
	p.o.Access.Log(&e)
}

// HandleUDP implements netstack.Handler: datagrams are relayed over a
// connected, marked socket until the flow idles out.
func (p *Passthrough) HandleUDP(f *netstack.UDPFlow) {
	dir, cluster := p.direction(f.ID.Dst.Addr())
	e := accesslog.Entry{
		Transport: "udp", Direction: dir, Start: time.Now(),
		DownstreamLocal: f.ID.Dst, DownstreamPeer: f.ID.Src,
		UpstreamHost: f.ID.Dst, UpstreamCluster: cluster,
	}
	udpproxy.Relay(f, p.o.Dialer, f.ID.Dst, &e)
	p.o.Access.Log(&e)
}
