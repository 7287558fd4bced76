package mesh

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/meshtun/meshtun/internal/gopool"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/filterchain"
	"github.com/meshtun/meshtun/mesh/httpconn"
	"github.com/meshtun/meshtun/mesh/rbac"
	"github.com/meshtun/meshtun/mesh/sniff"
	"github.com/meshtun/meshtun/mesh/tlsctx"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/netstack"
)

// Dispatcher is the netstack.Handler of a configured proxy: captured
// outbound flows enter the outbound virtual listener and are handed to the
// listener of their original destination; inbound flows enter the inbound
// virtual listener. The listener's filter chain then decides.
//
// Only the snapshot in force and the table of recently reached
// destinations change while it runs; the rest is fixed by NewDispatcher.
// A zero Dispatcher has no local addresses (every flow is outbound), logs
// nothing, closes the UDP flows no UDP listener takes and never accepts a
// flow before its upstream is connected when it could dial first.
type Dispatcher struct {
	snap  atomic.Pointer[Snapshot]
	o     DispatcherOptions
	reach *reachable // flows' original destinations (reachable.go)
}

// DispatcherOptions is what a Dispatcher is made with.
type DispatcherOptions struct {
	// Local are the pod's own addresses: flows to them are inbound.
	Local LocalAddrs
	// Access receives one entry per flow; nil logs nothing.
	Access *accesslog.Logger
	// UDP handles UDP flows no UDP listener takes: they pass through.
	// Nil closes them.
	UDP netstack.Handler
	// Dialer opens the sockets of udp_proxy sessions; nil sends every UDP
	// flow to UDP.
	Dialer *upstream.Dialer
	// Listening tells whether the pod listens on an inbound flow's
	// original destination (serveFlow); nil never knows, and such flows
	// are accepted, then reset if their connect fails.
	Listening *netstack.ListenProbe
}

var _ netstack.Handler = (*Dispatcher)(nil)

// NewDispatcher is a Dispatcher with o and no snapshot: until the first
// Swap, TCP flows are refused and UDP flows go to o.UDP.
func NewDispatcher(o DispatcherOptions) *Dispatcher {
	return &Dispatcher{o: o, reach: newReachable()}
}

// Swap installs a new snapshot for new flows and returns the previous one.
// Flows in progress keep the snapshot they started with.
func (d *Dispatcher) Swap(s *Snapshot) *Snapshot { return d.snap.Swap(s) }

// Snapshot returns the snapshot new flows use.
func (d *Dispatcher) Snapshot() *Snapshot { return d.snap.Load() }

// HandleUDP implements netstack.Handler.
// A captured UDP flow to the address of a UDP listener becomes a session
// of its udp_proxy; any other passes through.
func (d *Dispatcher) HandleUDP(f *netstack.UDPFlow) {
	snap := d.snap.Load()
	var l *Listener
	if snap != nil && !d.o.Local.Contains(f.ID.Dst.Addr()) {
		l = snap.udpListener(f.ID.Dst)
	}
	if l == nil || d.o.Dialer == nil {
		if d.o.UDP == nil {
			f.Close()
			return
		}
		d.o.UDP.HandleUDP(f)
		return
	}
	e := accesslog.Entry{Transport: "udp", Direction: "outbound", Start: time.Now(),
		DownstreamLocal: f.ID.Dst, DownstreamPeer: f.ID.Src}
	l.Stats.DownstreamCxTotal.Add(1)
	l.Stats.DownstreamCxActive.Add(1)
	defer l.Stats.DownstreamCxActive.Add(-1)
	l.UDP.Serve(f, snap, d.o.Dialer, &e)
	d.o.Access.Log(&e)
}

