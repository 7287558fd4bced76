package httpconn

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/meshtun/meshtun/mesh/cluster"
)

// terminateConnect is Envoy's terminated CONNECT (a connect_matcher route
// whose CONNECT upgrade_config has connect_config): the proxy opens a TCP
// connection to a host of the route's cluster, answers 200 once it is
// up, and relays the bytes that follow both ways (over HTTP/1.1 on the
// hijacked connection, over HTTP/2 as the stream's DATA) until either
// side closes. The client's end of data half-closes the upstream, which
// may still answer. The route timeout bounds the connect only (the 200 is
// the response head); stream_idle_timeout, or the route's idle_timeout,
// ends a tunnel in which nothing moved. The authority is not dialled
// (that is a dynamic forward proxy's job): the cluster chooses the host.
//
// The access log shows the 200 (via_upstream) with the tunnel's bytes;
// the cluster counts upstream_rq_200 and the host one request, as the
// 200 Envoy synthesizes goes through its router's accounting.
func (s *stream) terminateConnect(routes *Routes, vh *VirtualHost, rt *Route, clusterName string, wc *weightedCluster) {
	cl := s.h.env.Cluster(clusterName)
	if clusterName == "" || cl == nil {
		s.cfg.stats.NoCluster.Add(1)
		s.e.ResponseFlags |= FlagNC
		s.localReply(rt.notFoundCode, "", "cluster_not_found")
		return
	}
	s.armRouteIdle(rt)
	s.e.Attempts = 1
	h, err := cl.PickHostFor(s.h.info.Local, nil)
	if err != nil {
		s.e.ResponseFlags |= FlagUH
		s.localReply(http.StatusServiceUnavailable, "no healthy upstream", "no_healthy_upstream")
		return
	}
	s.e.UpstreamHost = h.Address()

	// The same shape the router's attempts have, for classify.
	f := forwarding{routes: routes, vh: vh, rt: rt, wc: wc, name: clusterName, cl: cl, stats: cl.HTTPStats(), gctx: s.ctx}
	if rt.timeout > 0 {
		var cancel context.CancelFunc
		f.gctx, cancel = context.WithTimeout(s.ctx, rt.timeout)
		defer cancel()
	}
	a := attempt{n: 1, h: h, ctx: f.gctx}
	h.BeginRequest()
	start := time.Now()
	up, err := cl.ConnectHost(f.gctx, h)
	if err != nil {
		fail := s.classify(&f, &a, err)
		h.EndRequest(fail.outcome)
		if fail.flag != 0 {
			s.e.ResponseFlags |= fail.flag
			s.localReply(fail.code, fail.msg, fail.details)
		}
		return
	}
	defer up.Close()
	s.e.UpstreamServiceTime = time.Since(start)
	s.e.UpstreamPeerURISAN = up.PeerURISAN()
	s.e.UpstreamTransportFailureReason = ""
	f.stats.CountResponse(http.StatusOK)
	if s.reqTimer != nil {
		// request_timeout waits for the end of a request; a tunnel's
		// request ends with the tunnel.
		s.reqTimer.Stop()
	}

	hdr := http.Header{}
	s.responseHeaderOps(hdr, routes, vh, rt, wc)
	if !s.cfg.filters.suppressEnvoy {
		hdr["X-Envoy-Upstream-Service-Time"] = []string{strconv.FormatInt(s.e.UpstreamServiceTime.Milliseconds(), 10)}
	}
	if s.cfg.alwaysSetRequestID && s.e.RequestID != "" {
		hdr["X-Request-Id"] = []string{s.e.RequestID}
	}
	s.setServer(hdr)
	var out cluster.RequestOutcome
	if s.r.ProtoMajor == 2 {
		out = s.tunnelH2(up, hdr)
	} else {
		s.closeConn = false
		out = s.tunnelH1(up, hdr, http.StatusOK)
	}
	h.EndRequest(out)
}
