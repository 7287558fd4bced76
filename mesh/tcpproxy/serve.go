package tcpproxy

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/cluster"
)

// Clusters resolves a cluster name in the configuration the flow started
// with; nil means no such cluster (yet).
type Clusters interface {
	Cluster(name string) *cluster.Cluster
}

// Connect runs tcp_proxy's upstream side: pick the cluster, then up to
// max_connect_attempts connects, each to a host not tried before.
// origDst is the flow's original destination (ORIGINAL_DST clusters
// dial it). It fills in the upstream fields of e and, on failure, returns
// Envoy's response flag with the error: NC no such cluster (counted as
// downstream_cx_no_route), UO the max_connections circuit breaker is open,
// UH no host to pick, UF every attempt failed (e's
// UpstreamTransportFailureReason says why when the last one's TLS
// handshake failed). A TLS upstream's SPIFFE ID goes in e's
// UpstreamPeerURISAN. The caller then rejects the
// downstream the way it can (refuse the SYN, or reset).
func (t *Config) Connect(clusters Clusters, origDst netip.AddrPort, e *accesslog.Entry) (*cluster.UpstreamConn, string, error) {
	name := t.pickCluster(rand.Uint32())
	e.UpstreamCluster = name
	cl := clusters.Cluster(name)
	if cl == nil {
		t.Stats.DownstreamCxNoRoute.Add(1)
		return nil, "NC", errors.New("cluster not found")
	}
	// exclude skips hosts already tried; built only after a failed attempt,
	// so the usual single connect allocates no closure.
	var tried []*cluster.Host
	var exclude func(*cluster.Host) bool
	var lastErr error
	for attempt := 0; attempt < t.MaxConnectAttempts; attempt++ {
		up, err := cl.Connect(context.Background(), origDst, exclude)
		if err == nil {
			e.UpstreamHost = up.Host().Address()
			if la, ok := up.LocalAddr().(*net.TCPAddr); ok {
				e.UpstreamLocal = la.AddrPort()
			}
			e.UpstreamPeerURISAN = up.PeerURISAN()
			e.UpstreamTransportFailureReason = ""
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
		if errors.As(err, &ce) {
			if ce.Host != nil {
				tried = append(tried, ce.Host)
			}
			// The last attempt's: a TLS handshake that failed (UF).
			e.UpstreamTransportFailureReason = ce.TransportFailure
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

// Serve splices the accepted downstream down and the upstream up (from
// Connect) until both directions are done, and records the bytes, how the
// flow ended and the tcp.<stat_prefix>. counters. closed is the
// listener's drain end: a flow still open then is closed, and its log
// entry says "listener drained".
func (t *Config) Serve(closed context.Context, down net.Conn, up *cluster.UpstreamConn, e *accesslog.Entry) {
	t.ServeOn(closed, down, up, e, nil)
}

// ServeOn is Serve with the upstream → downstream direction run by spawn
// (SpliceOn).
func (t *Config) ServeOn(closed context.Context, down net.Conn, up *cluster.UpstreamConn, e *accesslog.Entry, spawn func(func())) {
	// The callback is registered on the listener's context: no goroutine
	// per flow waits for the drain.
	var drained atomic.Bool
	stop := context.AfterFunc(closed, func() {
		drained.Store(true)
		down.Close()
		up.Close()
	})
	st := t.Stats
	st.DownstreamCxTotal.Add(1)
	r := SpliceOn(down, up, t.IdleTimeout, spawn)
	stop()
	e.BytesReceived, e.BytesSent, e.ResponseFlags = r.Received, r.Sent, r.ResponseFlags()
	st.DownstreamRxBytes.Add(uint64(r.Received))
	st.DownstreamTxBytes.Add(uint64(r.Sent))
	if r.IdleTimeout {
		st.IdleTimeout.Add(1)
	}
	if drained.Load() {
		e.Details = "listener drained"
	}
}