// HandleTCP implements netstack.Handler.
func (d *Dispatcher) HandleTCP(req *netstack.TCPRequest) {
	snap := d.snap.Load()
	e := accesslog.Entry{Transport: "tcp", Start: time.Now(), DownstreamLocal: req.ID.Dst, DownstreamPeer: req.ID.Src}
	var recv *Listener
	if snap != nil {
		if d.o.Local.Contains(req.ID.Dst.Addr()) {
			e.Direction, recv = "inbound", snap.inbound
		} else {
			e.Direction, recv = "outbound", snap.outbound
			recv = snap.handOff(recv, req.ID.Dst)
		}
	}
	if recv == nil {
		// No listener takes the flow: like a port nobody listens on.
		req.Refuse()
		e.ResponseFlags, e.Details = "NR", "no listener"
		d.o.Access.Log(&e)
		return
	}
	recv.Stats.DownstreamCxTotal.Add(1)
	recv.Stats.DownstreamCxActive.Add(1)
	defer recv.Stats.DownstreamCxActive.Add(-1)
	defer recv.Stats.DownstreamCxDestroy.Add(1)
	serveFlow(snap, recv, captured{req: req}, &e, d)
	d.o.Access.Log(&e)
}

// flowSource abstracts how a flow's downstream connection is obtained: a
// captured flow can still be refused with a RST before its handshake
// completes; a connection accepted on a bound socket already exists.
type flowSource interface {
	id() netstack.FlowID
	accept() (net.Conn, error)
	refuse()
	// dialFirst: the upstream may be connected before accept (see
	// netstack.TCPRequest.DialFirst); false for an inbound flow, whose
	// source only its completed handshake proves real.
	dialFirst() bool
}

// captured is a value of one pointer: as a flowSource it is stored in the
// interface as is, with no allocation per flow.
type captured struct{ req *netstack.TCPRequest }

func (c captured) id() netstack.FlowID { return c.req.ID }
func (c captured) accept() (net.Conn, error) {
	conn, err := c.req.Accept()
	if err != nil {
		return nil, err
	}
	return conn, nil
}
func (c captured) refuse()         { c.req.Refuse() }
func (c captured) dialFirst() bool { return c.req.DialFirst() }

// accepted is a connection from a bound listener's socket.
type accepted struct {
	conn net.Conn
	fid  netstack.FlowID
}

func (a *accepted) id() netstack.FlowID       { return a.fid }
func (a *accepted) accept() (net.Conn, error) { return a.conn, nil }
func (a *accepted) refuse()                   { resetConn(a.conn) }
func (a *accepted) dialFirst() bool           { return true } // nothing left to accept
func resetConn(c net.Conn) {
	switch tc := c.(type) {
	case *net.TCPConn:
		tc.SetLinger(0)
	case netstack.Conn: // a captured flow accepted before its dial (SYN flood)
		tc.Reset()
		return
	}
	c.Close()
}

