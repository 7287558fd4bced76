package httpconn

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshtun/meshtun/mesh/cluster"
)

var (
	errStreamIdle     = errors.New("stream idle timeout")
	errRequestTimeout = errors.New("request timeout")
)

// maxRetryBuffer is how much of a request body is kept to replay it on a
// retry (Envoy's per-connection buffer limit, 1 MiB); a larger body is
// streamed and not retried.
const maxRetryBuffer = 1 << 20

// stream is one request/response exchange. Streams are pooled.
type stream struct {
	h    *connHandler
	cfg  *Config
	w    http.ResponseWriter
	r    *http.Request
	e    Entry
	body *countingBody

	ctx         context.Context // cancelled by idle/request timeouts and the downstream
	cancel      context.CancelCauseFunc
	curPolicy   *retryPolicy
	reqTimer    *time.Timer
	unblock     *bodyUnblock // a request with a body: how timeouts end a stalled read
	wroteHeader bool
	aborted     bool
	internal    bool   // Envoy's internal request (x-envoy-internal set)
	target      string // request target: path and query

	streamReuse // kept when pooled (streampool.go)
}

func (s *stream) init(h *connHandler, w http.ResponseWriter, r *http.Request) {
	keep := s.streamReuse
	if keep.idle == nil {
		keep.idle = new(idleWatch)
	}
	*s = stream{h: h, cfg: h.cfg, w: w, r: r, streamReuse: keep}
	s.e = Entry{
		Start:           time.Now(),
		Method:          r.Method,
		Authority:       r.Host,
		Protocol:        r.Proto,
		DownstreamPeer:  h.info.Peer,
		DownstreamLocal: h.info.Local,
	}
	s.target = r.RequestURI
	if s.target == "" || s.target[0] != '/' {
		s.target = r.URL.RequestURI()
	}
	s.e.Path = s.target
}

