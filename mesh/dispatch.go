package mesh

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/filterchain"
	"github.com/meshtun/meshtun/mesh/httpconn"
	"github.com/meshtun/meshtun/mesh/sniff"
	"github.com/meshtun/meshtun/mesh/tcpproxy"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/netstack"
)

// Dispatcher is the netstack.Handler of a configured proxy: captured
// outbound flows enter the outbound virtual listener and are handed to the
// listener of their original destination; inbound flows enter the inbound
// virtual listener. The listener's filter chain then decides.
type Dispatcher struct {
	snap atomic.Pointer[Snapshot]

	// LocalIPs are the pod's addresses: flows to them are inbound.
	LocalIPs []netip.Addr
	Access   *accesslog.Logger
	// UDP handles UDP flows no UDP listener takes: they pass through.
	UDP netstack.Handler
	// Dialer opens the sockets of udp_proxy sessions.
	Dialer *upstream.Dialer
}

var _ netstack.Handler = (*Dispatcher)(nil)

// Swap installs a new snapshot for new flows and returns the previous one.
// Flows in progress keep the snapshot they started with.
func (d *Dispatcher) Swap(s *Snapshot) *Snapshot { return d.snap.Swap(s) }

// Snapshot returns the snapshot new flows use.
func (d *Dispatcher) Snapshot() *Snapshot { return d.snap.Load() }

func (d *Dispatcher) isLocal(ip netip.Addr) bool {
	for _, l := range d.LocalIPs {
		if l == ip {
			return true
		}
	}
	return false
}

// HandleUDP implements netstack.Handler.
// A captured UDP flow to the address of a UDP listener becomes a udp_proxy
// session to a host of its cluster; any other passes through.
func (d *Dispatcher) HandleUDP(f *netstack.UDPFlow) {
	snap := d.snap.Load()
	var l *Listener
	if snap != nil && !d.isLocal(f.ID.Dst.Addr()) {
		l = snap.udpListener(f.ID.Dst)
	}
	if l == nil || d.Dialer == nil {
		if d.UDP == nil {
			f.Close()
			return
		}
		d.UDP.HandleUDP(f)
		return
	}
	e := accesslog.Entry{Transport: "udp", Direction: "outbound", Start: time.Now(),
		DownstreamLocal: f.ID.Dst, DownstreamPeer: f.ID.Src, UpstreamCluster: l.UDP.Cluster}
	l.Stats.DownstreamCxTotal.Add(1)
	l.Stats.DownstreamCxActive.Add(1)
	defer l.Stats.DownstreamCxActive.Add(-1)
	cl := snap.Clusters[l.UDP.Cluster]
	if cl == nil {
		f.Close()
		e.ResponseFlags, e.Details = "NC", "cluster not found"
		d.Access.Log(&e)
		return
	}
	h, err := cl.PickHost(f.ID.Dst)
	if err != nil {
		f.Close()
		e.ResponseFlags, e.Details = "UH", err.Error()
		d.Access.Log(&e)
		return
	}
	e.UpstreamHost = h.Address()
	relayUDP(f, d.Dialer, h.Address(), &e)
	d.Access.Log(&e)
}