// serveFlow runs listener l on one flow, in Envoy's order: listener
// filters when its chains need them (inspect), the filter-chain match,
// the chain's transport socket (TLS termination), then its terminal
// network filter (httpconn or tcpproxy).
//
// Without listener filters the chain is known from the SYN alone, so a
// captured outbound flow's handshake is left pending until the tcp_proxy
// upstream is connected: a refused or absent upstream, or no chain,
// reaches the client as a refused connect (RST), as the original
// destination itself would answer. A chain that terminates TLS accepts
// the flow first: its upstream is connected only once the client has
// proved who it is, so a failed handshake reaches nothing behind the
// proxy.
//
// A flow the stack does not offer for dial-first (every inbound flow, and
// outbound ones under a SYN flood) is accepted before its upstream is
// connected, as Envoy's virtualInbound does: a failed upstream then
// resets it. So is a flow that could dial first when its original
// destination's last flow got its upstream connected within
// reachableFor: its handshake completes while the upstream is connected,
// and a failed connect resets it and makes the next flow dial first
// again (optimistic accept, reachable.go). One exception keeps a closed port refused: an inbound flow
// whose tcp_proxy goes to an ORIGINAL_DST cluster (Istio's
// InboundPassthroughCluster) is headed for its original destination in
// the pod, and when the ListenProbe says nothing listens there its SYN
// is answered with a RST, with no handshake and no dial, as the pod
// itself would. Other clusters (an inbound|port|| cluster's endpoint) are
// not probed: Envoy accepts, then resets on a failed connect.
func serveFlow(snap *Snapshot, l *Listener, src flowSource, e *accesslog.Entry, d *Dispatcher) {
	fid := src.id()
	info := filterchain.ConnInfo{
		DstIP: fid.Dst.Addr(), DstPort: fid.Dst.Port(),
		SrcIP: fid.Src.Addr(), SrcPort: fid.Src.Port(), DirectSrcIP: fid.Src.Addr(),
		TransportProtocol: "raw_buffer",
		Pipe:              l.Pipe != "",
	}
	// raw is the accepted downstream, down what the filter reads (raw
	// behind the bytes the inspectors peeked); both nil until accepted.
	var raw, down net.Conn
	if wantTLS, wantHTTP := l.insp.wants(fid.Dst.Port()); wantTLS || wantHTTP {
		var err error
		if raw, err = src.accept(); err != nil {
			e.ResponseFlags, e.Details = "DC", err.Error()
			return
		}
		var ok bool
		if down, ok = inspect(l, raw, &info, wantTLS, wantHTTP, e); !ok {
			return
		}
	}

	chain := l.selectChain(&info)
	if chain == nil {
		l.Stats.NoFilterChainMatch.Add(1)
		e.ResponseFlags = "NR"
		reject(src, raw)
		return
	}

	if chain.TLS != nil {
		if down == nil {
			var err error
			if raw, err = src.accept(); err != nil {
				e.ResponseFlags, e.Details = "DC", err.Error()
				return
			}
			down = raw
		}
		tc, ok := terminate(l, chain, down, e)
		if !ok {
			return
		}
		down = tc
	}

	// Network RBAC runs after the chain's TLS handshake, on its verified
	// peer (nil on plaintext), before the terminal filter.
	if len(chain.RBAC) > 0 {
		var peer *rbac.Peer
		if tc, ok := down.(*Downstream); ok {
			peer = tc.Peer
		}
		if !authorizeFlow(chain, &info, peer, src, down, e) {
			return
		}
	}

	if chain.HTTP != nil {
		if down == nil {
			var err error
			if down, err = src.accept(); err != nil {
				e.ResponseFlags, e.Details = "DC", err.Error()
				return
			}
		}
		serveHTTP(d, snap, l, chain, down, fid, info.ServerName, e)
		return
	}

	if raw == nil && !src.dialFirst() {
		if to, ok := originalDst(snap, chain, fid.Dst); ok && e.Direction == "inbound" {
			if listening, known := d.o.Listening.Listening(to); known && !listening {
				e.UpstreamCluster = chain.TCP.Cluster
				e.ResponseFlags, e.Details = "UF", "nothing listens on "+to.String()
				src.refuse()
				return
			}
		}
		var err error
		if raw, err = src.accept(); err != nil {
			e.ResponseFlags, e.Details = "DC", err.Error()
			return
		}
		down = raw
	}
	var up *cluster.UpstreamConn
	var flags string
	var err error
	// sp, when not nil, is the goroutine that dialed: it runs the
	// splice's second direction (tcpproxy.SpliceOn), or is released on
	// any other way out.
	var sp spare
	rfd, optimistic := -1, false
	if _, ok := src.(captured); ok && raw == nil && d.reach.known(fid.Dst, chain.TCP.Cluster) && connectRoom(snap, chain) {
		rfd, optimistic = upstream.ReserveFD()
	}
	if optimistic {
		var aerr error
		raw, up, sp, aerr, err = acceptWhileDialing(src.accept, func() (*cluster.UpstreamConn, error) {
			upstream.ReleaseFD(rfd)
			u, f, err := chain.TCP.Connect(snap, fid.Dst, e)
			flags = f
			return u, err
		})
		if err != nil || aerr != nil {
			sp.release()
			sp = nil
		}
		if aerr != nil {
			if err == nil {
				up.Reset()
			} else {
				d.reach.failed(fid.Dst, chain.TCP.Cluster)
			}
			e.ResponseFlags, e.Details = "DC", aerr.Error()
			return
		}
		down = raw
	} else {
		up, flags, err = chain.TCP.Connect(snap, fid.Dst, e)
	}
	if err != nil {
		if flags != "UO" { // an overflow says nothing of the destination
			d.reach.failed(fid.Dst, chain.TCP.Cluster)
		}
		e.ResponseFlags, e.Details = flags, err.Error()
		if tc, ok := down.(*Downstream); ok {
			tc.Reset()
		} else {
			reject(src, raw)
		}
		return
	}
	d.reach.connected(fid.Dst, chain.TCP.Cluster)
	if down == nil {
		if down, err = src.accept(); err != nil {
			up.Reset()
			e.ResponseFlags, e.Details = "DC", err.Error()
			return
		}
	}
	spawn := gopool.Go
	if sp != nil {
		spawn = sp.run
	}
	chain.TCP.ServeOn(l.drain.closed(), down, up, e, spawn)
}