func (s *stream) finish() {
	if s.cancel != nil {
		s.cancel(context.Canceled)
	}
	s.idle.stop()
	if s.reqTimer != nil {
		s.reqTimer.Stop()
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

func (s *stream) serve() {
	r, cfg := s.r, s.cfg
	s.e.UserAgent = r.UserAgent()

	// Timers: stream_idle_timeout and request_timeout cancel the stream.
	s.ctx, s.cancel = context.WithCancelCause(r.Context())
	s.idle.reset(s.cancel)
	if d := cfg.streamIdleTimeout; d > 0 {
		s.idle.arm(d)
	}
	hasBody := r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0
	if hasBody {
		s.body = &countingBody{rc: r.Body, idle: s.idle}
		r.Body = s.body
		s.unblock = newBodyUnblock(s.ctx, s.w, s.body)
	}
	if d := cfg.requestTimeout; d > 0 && hasBody {
		cancel := s.cancel
		s.reqTimer = time.AfterFunc(d, func() { cancel(errRequestTimeout) })
		s.body.done = s.reqTimer
	}

	// Path handling comes first, as in Envoy: nothing may see the path
	// before it is normalized.
	if !s.normalizePath() {
		return
	}
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

	// The cluster is chosen with the route, so that filters (fault's
	// upstream_cluster) see it, as in Envoy.
	var clusterName string
	var wc *weightedCluster
	if rt != nil && rt.action == actionRoute {
		clusterName, wc = rt.pickCluster(r)
		s.e.UpstreamCluster = clusterName
	}

	if f := cfg.filters.fault; cfg.filters.faultName != "" {
		if pf, ok := perRoute(cfg.filters.faultName, rt, vh, routes); ok {
			f = pf
		}
		if f != nil {
			res, err := f.apply(s.ctx, r, clusterName)
			if err != nil {
				s.failStream(err)
				return
			}
			if res.delayed {
				s.e.ResponseFlags |= FlagDI
				cfg.stats.FaultDelays.Add(1)
			}
			if res.abort != 0 {
				s.e.ResponseFlags |= FlagFI
				cfg.stats.FaultAborts.Add(1)
				s.faultAbort(res)
				return
			}
		}
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
		s.proxy(routes, vh, rt, clusterName, wc)
	}
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

// failStream answers a stream whose context ended before a response.
func (s *stream) failStream(err error) {
	switch context.Cause(s.ctx) {
	case errStreamIdle:
		s.cfg.stats.DownstreamRqIdle.Add(1)
		s.e.ResponseFlags |= FlagSI
		s.localReply(http.StatusRequestTimeout, "stream timeout", "stream_idle_timeout")
	case errRequestTimeout:
		s.cfg.stats.DownstreamRqTimeout.Add(1)
		s.localReply(http.StatusRequestTimeout, "request timeout", "request_overall_timeout")
	default:
		s.e.ResponseFlags |= FlagDC
		s.e.ResponseCodeDetails = "downstream_remote_disconnect"
		if s.wroteHeader {
			s.abort()
		}
	}
}

func (s *stream) faultAbort(res faultResult) {
	if res.grpc >= 0 {
		h := s.w.Header()
		s.setServer(h)
		h["Content-Type"] = []string{"application/grpc"}
		h["Grpc-Status"] = []string{strconv.Itoa(res.grpc)}
		h["Grpc-Message"] = []string{res.body}
		s.e.ResponseCodeDetails = "fault_filter_abort"
		s.writeHeader(http.StatusOK)
		return
	}
	s.localReply(res.abort, res.body, "fault_filter_abort")
}

// prepareHeaders applies the connection manager's request edits that do
// not depend on the route: x-request-id, x-forwarded-for/-proto, host
// port stripping.
func (s *stream) prepareHeaders() {
	r, cfg := s.r, s.cfg
	h := r.Header
	if vs := h["X-Request-Id"]; len(vs) > 0 && vs[0] != "" {
		s.e.RequestID = vs[0]
	} else if cfg.generateRequestID {
		s.e.RequestID = newUUID()
		h["X-Request-Id"] = []string{s.e.RequestID}
	}
	s.internal = cfg.mutateForwarded(h, s.h.info.Peer.Addr())
	if vs := h["X-Forwarded-For"]; len(vs) > 0 {
		s.e.XFF = vs[0]
	}
	switch {
	case cfg.stripAnyHostPort:
		r.Host = stripPort(r.Host)
	case cfg.stripMatchingHostPort && s.h.info.Local.IsValid():
		if p := strings.TrimPrefix(r.Host[len(stripPort(r.Host)):], ":"); p == strconv.Itoa(int(s.h.info.Local.Port())) {
			r.Host = stripPort(r.Host)
		}
	}
}

// mutateForwarded applies Envoy's x-forwarded-for, x-forwarded-proto,
// x-envoy-external-address and x-envoy-internal rules
// (config_http_conn_man_headers_x-forwarded-for) for a request from peer:
//
//   - The trusted client address: with use_remote_address, the peer, or
//     with xff_num_trusted_hops N > 0 the N-th XFF address from the right;
//     without, the (N+1)-th from the right (the peer if XFF is shorter).
//   - The request is internal, with use_remote_address, iff it has no XFF
//     and the peer is internal (RFC 1918, RFC 4193, loopback); without, iff
//     XFF is one internal address. x-envoy-internal: true is set on
//     internal requests and removed from external ones.
//   - Only with use_remote_address is XFF appended to (the peer, unless
//     skip_xff_append) and x-envoy-external-address set, to the trusted
//     client address of an external request; x-forwarded-proto is then
//     overwritten (http: downstream connections are cleartext) unless a
//     trusted hop (N > 0) set it. Otherwise XFF is left as it came and
//     x-forwarded-proto only added when missing.
//   - A request that is not internal loses the x-envoy-* headers that
//     steer Envoy (cleanInternalHeaders): a client outside must not pick
//     its own retries or timeouts.
//
// It reports whether the request is internal. Without XFF and
// use_remote_address (a mesh sidecar's usual request) it allocates
// nothing.
func (c *Config) mutateForwarded(h http.Header, peer netip.Addr) (internal bool) {
	n := int(c.xffTrustedHops)
	var xff string
	switch vs := h["X-Forwarded-For"]; len(vs) {
	case 0:
	case 1:
		xff = vs[0]
	default:
		xff = strings.Join(vs, ",")
	}
	if c.useRemoteAddress {
		internal = xff == "" && peer.IsValid() && isInternalAddr(peer)
		if !internal {
			trusted := ""
			if n > 0 {
				trusted, _ = xffFromRight(xff, n)
			}
			if trusted == "" && peer.IsValid() {
				trusted = peer.Unmap().String()
			}
			if trusted != "" {
				h["X-Envoy-External-Address"] = []string{trusted}
			}
		}
		if !c.skipXFFAppend && peer.IsValid() {
			ip := peer.Unmap().String()
			if xff != "" {
				ip = xff + "," + ip
			}
			h["X-Forwarded-For"] = []string{ip}
		}
		if _, ok := h["X-Forwarded-Proto"]; n == 0 || !ok {
			h["X-Forwarded-Proto"] = []string{"http"}
		}
	} else {
		if xff != "" && strings.IndexByte(xff, ',') < 0 {
			a, err := netip.ParseAddr(strings.TrimSpace(xff))
			internal = err == nil && isInternalAddr(a)
		}
		if _, ok := h["X-Forwarded-Proto"]; !ok {
			h["X-Forwarded-Proto"] = []string{"http"}
		}
	}
	if internal {
		h["X-Envoy-Internal"] = []string{"true"}
	} else {
		delete(h, "X-Envoy-Internal")
		cleanInternalHeaders(h, c.useRemoteAddress)
	}
	return internal
}

// cleanInternalHeaders is Envoy's ConnectionManagerUtility::
// cleanInternalHeaders for a request that is not internal: it removes the
// x-envoy-* request headers that tell Envoy (this router, or an Envoy
// further on) how to retry, time out, trace or account the request, which
// only a trusted, internal hop may set; and, for an edge request (edge:
// use_remote_address), the decorator and downstream-service ones. The
// route configuration's internal_only_headers are removed by the stream
// (they depend on the route configuration). One pass over the request's
// keys with a prefix test, so a request without x-envoy-* headers pays a
// few comparisons, not a delete per name.
func cleanInternalHeaders(h http.Header, edge bool) {
	const prefix = "X-Envoy-"
	for k := range h {
		if len(k) <= len(prefix) || k[:len(prefix)] != prefix {
			continue
		}
		switch k[len(prefix):] {
		case "Retriable-Status-Codes", "Retriable-Header-Names",
			"Retry-On", "Retry-Grpc-On", "Max-Retries",
			"Upstream-Alt-Stat-Name",
			"Upstream-Rq-Timeout-Ms", "Upstream-Rq-Per-Try-Timeout-Ms",
			"Upstream-Rq-Timeout-Alt-Response", "Expected-Rq-Timeout-Ms",
			"Force-Trace", "Ip-Tags", "Original-Url", "Hedge-On-Per-Try-Timeout":
			delete(h, k)
		case "Decorator-Operation", "Downstream-Service-Cluster", "Downstream-Service-Node":
			if edge {
				delete(h, k)
			}
		}
	}
}

// xffFromRight returns the n-th (1-based) address of a comma-separated
// XFF from the right, or false if XFF has fewer.
func xffFromRight(xff string, n int) (string, bool) {
	if xff == "" || n < 1 {
		return "", false
	}
	for i := 1; ; i++ {
		j := strings.LastIndexByte(xff, ',')
		if i == n {
			return strings.TrimSpace(xff[j+1:]), true
		}
		if j < 0 {
			return "", false
		}
		xff = xff[:j]
	}
}

// isInternalAddr is Envoy's default internal address test: RFC 1918 and
// RFC 4193 (unique local) addresses and loopback.
func isInternalAddr(a netip.Addr) bool {
	a = a.Unmap()
	return a.IsPrivate() || a.IsLoopback()
}

// newUUID returns a random (version 4) UUID, as Envoy's x-request-id.
func newUUID() string {
	var b [16]byte
	hi, lo := rand.Uint64(), rand.Uint64()
	for i := 0; i < 8; i++ {
		b[i], b[8+i] = byte(hi>>(8*i)), byte(lo>>(8*i))
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	const hex = "0123456789abcdef"
	var out [36]byte
	j := 0
	for i, c := range b {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			out[j] = '-'
			j++
		}
		out[j], out[j+1] = hex[c>>4], hex[c&0xf]
		j += 2
	}
	return string(out[:])
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

func (s *stream) responseHeaderOps(h http.Header, routes *Routes, vh *VirtualHost, rt *Route, wc *weightedCluster) {
	fc := &formatCtx{r: s.r, down: &s.h.info, proto: s.r.Proto, requestID: s.e.RequestID, authority: s.r.Host, routeName: s.e.RouteName, clusterNam: s.e.UpstreamCluster}
	levels := [4]*headerOps{}
	if wc != nil {
		levels[0] = wc.rspOps
	}
	levels[1], levels[2], levels[3] = rt.rspOps, vh.rspOps, routes.rspOps
	applyLevels(levels, routes.mostSpecific, h, nil, fc)
}

// applyLevels applies header edits from the most to the least specific
// level (weighted cluster, route, virtual host, route configuration), so
// a less specific level has the last word, as Envoy by default; with
// most_specific_header_mutations_wins the order is reversed.
func applyLevels(levels [4]*headerOps, mostSpecificWins bool, h http.Header, host *string, fc *formatCtx) {
	if mostSpecificWins {
		for i := len(levels) - 1; i >= 0; i-- {
			levels[i].apply(h, host, fc)
		}
		return
	}
	for _, l := range levels {
		l.apply(h, host, fc)
	}
}

func (s *stream) directResponse(routes *Routes, vh *VirtualHost, rt *Route) {
	h := s.w.Header()
	s.setServer(h)
	s.responseHeaderOps(h, routes, vh, rt, nil)
	body := rt.direct.body
	if body != "" {
		h["Content-Type"] = []string{"text/plain"}
		h["Content-Length"] = []string{strconv.Itoa(len(body))}
	}
	s.e.ResponseCodeDetails = "direct_response"
	s.writeHeader(rt.direct.status)
	if body != "" && s.r.Method != http.MethodHead {
		n, _ := io.WriteString(s.w, body)
		s.e.BytesSent += int64(n)
	}
}

func (s *stream) redirect(routes *Routes, vh *VirtualHost, rt *Route) {
	rd := &rt.redirect
	path, query, hasQuery := strings.Cut(s.target, "?")
	scheme := "http"
	if rd.scheme != "" {
		scheme = rd.scheme
	}
	host := s.r.Host
	if rd.host != "" {
		host = rd.host
	}
	switch {
	case rd.port != "":
		host = stripPort(host) + ":" + rd.port
	case rd.scheme != "" && rd.scheme != "http":
		// Envoy drops the default port of the original scheme.
		if strings.HasSuffix(host, ":80") {
			host = stripPort(host)
		}
	}
	switch {
	case rd.path != "":
		if p, q, ok := strings.Cut(rd.path, "?"); ok {
			path, query, hasQuery = p, q, q != ""
		} else {
			path = rd.path
		}
	case rd.prefix != "":
		repl := rd.prefix
		if repl == "\x00" {
			repl = ""
		}
		path = repl + path[min(len(rt.path), len(path)):]
	case rd.regex != nil:
		path = rd.regex.ReplaceAllString(path, rd.regexSubst)
	}
	if rd.stripQuery {
		hasQuery = false
	}
	loc := scheme + "://" + host + path
	if hasQuery {
		loc += "?" + query
	}
	h := s.w.Header()
	s.setServer(h)
	s.responseHeaderOps(h, routes, vh, rt, nil)
	h["Location"] = []string{loc}
	s.e.ResponseCodeDetails = "direct_response"
	s.writeHeader(rd.code)
}

// rewritePath returns the upstream request target after prefix_rewrite
// or regex_rewrite (ok=false when unchanged).
func (rt *Route) rewritePath(target string) (string, bool) {
	if rt.prefixRewrite == "" && rt.regexRewrite == nil {
		return target, false
	}
	path, query, hasQuery := strings.Cut(target, "?")
	if rt.regexRewrite != nil {
		path = rt.regexRewrite.ReplaceAllString(path, rt.regexSubst)
	} else if rt.pathKind == pathPrefix || rt.pathKind == pathSeparatedPrefix {
		path = rt.prefixRewrite + path[min(len(rt.path), len(path)):]
	} else {
		path = rt.prefixRewrite
	}
	if hasQuery {
		return path + "?" + query, true
	}
	return path, true
}

// countingBody is the downstream request body: it counts bytes, touches
// the idle timer, stops request_timeout at its end, and remembers a read
// error (a malformed body is the client's fault: 400).
type countingBody struct {
	rc   io.ReadCloser
	n    atomic.Int64
	idle *idleWatch
	done *time.Timer
	err  error
	mu   sync.Mutex

	// ended is set once a read returned an error (io.EOF included): the
	// idle watch then no longer needs to unblock a read.
	ended atomic.Bool
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	b.n.Add(int64(n))
	b.idle.touch()
	if err != nil {
		b.ended.Store(true)
		if err == io.EOF {
			if b.done != nil {
				b.done.Stop()
			}
		} else {
			b.mu.Lock()
			b.err = err
			b.mu.Unlock()
		}
	}
	return n, err
}

func (b *countingBody) Close() error { return b.rc.Close() }

func (b *countingBody) readErr() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

// proxy is the router: it sends the request to a host of the cluster,
// with retries, timeouts and circuit breakers, and relays the response.
func (s *stream) proxy(routes *Routes, vh *VirtualHost, rt *Route, clusterName string, wc *weightedCluster) {
	cfg, r, env := s.cfg, s.r, s.h.env
	cl := env.Cluster(clusterName)
	if clusterName == "" || cl == nil {
		cfg.stats.NoCluster.Add(1)
		s.e.ResponseFlags |= FlagNC
		s.localReply(rt.notFoundCode, "", "cluster_not_found")
		return
	}
	cp, err := env.Pools().get(cl, env.ClusterHTTP(clusterName))
	if err != nil {
		s.e.ResponseFlags |= FlagUO
		s.localReply(http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: overflow", "upstream_reset_before_response_started{overflow}")
		return
	}
	stats := cp.stats

	// The upstream request's headers, built once for every attempt.
	hdr := r.Header.Clone()
	if hdr == nil {
		hdr = http.Header{}
	}
	stripHopByHop(hdr, true)
	delete(hdr, "Expect") // 100-continue is answered downstream (Envoy's default)
	authority := r.Host
	if wc != nil && wc.hostRewrite != "" {
		authority = wc.hostRewrite
	} else if rt.hostRewrite != "" {
		authority = rt.hostRewrite
	}
	fc := &formatCtx{r: r, down: &s.h.info, proto: r.Proto, requestID: s.e.RequestID, authority: r.Host, routeName: rt.Name, clusterNam: clusterName}
	levels := [4]*headerOps{nil, rt.reqOps, vh.reqOps, routes.reqOps}
	if wc != nil {
		levels[0] = wc.reqOps
	}
	applyLevels(levels, routes.mostSpecific, hdr, &authority, fc)
	target, rewritten := rt.rewritePath(s.target)
	if rewritten && !cfg.filters.suppressEnvoy {
		hdr["X-Envoy-Original-Path"] = []string{s.target}
	}
	if _, ok := hdr["User-Agent"]; !ok {
		hdr["User-Agent"] = nil // present and empty: Go's client adds none
	}
	policy := rt.retry
	if policy == nil {
		policy = vh.retry
	}
	timeout := rt.timeout
	if s.internal {
		// Only an internal request can still carry them.
		timeout, policy = requestOverrides(hdr, timeout, policy)
	}
	s.curPolicy = policy
	if !cfg.filters.suppressEnvoy {
		// Envoy's expected timeout: the per-try timeout, else the
		// global one.
		t := timeout
		if policy != nil && policy.perTry > 0 && (t == 0 || policy.perTry < t) {
			t = policy.perTry
		}
		if t > 0 {
			hdr["X-Envoy-Expected-Rq-Timeout-Ms"] = []string{strconv.FormatInt(t.Milliseconds(), 10)}
		}
	}

	// The body streams upstream as it arrives; a copy is kept so that a
	// retry can replay it (up to maxRetryBuffer: beyond, the request is no
	// longer retriable, retry_or_shadow_abandoned) or, without retries, so
	// that a request caught by a dead keep-alive connection can be resent
	// (up to resendBuffer).
	numRetries := 0
	if policy != nil {
		numRetries = policy.numRetries
	}
	var rb *retryBody
	if s.body != nil {
		if numRetries > 0 {
			rb = newRetryBody(s.body, maxRetryBuffer, &stats.RetryOrShadowAbandoned)
		} else {
			rb = newRetryBody(s.body, resendBuffer, nil)
		}
	}
	replayable := func() bool { return rb == nil || rb.replayable() }

	gctx := s.ctx
	var routeDeadline int64 // nanotime; 0: no route timeout
	if timeout > 0 {
		// The route timeout cancels gctx from the stream's reusable timer
		// (context.WithTimeout would make a timer and a timer context per
		// request). gctx has no Deadline; nothing reads it.
		var gcancel context.CancelCauseFunc
		gctx, gcancel = context.WithCancelCause(s.ctx)
		if s.rto == nil {
			s.rto = new(deadlineTimer)
		}
		routeDeadline = nanotime() + int64(timeout)
		s.rto.start(timeout, gcancel)
		defer func() {
			s.rto.stop()
			gcancel(context.Canceled)
		}()
	}
	if rt.idleTimeout >= 0 {
		// The route's idle_timeout replaces the connection manager's for
		// this stream, also when that one is disabled.
		s.idle.arm(rt.idleTimeout)
	}

	tr := cp.transportFor(r.ProtoMajor)
	h1, _ := tr.(*h1Transport)
	var exclude func(*cluster.Host) bool
	for attempt := 1; ; attempt++ {
		s.e.Attempts = attempt
		if attempt > 1 {
			// The previous attempt's writer may still read its headers.
			hdr = hdr.Clone()
		}
		h, err := cl.PickHostFor(s.h.info.Local, exclude)
		if err != nil {
			s.e.ResponseFlags |= FlagUH
			s.localReply(http.StatusServiceUnavailable, "no healthy upstream", "no_healthy_upstream")
			return
		}
		s.e.UpstreamHost = h.Address()
		relRq, ok := cl.TryAcquireRequest()
		if !ok {
			s.overflow()
			return
		}
		if vh.attemptReq {
			hdr["X-Envoy-Attempt-Count"] = []string{strconv.Itoa(attempt)}
		}
		actx, acancel := gctx, context.CancelFunc(nil)
		if policy != nil && policy.perTry > 0 {
			if routeDeadline != 0 && routeDeadline-nanotime() < int64(policy.perTry) {
				// The route timeout comes first: as WithTimeout does
				// under a parent with an earlier deadline.
				actx, acancel = context.WithCancel(gctx)
			} else {
				actx, acancel = context.WithTimeout(gctx, policy.perTry)
			}
		}
		hc := cp.host(h)
		hc.active.Add(1)
		done := func(o cluster.RequestOutcome) {
			hc.active.Add(-1)
			h.EndRequest(o)
			relRq()
			if acancel != nil {
				acancel()
			}
		}
		var out *http.Request
		if h1 != nil {
			// The h1 transport is done with the previous attempt's
			// request (synchronous): the stream's own is reused.
			if s.h1s == nil {
				s.h1s = new(h1Scratch)
			}
			sc := s.h1s
			sc.url = url.URL{Scheme: "http", Host: sc.hostString(h.Address())}
			sc.req = http.Request{
				Method:     r.Method,
				URL:        &sc.url,
				Proto:      "HTTP/1.1",
				ProtoMajor: 1,
				ProtoMinor: 1,
				Header:     hdr,
				Host:       authority,
			}
			out = &sc.req
		} else {
			out = &http.Request{
				Method:     r.Method,
				URL:        &url.URL{Scheme: "http", Host: h.Address().String()},
				Proto:      "HTTP/1.1",
				ProtoMajor: 1,
				ProtoMinor: 1,
				Header:     hdr,
				Host:       authority,
			}
		}
		setTarget(out.URL, target)
		if rb != nil {
			a, ok := rb.attempt()
			if !ok { // not replayable since the retry was decided
				h.BeginRequest()
				done(cluster.RequestError)
				s.e.ResponseFlags |= FlagUR
				s.localReply(http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: retry buffer overflow", "upstream_reset_before_response_started{retry_buffer_overflow}")
				return
			}
			out.Body, out.GetBody = a, rb.getBody
			out.ContentLength = r.ContentLength
			if out.ContentLength <= 0 {
				out.ContentLength = -1
				out.TransferEncoding = []string{"chunked"}
			}
		}
		h.BeginRequest()
		sent := time.Now()
		var resp *http.Response
		if h1 != nil {
			resp, err = h1.roundTrip(actx, out, h, &s.h1s.body)
		} else {
			resp, err = s.roundTripH2(tr, out, actx, cl, hc, h)
		}
		if err != nil {
			retriable, flag, code, msg, details, outcome := s.classify(err, gctx, actx, stats)
			done(outcome)
			if flag == 0 { // the stream ended (downstream gone, timeout, bad body)
				return
			}
			if retriable && policy != nil && replayable() {
				if attempt <= numRetries {
					if s.retry(cl, policy, attempt, &s.tried, &exclude, h) {
						continue
					}
				} else {
					s.e.ResponseFlags |= FlagURX
					stats.RqRetryLimitExceeded.Add(1)
				}
			}
			s.e.ResponseFlags |= flag
			s.localReply(code, msg, details)
			return
		}
		stats.CountResponse(resp.StatusCode)
		if policy != nil && policy.retriableResponse(resp.StatusCode, resp.Header) {
			if attempt <= numRetries && replayable() {
				if s.retry(cl, policy, attempt, &s.tried, &exclude, h) {
					drain(resp.Body)
					done(outcomeOf(resp.StatusCode))
					continue
				}
			} else if attempt > numRetries {
				s.e.ResponseFlags |= FlagURX
				stats.RqRetryLimitExceeded.Add(1)
			}
		} else if attempt > 1 {
			stats.RqRetrySuccess.Add(1)
		}
		s.e.UpstreamServiceTime = time.Since(sent)
		outcome := s.relay(resp, routes, vh, rt, wc, gctx, stats)
		done(outcome)
		return
	}
}

// roundTripH2 sends one attempt over the cluster's h2c transport. The
// request is pending (max_pending_requests) only while the host has no
// established connection to multiplex it on (the h1 transport decides for
// itself: a pending request is one that must dial); the client trace
// ends the pending state and tells the dial coalescer that the request
// has its connection.
func (s *stream) roundTripH2(tr http.RoundTripper, out *http.Request, actx context.Context, cl *cluster.Cluster, hc *hostConns, h *cluster.Host) (*http.Response, error) {
	var relPending func()
	if hc.open.Load() == 0 {
		rel, ok := cl.TryAcquirePending()
		if !ok {
			return nil, errPendingOverflow
		}
		relPending = rel
	}
	hc.waiting.Add(1)
	var gotConn atomic.Bool
	connected := func() {
		if gotConn.CompareAndSwap(false, true) {
			hc.waiting.Add(-1)
			if relPending != nil {
				relPending()
			}
		}
	}
	ctx := context.WithValue(actx, hostKey{}, h)
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(httptrace.GotConnInfo) { connected() }})
	resp, err := tr.RoundTrip(out.WithContext(ctx))
	connected()
	return resp, err
}

func outcomeOf(code int) cluster.RequestOutcome {
	if code >= 500 {
		return cluster.RequestError
	}
	return cluster.RequestSuccess
}

// setTarget sets the upstream URL's path and query from the request
// target without re-encoding it.
func setTarget(u *url.URL, target string) {
	p, q, _ := strings.Cut(target, "?")
	u.RawQuery = q
	if strings.HasPrefix(p, "//") || p == "" || p[0] != '/' {
		if pp, err := url.PathUnescape(p); err == nil {
			u.Path, u.RawPath = pp, p
			return
		}
	}
	u.Opaque = p
}

func drain(b io.ReadCloser) {
	_, _ = io.CopyN(io.Discard, b, 64<<10)
	b.Close()
}

func (s *stream) overflow() {
	s.e.ResponseFlags |= FlagUO
	s.localReply(http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: overflow", "upstream_reset_before_response_started{overflow}")
}

func (s *stream) requestBodyError(err error) {
	if s.ctx.Err() != nil {
		s.failStream(err)
		return
	}
	s.e.ResponseFlags |= FlagDPE
	s.localReply(http.StatusBadRequest, "", "downstream_protocol_error")
}

// retry decides whether another attempt may go, takes a retry from the
// max_retries breaker (upstream_rq_retry) and waits the back-off.
func (s *stream) retry(cl *cluster.Cluster, p *retryPolicy, attempt int, tried *[]*cluster.Host, exclude *func(*cluster.Host) bool, h *cluster.Host) bool {
	rel, ok := cl.TryAcquireRetry()
	if !ok {
		return false
	}
	defer rel()
	if p.previousHosts {
		*tried = append(*tried, h)
		if *exclude == nil {
			t := tried
			*exclude = func(x *cluster.Host) bool {
				for _, y := range *t {
					if x == y {
						return true
					}
				}
				return false
			}
		}
	}
	t := time.NewTimer(p.backoff(attempt - 1))
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.ctx.Done():
		return false
	}
}

// classify maps a RoundTrip error to Envoy's outcome. flag 0 means the
// stream already ended (its reply, if any, is sent).
func (s *stream) classify(err error, gctx, actx context.Context, stats *cluster.HTTPStats) (retriable bool, flag Flags, code int, msg, details string, outcome cluster.RequestOutcome) {
	const prefix = "upstream connect error or disconnect/reset before headers. "
	if s.body != nil {
		if berr := s.body.readErr(); berr != nil && s.ctx.Err() == nil {
			s.requestBodyError(berr)
			return false, 0, 0, "", "", cluster.RequestError
		}
	}
	switch {
	case s.ctx.Err() != nil:
		s.failStream(err)
		return false, 0, 0, "", "", cluster.RequestError
	case gctx.Err() != nil:
		stats.RqTimeout.Add(1)
		s.e.ResponseFlags |= FlagUT
		s.localReply(http.StatusGatewayTimeout, "upstream request timeout", "upstream_response_timeout")
		return false, 0, 0, "", "", cluster.RequestTimeout
	case actx.Err() != nil:
		stats.RqPerTryTimeout.Add(1)
		p := s.policy()
		return p != nil && p.retriableTimeout(), FlagUT, http.StatusGatewayTimeout, "upstream request timeout", "upstream_per_try_timeout", cluster.RequestTimeout
	case errors.Is(err, cluster.ErrOverflow), errors.Is(err, errPendingOverflow):
		return false, FlagUO, http.StatusServiceUnavailable, prefix + "reset reason: overflow", "upstream_reset_before_response_started{overflow}", cluster.RequestError
	case errors.Is(err, cluster.ErrNoHealthyUpstream):
		return false, FlagUH, http.StatusServiceUnavailable, "no healthy upstream", "no_healthy_upstream", cluster.RequestError
	}
	var ce *cluster.ConnectError
	if errors.As(err, &ce) {
		m := prefix + "reset reason: connection failure, transport failure reason: " + ce.Err.Error()
		return s.retriableReset(true), FlagUF, http.StatusServiceUnavailable, m, "upstream_reset_before_response_started{connection_failure}", cluster.RequestError
	}
	stats.RqRxReset.Add(1)
	return s.retriableReset(false), FlagUC, http.StatusServiceUnavailable, prefix + "reset reason: connection termination", "upstream_reset_before_response_started{connection_termination}", cluster.RequestError
}

// retriableReset is filled in by proxy through the route's policy; here
// it only reports whether a policy exists (checked again by the caller).
func (s *stream) retriableReset(connectFailure bool) bool {
	p := s.policy()
	return p != nil && p.retriableReset(connectFailure)
}

func (s *stream) policy() *retryPolicy { return s.curPolicy }

// relay sends the upstream response downstream.
func (s *stream) relay(resp *http.Response, routes *Routes, vh *VirtualHost, rt *Route, wc *weightedCluster, gctx context.Context, stats *cluster.HTTPStats) cluster.RequestOutcome {
	defer resp.Body.Close()
	h := s.w.Header()
	for k, vs := range resp.Header {
		h[k] = vs
	}
	stripHopByHop(h, false)
	if resp.ContentLength >= 0 && s.r.Method != http.MethodHead {
		h["Content-Length"] = []string{strconv.FormatInt(resp.ContentLength, 10)}
	}
	s.responseHeaderOps(h, routes, vh, rt, wc)
	if !s.cfg.filters.suppressEnvoy {
		h["X-Envoy-Upstream-Service-Time"] = []string{strconv.FormatInt(s.e.UpstreamServiceTime.Milliseconds(), 10)}
	}
	if vh.attemptRsp {
		h["X-Envoy-Attempt-Count"] = []string{strconv.Itoa(s.e.Attempts)}
	}
	if s.cfg.alwaysSetRequestID && s.e.RequestID != "" {
		h["X-Request-Id"] = []string{s.e.RequestID}
	}
	s.setServer(h)
	s.e.ResponseCodeDetails = "via_upstream"
	s.writeHeader(resp.StatusCode)
	outcome := outcomeOf(resp.StatusCode)

	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	rc := http.NewResponseController(s.w)
	var total int64
	for {
		n, rerr := resp.Body.Read(buf)
		total += int64(n)
		if rerr == nil && total == resp.ContentLength {
			// Read the EOF before the last bytes go out: it returns the
			// upstream connection to its pool, so the client's next
			// request (sent as soon as it has this response) finds it.
			var m int
			m, rerr = resp.Body.Read(buf[n:])
			n += m
			total += int64(m)
		}
		if n > 0 {
			s.idle.touch()
			w, werr := s.w.Write(buf[:n])
			s.e.BytesSent += int64(w)
			if werr != nil {
				s.e.ResponseFlags |= FlagDC
				s.e.ResponseCodeDetails = "downstream_remote_disconnect"
				stats.RqTxReset.Add(1)
				return outcome
			}
			_ = rc.Flush()
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			switch {
			case s.ctx.Err() != nil:
				if context.Cause(s.ctx) == errStreamIdle {
					s.e.ResponseFlags |= FlagSI
					s.cfg.stats.DownstreamRqIdle.Add(1)
				} else {
					s.e.ResponseFlags |= FlagDC
				}
			case gctx.Err() != nil:
				s.e.ResponseFlags |= FlagUT
				stats.RqTimeout.Add(1)
				outcome = cluster.RequestTimeout
			default:
				s.e.ResponseFlags |= FlagUR
				stats.RqRxReset.Add(1)
				outcome = cluster.RequestError
			}
			s.e.ResponseCodeDetails = "upstream_reset_after_response_started"
			s.abort()
			return outcome
		}
	}
	for k, vs := range resp.Trailer {
		h[http.TrailerPrefix+k] = vs
	}
	return outcome
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}
