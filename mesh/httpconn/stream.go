package httpconn

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/http"
	"time"
)

var (
	errStreamIdle     = errors.New("stream idle timeout")
	errRequestTimeout = errors.New("request timeout")
)

// stream is one request/response exchange. Streams are pooled.
type stream struct {
	h    *connHandler
	cfg  *Config
	w    http.ResponseWriter
	r    *http.Request
	rctx context.Context // r's context, passed beside it (see serveStream)
	e    Entry
	body *countingBody

	ctx         context.Context // cancelled by idle/request timeouts and the downstream
	cancel      context.CancelCauseFunc
	reqTimer    *time.Timer
	unblock     *bodyUnblock // a request with a body: how timeouts end a stalled read
	wroteHeader bool
	aborted     bool
	internal    bool   // Envoy's internal request (x-envoy-internal set)
	closeConn   bool   // HTTP/1.1: the proxy's reply closes the connection
	upgrade     string // the Upgrade the request asks and its route allows ("": none)
	// grpcReplyStatus, if set, is the grpc-status of a local reply to a
	// gRPC request (else mapped from the HTTP status).
	grpcReplyStatus int
	target          string // request target: path and query

	streamReuse // kept when pooled (streampool.go)
}

// init readies a pooled stream for request r: the access log entry is
// started here so that its duration covers the whole exchange.
func (s *stream) init(h *connHandler, ctx context.Context, w http.ResponseWriter, r *http.Request) {
	keep := s.streamReuse
	if keep.idle == nil {
		keep.idle = new(idleWatch)
	}
	*s = stream{h: h, cfg: h.cfg, w: w, r: r, rctx: ctx, streamReuse: keep}
	s.e = Entry{
		Start:           time.Now(),
		Method:          r.Method,
		Authority:       r.Host,
		Protocol:        r.Proto,
		DownstreamPeer:  h.info.Peer,
		DownstreamLocal: h.info.Local,
	}
	if info := ConnInfoFrom(ctx); info != nil && info.TLSPeer != nil && len(info.TLSPeer.URISANs) > 0 {
		s.e.DownstreamPeerURISAN = info.TLSPeer.URISANs[0]
	}
	s.target = r.RequestURI
	if s.target == "" || s.target[0] != '/' {
		s.target = r.URL.RequestURI()
	}
	s.e.Path = s.target
}

// finish ends the stream once the handler is done: timers stopped, the
// response code counted, the access log written, the stream pooled. An
// aborted stream panics with http.ErrAbortHandler last, the only way
// net/http offers to reset a stream whose response has started.
func (s *stream) finish() {
	if s.cancel != nil {
		s.cancel(context.Canceled)
	}
	s.idle.stop()
	if s.reqTimer != nil {
		s.reqTimer.Stop()
	}
	if s.msd != nil {
		s.msd.stop()
	}
	if s.unblock != nil {
		s.unblock.finish()
	}
	if s.body != nil {
		s.e.BytesReceived = s.body.n.Load()
	}
	s.e.Duration = time.Since(s.e.Start)
	s.cfg.stats.countCode(s.e.ResponseCode)
	if log := s.h.info.AccessLog; log != nil {
		log(s.e)
	}
	aborted := s.aborted
	s.release()
	if aborted {
		// Resets the HTTP/2 stream or closes the HTTP/1.1 connection;
		// net/http recovers this panic silently.
		panic(http.ErrAbortHandler)
	}
}