// connectRoom reports whether chain's tcp_proxy cluster (a single one, not
// weighted ones) has a max_connections slot free: an optimistic accept is
// tried only then, so that a full circuit breaker is still a refused
// connect (UO), as the README promises. Two flows racing for the last
// slot may still see one accepted and then reset, which is what Envoy
// does with every overflow.
func connectRoom(snap *Snapshot, chain *Chain) bool {
	if chain.TCP.Cluster == "" {
		return false
	}
	cl := snap.Cluster(chain.TCP.Cluster)
	if cl == nil {
		return false
	}
	res := cl.Resources(cluster.PriorityDefault)
	return res.Connections() < int64(res.Thresholds().MaxConnections)
}

// originalDst is where chain's tcp_proxy sends a flow to dst when its
// cluster is ORIGINAL_DST (a single cluster, not weighted ones).
func originalDst(snap *Snapshot, chain *Chain, dst netip.AddrPort) (netip.AddrPort, bool) {
	if chain.TCP.Cluster == "" {
		return netip.AddrPort{}, false
	}
	cl := snap.Cluster(chain.TCP.Cluster)
	if cl == nil {
		return netip.AddrPort{}, false
	}
	return cl.OriginalDestination(dst)
}

// authorizeFlow runs the chain's network RBAC filters in order, once per
// connection, before its terminal filter: a denied connection is
// accepted and closed at once (Envoy accepts, then closes on its RBAC
// decision) without any upstream connection, so no byte of it reaches
// the upstream; connection_termination_details name the policy. A
// connection is evaluated only at its start, as Envoy's default
// ONE_TIME_ON_FIRST_BYTE: a later policy change leaves it open. peer is
// the verified TLS peer (rbac.PeerOf after the chain's handshake), nil
// for plaintext: authenticated principals then never match.
func authorizeFlow(chain *Chain, info *filterchain.ConnInfo, peer *rbac.Peer, src flowSource, down net.Conn, e *accesslog.Entry) bool {
	in := rbac.Input{
		DirectRemote: info.DirectSrcIP, Remote: info.DirectSrcIP,
		Local: netip.AddrPortFrom(info.DstIP, info.DstPort),
		SNI:   info.ServerName,
		Peer:  peer,
	}
	for _, f := range chain.RBAC {
		d := f.Evaluate(&in)
		if d.Allowed {
			continue
		}
		e.Details = d.Details()
		if down == nil {
			var err error
			if down, err = src.accept(); err != nil {
				e.ResponseFlags = "DC"
				return false
			}
		}
		down.Close()
		return false
	}
	return true
}

// inspect runs the listener filters (tls_inspector, http_inspector) on
// the accepted downstream raw and records what they found in info for
// the chain match. It returns the connection to serve (raw behind the
// peeked bytes), or false when the flow ends here (closed, flags in e).
func inspect(l *Listener, raw net.Conn, info *filterchain.ConnInfo, wantTLS, wantHTTP bool, e *accesslog.Entry) (net.Conn, bool) {
	l.Stats.DownstreamPreCxActive.Add(1)
	pc := sniff.NewPeekConn(raw, 0)
	res, err := sniff.Inspect(context.Background(), pc, wantTLS, wantHTTP, l.insp.timeout)
	l.Stats.DownstreamPreCxActive.Add(-1)
	if err != nil {
		if !errors.Is(err, sniff.ErrTimeout) {
			raw.Close()
			e.ResponseFlags, e.Details = "DC", err.Error()
			return nil, false
		}
		l.Stats.DownstreamListenerTimeout.Add(1)
		if !l.insp.continueOnTimeout {
			raw.Close()
			e.ResponseFlags, e.Details = "-", "listener filters timeout"
			return nil, false
		}
	}
	info.TransportProtocol = res.TransportProtocol
	info.ServerName = res.ServerName
	info.ApplicationProtocols = res.ApplicationProtocols
	return pc, true
}