// HandleTCP implements netstack.Handler.
func (d *Dispatcher) HandleTCP(req *netstack.TCPRequest) {
	snap := d.snap.Load()
	e := accesslog.Entry{Transport: "tcp", Start: time.Now(), DownstreamLocal: req.ID.Dst, DownstreamPeer: req.ID.Src}
	var recv *Listener
	if snap != nil {
		if d.isLocal(req.ID.Dst.Addr()) {
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
		d.Access.Log(&e)
		return
	}
	recv.Stats.DownstreamCxTotal.Add(1)
	recv.Stats.DownstreamCxActive.Add(1)
	defer recv.Stats.DownstreamCxActive.Add(-1)
	defer recv.Stats.DownstreamCxDestroy.Add(1)
	serveFlow(snap, recv, &captured{req: req}, &e, d)
	d.Access.Log(&e)
}

// flowSource abstracts how a flow's downstream connection is obtained: a
// captured flow can still be refused with a RST before its handshake
// completes; a connection accepted on a bound socket already exists.
type flowSource interface {
	id() netstack.FlowID
	accept() (net.Conn, error)
	refuse()
}

type captured struct{ req *netstack.TCPRequest }

func (c *captured) id() netstack.FlowID { return c.req.ID }
func (c *captured) accept() (net.Conn, error) {
	conn, err := c.req.Accept()
	if err != nil {
		return nil, err
	}
	return conn, nil
}
func (c *captured) refuse() { c.req.Refuse() }

// accepted is a connection from a bound listener's socket.
type accepted struct {
	conn net.Conn
	fid  netstack.FlowID
}

func (a *accepted) id() netstack.FlowID       { return a.fid }
func (a *accepted) accept() (net.Conn, error) { return a.conn, nil }
func (a *accepted) refuse()                   { resetConn(a.conn) }
func resetConn(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// serveFlow runs listener l on one flow: listener filters when its chains
// need them, filter-chain selection, then tcp_proxy to a cluster.
func serveFlow(snap *Snapshot, l *Listener, src flowSource, e *accesslog.Entry, d *Dispatcher) {
	fid := src.id()
	info := filterchain.ConnInfo{
		DstIP: fid.Dst.Addr(), DstPort: fid.Dst.Port(),
		SrcIP: fid.Src.Addr(), SrcPort: fid.Src.Port(), DirectSrcIP: fid.Src.Addr(),
		TransportProtocol: "raw_buffer",
		Pipe:              l.Pipe != "",
	}
	wantTLS, wantHTTP := l.insp.wants(fid.Dst.Port())

	// Without listener filters the chain is known from the SYN alone, so
	// the upstream is dialed before the client's handshake completes: a
	// refused or absent upstream reaches the client as a refused connect.
	if !wantTLS && !wantHTTP {
		if chain := l.selectChain(&info); chain != nil && chain.HTTP != nil {
			down, err := src.accept()
			if err != nil {
				e.ResponseFlags, e.Details = "DC", err.Error()
				return
			}
			serveHTTP(d, snap, l, chain, down, fid, e)
			return
		}
		chain, up, ok := chainAndUpstream(snap, l, &info, fid.Dst, e)
		if !ok {
			src.refuse()
			return
		}
		down, err := src.accept()
		if err != nil {
			up.Reset()
			e.ResponseFlags, e.Details = "DC", err.Error()
			return
		}
		splice(l, down, up, chain, e)
		return
	}

	down, err := src.accept()
	if err != nil {
		e.ResponseFlags, e.Details = "DC", err.Error()
		return
	}
	l.Stats.DownstreamPreCxActive.Add(1)
	pc := sniff.NewPeekConn(down, 0)
	res, err := sniff.Inspect(context.Background(), pc, wantTLS, wantHTTP, l.insp.timeout)
	l.Stats.DownstreamPreCxActive.Add(-1)
	if err != nil {
		if errors.Is(err, sniff.ErrTimeout) {
			l.Stats.DownstreamListenerTimeout.Add(1)
			if !l.insp.continueOnTimeout {
				down.Close()
				e.ResponseFlags, e.Details = "-", "listener filters timeout"
				return
			}
		} else {
			down.Close()
			e.ResponseFlags, e.Details = "DC", err.Error()
			return
		}
	}
	info.TransportProtocol = res.TransportProtocol
	info.ServerName = res.ServerName
	info.ApplicationProtocols = res.ApplicationProtocols
	if chain := l.selectChain(&info); chain != nil && chain.HTTP != nil {
		serveHTTP(d, snap, l, chain, pc, fid, e)
		return
	}
	chain, up, ok := chainAndUpstream(snap, l, &info, fid.Dst, e)
	if !ok {
		resetConn(down)
		return
	}
	splice(l, pc, up, chain, e)
}

// chainAndUpstream selects the filter chain for info and connects its
// upstream. On failure it records Envoy's response flag in e (NR: no
// chain; UO, UH, UF: see connect) and reports false: the caller rejects
// the downstream the way it can (refuse the SYN, or reset).
func chainAndUpstream(snap *Snapshot, l *Listener, info *filterchain.ConnInfo, origDst netip.AddrPort, e *accesslog.Entry) (*Chain, *cluster.UpstreamConn, bool) {
	chain := l.selectChain(info)
	if chain == nil {
		l.Stats.NoFilterChainMatch.Add(1)
		e.ResponseFlags = "NR"
		return nil, nil, false
	}
	up, flags, err := connect(snap, chain, origDst, e)
	if err != nil {
		e.ResponseFlags, e.Details = flags, err.Error()
		return nil, nil, false
	}
	return chain, up, true
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

// connect runs tcp_proxy's upstream side: pick the cluster, then up to
// max_connect_attempts connects, each to a host not tried before.
func connect(snap *Snapshot, chain *Chain, origDst netip.AddrPort, e *accesslog.Entry) (*cluster.UpstreamConn, string, error) {
	name := chain.TCP.pickCluster(rand.Uint32())
	e.UpstreamCluster = name
	cl := snap.Clusters[name]
	if cl == nil {
		if st := chain.TCP.Stats; st != nil {
			st.DownstreamCxNoRoute.Add(1)
		}
		return nil, "NC", errors.New("cluster not found")
	}
	// exclude skips hosts already tried; built only after a failed attempt,
	// so the usual single connect allocates no closure.
	var tried []*cluster.Host
	var exclude func(*cluster.Host) bool
	var lastErr error
	for attempt := 0; attempt < chain.TCP.MaxConnectAttempts; attempt++ {
		up, err := cl.Connect(context.Background(), origDst, exclude)
		if err == nil {
			e.UpstreamHost = up.Host().Address()
			if la, ok := up.LocalAddr().(*net.TCPAddr); ok {
				e.UpstreamLocal = la.AddrPort()
			}
			return up, "", nil
		}
		lastErr = err
		switch {
		case errors.Is(err, cluster.ErrOverflow):
			return nil, "UO", err
		case errors.Is(err, cluster.ErrNoHealthyUpstream):
			return nil, "UH", err
		}
		var ce *cluster.ConnectError
		if errors.As(err, &ce) && ce.Host != nil {
			tried = append(tried, ce.Host)
		}
		if exclude == nil {
			exclude = func(h *cluster.Host) bool {
				for _, t := range tried {
					if t == h {
						return true
					}
				}
				return false
			}
		}
	}
	return nil, "UF", lastErr
}

// serveHTTP runs the chain's http_connection_manager on an accepted
// connection. Each request is logged (HTTP access line) when the
// connection manager has an access_log, as in Envoy, and the proxy's log
// level lets access lines through; the connection's own entry, like a
// tcp_proxy flow's, is written either way and keeps the byte counts.
// The listener's drain start asks the connection to close (Connection:
// close, GOAWAY; in-flight requests finish); the drain's end closes it.
func serveHTTP(d *Dispatcher, snap *Snapshot, l *Listener, chain *Chain, down net.Conn, fid netstack.FlowID, e *accesslog.Entry) {
	e.Details = "http"
	access := d.Access
	var logReq func(httpconn.Entry)
	if access.Enabled() && chain.HTTP.HasAccessLog() {
		logReq = func(he httpconn.Entry) {
			re := accesslog.Entry{Transport: "http", Direction: e.Direction, Start: he.Start,
				DownstreamLocal: e.DownstreamLocal, DownstreamPeer: e.DownstreamPeer,
				UpstreamHost: he.UpstreamHost, UpstreamCluster: he.UpstreamCluster,
				BytesReceived: he.BytesReceived, BytesSent: he.BytesSent, ResponseFlags: he.ResponseFlags.String(),
				HTTP: &accesslog.HTTP{Method: he.Method, Path: he.Path, Protocol: he.Protocol, Authority: he.Authority,
					RequestID: he.RequestID, UserAgent: he.UserAgent, XFF: he.XFF, ResponseCode: he.ResponseCode,
					ResponseCodeDetails: he.ResponseCodeDetails, RouteName: he.RouteName,
					UpstreamServiceTime: he.UpstreamServiceTime, Attempts: he.Attempts}}
			access.Log(&re)
		}
	}
	err := chain.HTTP.Serve(l.drain.drained, down, liveEnv{d: d, start: snap}, httpconn.ConnInfo{
		Peer: fid.Src, Local: fid.Dst, AccessLog: logReq, Draining: l.drain.draining,
	})
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

func splice(l *Listener, down net.Conn, up *cluster.UpstreamConn, chain *Chain, e *accesslog.Entry) {
	// A flow outliving its listener's drain is closed (no goroutine: the
	// callback is registered on the listener's context).
	var drained atomic.Bool
	stop := context.AfterFunc(l.drain.closed, func() {
		drained.Store(true)
		down.Close()
		up.Close()
	})
	st := chain.TCP.Stats
	if st != nil {
		st.DownstreamCxTotal.Add(1)
	}
	r := tcpproxy.Splice(down, up, chain.TCP.IdleTimeout)
	stop()
	e.BytesReceived, e.BytesSent, e.ResponseFlags = r.Received, r.Sent, r.ResponseFlags()
	if st != nil {
		st.DownstreamRxBytes.Add(uint64(r.Received))
		st.DownstreamTxBytes.Add(uint64(r.Sent))
		if r.IdleTimeout {
			st.IdleTimeout.Add(1)
		}
	}
	if drained.Load() {
		e.Details = "listener drained"
	}
}