// serve runs the connection manager's part of a request in Envoy's
// order: timers, path normalization, header edits, route and cluster
// selection, the fault filter, then the route's action (direct response,
// redirect, or the router).
func (s *stream) serve() {
	r, cfg := s.r, s.cfg
	s.e.UserAgent = r.UserAgent()

	// Timers: stream_idle_timeout and request_timeout cancel the stream.
	s.ctx, s.cancel = context.WithCancelCause(s.rctx)
	s.idle.reset(s.cancel)
	if d := cfg.streamIdleTimeout; d > 0 {
		s.idle.arm(d)
	}
	hasBody := r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0
	if hasBody {
		s.body = &countingBody{rc: r.Body, idle: s.idle}
		r.Body = s.body
		s.unblock = newBodyUnblock(s.ctx, s.w, s.body)
		if r.ProtoMajor == 1 {
			// The body may still stream in while the response streams
			// out (a bidirectional exchange): net/http's HTTP/1.1 server
			// allows that only when told.
			_ = http.NewResponseController(s.w).EnableFullDuplex()
		}
	}
	if d := cfg.requestTimeout; d > 0 && hasBody {
		cancel := s.cancel
		s.reqTimer = time.AfterFunc(d, func() { cancel(errRequestTimeout) })
		s.body.done = s.reqTimer
	}

	// Envoy's codec refuses a request with more headers than
	// max_headers_count (431; HTTP/1.1 then closes, as after any
	// protocol error).
	if tooManyHeaders(r.Header, cfg.maxHeadersCount) {
		s.closeConn = r.ProtoMajor == 1
		s.e.ResponseFlags |= FlagDPE
		s.localReply(http.StatusRequestHeaderFieldsTooLarge, "", tooManyHeadersDetails(r))
		return
	}

	// CONNECT is an upgrade in Envoy's terms: it goes through only where
	// upgrade_configs list "CONNECT" and a connect_matcher route takes
	// it, else 403 upgrade_failed (or 404 without a route). The route's
	// connect_config terminates it (connect.go); without, it is forwarded
	// to an HTTP/1.1 upstream as a CONNECT, whose 2xx starts the tunnel.
	// HTTP/1.1 closes after any reply but the tunnel's 200: bytes a
	// client sends after its CONNECT are tunnel data, not requests.
	connect := isConnect(r)
	if connect {
		s.closeConn = r.ProtoMajor == 1
		s.e.Path = "" // a CONNECT has no :path
	}

	// Path handling comes first, as in Envoy: nothing may see the path
	// before it is normalized.
	if !connect && !s.normalizePath() {
		return
	}
	// The Upgrade a request asks for is read before the hop-by-hop
	// headers that carry it go; whether its route allows it is decided
	// once the route is known.
	upTyp, upOK := upgradeType(r, cfg.allowConnect)
	if connect {
		upTyp, upOK = http.MethodConnect, true
	}
	// Hop-by-hop headers, and those Connection names, go before the
	// proxy adds its own: a client naming X-Forwarded-For or
	// X-Request-Id in Connection must not make the proxy's values vanish
	// (the bug class of Traefik CVE-2024-45410).
	stripHopByHop(r.Header, true)
	s.prepareHeaders()

	routes := cfg.routes
	if routes == nil {
		routes = s.h.env.Routes(cfg.rdsName)
	}
	if !s.internal && routes != nil {
		// The rest of cleanInternalHeaders (prepareHeaders did the
		// x-envoy-* part): the route configuration's
		// internal_only_headers, before matching, as in Envoy.
		for _, k := range routes.internalOnly {
			delete(r.Header, k)
		}
	}
	var vh *VirtualHost
	var rt *Route
	if routes != nil {
		if vh = routes.findVHost(r); vh != nil {
			rt = vh.match(r, s.target)
		}
	}
	if rt != nil {
		s.e.RouteName = rt.Name
	}
	// An Upgrade (WebSocket) goes through only where upgrade_configs
	// allow its type, else 403 as Envoy answers (upgrade_failed).
	if upTyp != "" {
		if !upOK || !cfg.upgradeAllowed(rt, upTyp) {
			s.localReply(http.StatusForbidden, "", "upgrade_failed")
			return
		}
		s.upgrade = upTyp
	}
	s.armMaxDuration(rt)

	// The cluster is chosen with the route, so that filters (fault's
	// upstream_cluster) see it, as in Envoy.
	var clusterName string
	var wc *weightedCluster
	if rt != nil && rt.action == actionRoute {
		clusterName, wc = rt.pickCluster(r)
		s.e.UpstreamCluster = clusterName
	}

	// The RBAC and fault filters run in their http_filters order: an
	// abort before RBAC answers even a request RBAC would deny.
	if !cfg.filters.faultFirst && !s.authorize(rt, vh, routes) {
		return
	}
	if !s.applyFault(rt, vh, routes, clusterName) {
		return
	}
	if cfg.filters.faultFirst && !s.authorize(rt, vh, routes) {
		return
	}

	if rt == nil {
		cfg.stats.NoRoute.Add(1)
		s.e.ResponseFlags |= FlagNR
		s.localReply(http.StatusNotFound, "", "route_not_found")
		return
	}
	switch rt.action {
	case actionDirect:
		cfg.stats.RqDirectResponse.Add(1)
		s.directResponse(routes, vh, rt)
	case actionRedirect:
		cfg.stats.RqRedirect.Add(1)
		s.redirect(routes, vh, rt)
	default:
		if connect && rt.connectTerminate {
			s.terminateConnect(routes, vh, rt, clusterName, wc)
			return
		}
		s.proxy(routes, vh, rt, clusterName, wc)
	}
}

// tooManyHeadersDetails is Envoy's response code details for a request
// over max_headers_count, by codec.
func tooManyHeadersDetails(r *http.Request) string {
	if r.ProtoMajor == 2 {
		return "http2.too_many_headers"
	}
	return "http1.too_many_headers"
}

// perRoute finds the most specific typed_per_filter_config of a filter.
func perRoute(name string, rt *Route, vh *VirtualHost, routes *Routes) (*faultConfig, bool) {
	if rt != nil {
		if f, ok := rt.faults.lookup(name); ok {
			return f, true
		}
	}
	if vh != nil {
		if f, ok := vh.faults.lookup(name); ok {
			return f, true
		}
	}
	if routes != nil {
		return routes.faults.lookup(name)
	}
	return nil, false
}

// pickCluster resolves the route's cluster_specifier for one request.
func (rt *Route) pickCluster(r *http.Request) (string, *weightedCluster) {
	switch {
	case rt.cluster != "":
		return rt.cluster, nil
	case rt.clusterHeader != "":
		return firstOf(r.Header[rt.clusterHeader]), nil
	}
	x := uint32((uint64(rand.Uint32()) * uint64(rt.totalWeight)) >> 32)
	for i := range rt.weighted {
		w := &rt.weighted[i]
		if x < w.weight {
			if w.header != "" {
				return firstOf(r.Header[w.header]), w
			}
			return w.name, w
		}
		x -= w.weight
	}
	w := &rt.weighted[len(rt.weighted)-1]
	return w.name, w
}

// applyFault runs the fault filter (with the route's override): it may
// delay the request, or abort it (false: the stream is answered).
func (s *stream) applyFault(rt *Route, vh *VirtualHost, routes *Routes, clusterName string) bool {
	r, cfg := s.r, s.cfg
	if f := cfg.filters.fault; cfg.filters.faultName != "" {
		if pf, ok := perRoute(cfg.filters.faultName, rt, vh, routes); ok {
			f = pf
		}
		if f != nil {
			res, err := f.apply(s.ctx, r, clusterName)
			if err != nil {
				s.failStream(err)
				return false
			}
			if res.delayed {
				s.e.ResponseFlags |= FlagDI
				cfg.stats.FaultDelays.Add(1)
			}
			if res.abort != 0 {
				s.e.ResponseFlags |= FlagFI
				cfg.stats.FaultAborts.Add(1)
				s.faultAbort(res)
				return false
			}
		}
	}
	return true
}