// reject turns a flow away: a captured flow not yet accepted is refused
// (its SYN answered with a RST); one already accepted is reset.
func reject(src flowSource, accepted net.Conn) {
	if accepted == nil {
		src.refuse()
		return
	}
	resetConn(accepted)
}

func (l *Listener) selectChain(info *filterchain.ConnInfo) *Chain {
	i, ok := l.matcher.Match(info)
	switch {
	case !ok:
		return nil
	case i < 0:
		return l.Default
	}
	return l.Chains[i]
}

// serveHTTP runs the chain's http_connection_manager on an accepted
// connection. Each request is logged (HTTP access line) when the
// connection manager has an access_log, as in Envoy, and the proxy's log
// level lets access lines through; the connection's own entry, like a
// tcp_proxy flow's, is written either way and keeps the byte counts.
// The listener's drain start asks the connection to close (Connection:
// close, GOAWAY; in-flight requests finish); the drain's end closes it.
func serveHTTP(d *Dispatcher, snap *Snapshot, l *Listener, chain *Chain, down net.Conn, fid netstack.FlowID, sni string, e *accesslog.Entry) {
	e.Details = "http"
	access := d.o.Access
	var logReq func(httpconn.Entry)
	if access.Enabled() && chain.HTTP.HasAccessLog() {
		// The closure copies what it needs rather than capture e, which
		// then stays on the stack of the flow's handler.
		dir, local, peer := e.Direction, e.DownstreamLocal, e.DownstreamPeer
		logReq = func(he httpconn.Entry) {
			re := accesslog.Entry{Transport: "http", Direction: dir, Start: he.Start,
				DownstreamLocal: local, DownstreamPeer: peer,
				UpstreamHost: he.UpstreamHost, UpstreamCluster: he.UpstreamCluster,
				BytesReceived: he.BytesReceived, BytesSent: he.BytesSent, ResponseFlags: he.ResponseFlags.String(),
				UpstreamPeerURISAN: he.UpstreamPeerURISAN, UpstreamTransportFailureReason: he.UpstreamTransportFailureReason,
				DownstreamPeerURISAN: he.DownstreamPeerURISAN,
				HTTP: &accesslog.HTTP{Method: he.Method, Path: he.Path, Protocol: he.Protocol, Authority: he.Authority,
					RequestID: he.RequestID, UserAgent: he.UserAgent, XFF: he.XFF, ResponseCode: he.ResponseCode,
					ResponseCodeDetails: he.ResponseCodeDetails, RouteName: he.RouteName,
					UpstreamServiceTime: he.UpstreamServiceTime, Attempts: he.Attempts}}
			access.Log(&re)
		}
	}
	info := httpconn.ConnInfo{Peer: fid.Src, Local: fid.Dst, AccessLog: logReq, Draining: l.drain.draining(), SNI: sni}
	if tc, ok := down.(*Downstream); ok {
		info.TLS, info.TLSPeer = &tc.TLS, tc.Peer
		info.LocalURISAN = tlsctx.LocalURISAN(tc.TLS)
	}
	err := chain.HTTP.Serve(l.drain.drained(), down, liveEnv{d: d, start: snap}, info)
	down.Close()
	if err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, context.Canceled) {
		e.ResponseFlags, e.Details = "DC", err.Error()
	}
}

// liveEnv resolves routes and clusters in the snapshot in force at each
// request, as Envoy applies RDS and CDS updates to the next request of a
// connection already open: a long-lived keep-alive connection must not
// keep egress that a REGISTRY_ONLY switch took away. The connection's
// listener and its http_connection_manager stay those it started with.
type liveEnv struct {
	d     *Dispatcher
	start *Snapshot
}

func (v liveEnv) snap() *Snapshot {
	if s := v.d.snap.Load(); s != nil {
		return s
	}
	return v.start
}

func (v liveEnv) Routes(name string) *httpconn.Routes         { return v.snap().Routes(name) }
func (v liveEnv) Cluster(name string) *cluster.Cluster        { return v.snap().Cluster(name) }
func (v liveEnv) ClusterHTTP(name string) cluster.HTTPOptions { return v.snap().ClusterHTTP(name) }
func (v liveEnv) Pools() *httpconn.Pools                      { return v.start.Pools() }
