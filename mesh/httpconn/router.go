package httpconn

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/meshtun/meshtun/mesh/cluster"
)

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

// forwarding is what the router decides once for a request and every
// attempt shares: where it goes, what is sent, and how it is retried and
// timed. It lives on proxy's stack; the steps take a pointer to it.
type forwarding struct {
	routes *Routes
	vh     *VirtualHost
	rt     *Route
	wc     *weightedCluster // the weighted cluster picked, if any

	name  string // the cluster's
	cl    *cluster.Cluster
	cp    *clusterPool
	stats *cluster.HTTPStats
	tr    http.RoundTripper
	h1    *h1Transport // tr when the upstream speaks HTTP/1.1

	hdr       http.Header // the upstream request's headers
	authority string
	target    string // path and query, rewritten

	policy     *retryPolicy // nil: no retries
	numRetries int
	timeout    time.Duration // the route timeout; 0: none
	body       *retryBody    // nil: no request body

	// gctx ends with the route timeout. The router's is s.ctx, which the
	// route timeout cancels with errRouteTimeout (startRouteTimeout); a
	// terminated CONNECT's is its own (connect.go).
	gctx     context.Context
	deadline int64 // nanotime of the route timeout; 0: none

	exclude func(*cluster.Host) bool // previous_hosts, once a retry set it
}

// attempt is one try of the request on one host.
type attempt struct {
	n      int
	h      *cluster.Host
	hc     *hostConns
	cl     *cluster.Cluster // holds a max_requests slot of cl until end
	ctx    context.Context  // the per-try timeout's, else the route's
	cancel context.CancelFunc
	sent   time.Time
}

// proxy is the router: it sends the request to a host of the cluster,
// with retries, timeouts and circuit breakers, and relays the response.
// It reads as the list of its steps, as httputil.ReverseProxy.ServeHTTP
// does; a step that answers the stream itself (a local reply) reports
// false, and the stream is then done.
func (s *stream) proxy(routes *Routes, vh *VirtualHost, rt *Route, clusterName string, wc *weightedCluster) {
	f := forwarding{routes: routes, vh: vh, rt: rt, wc: wc}
	if !s.findCluster(&f, clusterName) {
		return
	}
	s.buildHeaders(&f)
	s.choosePolicy(&f)
	s.bufferBody(&f)
	s.startRouteTimeout(&f)
	defer s.stopRouteTimeout(&f)
	s.armRouteIdle(rt)

	for n := 1; ; n++ {
		var a attempt
		if !s.beginAttempt(&f, &a, n) {
			return
		}
		out, ok := s.upstreamRequest(&f, &a)
		if !ok {
			return
		}
		resp, err := s.send(&f, &a, out)
		// The h1 transport counted the head's headers itself (1xx too).
		if err == nil && f.h1 == nil && tooManyHeaders(resp.Header, maxResponseHeaders) {
			resp.Body.Close()
			resp, err = nil, errUpstreamHead
		}
		if err != nil {
			if s.retryAfterError(&f, &a, err) {
				continue
			}
			return
		}
		if s.retryAfterResponse(&f, &a, resp) {
			continue
		}
		s.e.UpstreamServiceTime = time.Since(a.sent)
		a.end(s.relay(resp, &f))
		return
	}
}

// findCluster looks up the route's cluster and its connection pool. A
// cluster the route names but the configuration lacks gets the route's
// cluster_not_found_response_code, as in Envoy.
func (s *stream) findCluster(f *forwarding, name string) bool {
	env := s.h.env
	cl := env.Cluster(name)
	if name == "" || cl == nil {
		s.cfg.stats.NoCluster.Add(1)
		s.e.ResponseFlags |= FlagNC
		s.localReply(f.rt.notFoundCode, "", "cluster_not_found")
		return false
	}
	cp, err := env.Pools().get(cl, env.ClusterHTTP(name))
	if err != nil {
		s.e.ResponseFlags |= FlagUO
		s.localReply(http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: overflow", "upstream_reset_before_response_started{overflow}")
		return false
	}
	f.name, f.cl, f.cp, f.stats = name, cl, cp, cp.stats
	f.tr = cp.transportFor(s.r.ProtoMajor)
	f.h1, _ = f.tr.(*h1Transport)
	if s.upgrade != "" && f.h1 == nil {
		// Envoy would turn it into an extended CONNECT (RFC 8441) to an
		// HTTP/2-only cluster, or send a CONNECT as an h2 stream;
		// meshtun upgrades and forwards CONNECT over HTTP/1.1 only.
		s.localReply(http.StatusForbidden, "", "upgrade_failed")
		return false
	}
	return true
}

// buildHeaders builds the upstream request's headers, once for every
// attempt: Expect out (100-continue is answered downstream, Envoy's
// default; hop-by-hop headers went before prepareHeaders), the header edits of the weighted
// cluster, route, virtual host and route configuration, host and path
// rewrites.
func (s *stream) buildHeaders(f *forwarding) {
	r, rt, wc := s.r, f.rt, f.wc
	hdr := r.Header.Clone()
	if hdr == nil {
		hdr = http.Header{}
	}
	delete(hdr, "Expect")
	if s.upgrade != "" && !isConnect(r) {
		// An allowed upgrade goes upstream: its two hop-by-hop headers
		// are re-added (tunnel.go relays the 101). A CONNECT needs none.
		hdr["Connection"] = []string{"Upgrade"}
		hdr["Upgrade"] = []string{s.upgrade}
		if r.ProtoMajor == 2 {
			h2UpgradeHeaders(hdr)
		}
	}
	f.authority = r.Host
	if wc != nil && wc.hostRewrite != "" {
		f.authority = wc.hostRewrite
	} else if rt.hostRewrite != "" {
		f.authority = rt.hostRewrite
	}
	fc := &formatCtx{r: r, down: &s.h.info, proto: r.Proto, requestID: s.e.RequestID, authority: r.Host, routeName: rt.Name, clusterNam: f.name}
	levels := [4]*headerOps{nil, rt.reqOps, f.vh.reqOps, f.routes.reqOps}
	if wc != nil {
		levels[0] = wc.reqOps
	}
	applyLevels(levels, f.routes.mostSpecific, hdr, &f.authority, fc)
	target, rewritten := rt.rewritePath(s.target)
	if rewritten && !s.cfg.filters.suppressEnvoy {
		hdr["X-Envoy-Original-Path"] = []string{s.target}
	}
	if _, ok := hdr["User-Agent"]; !ok {
		hdr["User-Agent"] = nil // present and empty: Go's client adds none
	}
	f.hdr, f.target = hdr, target
}

// choosePolicy settles the retry policy and route timeout: the route's,
// else the virtual host's policy, overridden by the x-envoy-* headers of
// an internal request (only an internal request can still carry them),
// and tells the upstream the timeout it has (x-envoy-expected-rq-timeout-ms:
// the per-try timeout, else the route's).
func (s *stream) choosePolicy(f *forwarding) {
	policy := f.rt.retry
	if policy == nil {
		policy = f.vh.retry
	}
	timeout := f.rt.timeout
	// A gRPC call's grpc-timeout replaces the route timeout where the
	// route says so (max_grpc_timeout, grpc.go).
	grpcTimed := false
	if t, ok := f.rt.grpcTO.routeTimeout(s.r); ok {
		timeout, grpcTimed = t, true
	}
	if s.internal {
		timeout, policy = requestOverrides(f.hdr, timeout, policy)
	}
	f.policy, f.timeout = policy, timeout
	if policy != nil {
		f.numRetries = policy.numRetries
	}
	t := timeout
	if policy != nil && policy.perTry > 0 && (t == 0 || policy.perTry < t) {
		t = policy.perTry
	}
	if t > 0 && !s.cfg.filters.suppressEnvoy {
		if t == f.rt.timeout && f.rt.timeoutVals != nil {
			f.hdr["X-Envoy-Expected-Rq-Timeout-Ms"] = f.rt.timeoutVals
		} else {
			f.hdr["X-Envoy-Expected-Rq-Timeout-Ms"] = []string{strconv.FormatInt(t.Milliseconds(), 10)}
		}
	}
	if t > 0 && grpcTimed {
		// The upstream learns the time it has, as Envoy rewrites it.
		f.hdr["Grpc-Timeout"] = []string{formatGRPCTimeout(t)}
	}
}

// bufferBody sets up the request body for attempts. The body streams
// upstream as it arrives; a copy is kept so that a retry can replay it
// (up to maxRetryBuffer: beyond, the request is no longer retriable,
// retry_or_shadow_abandoned) or, without retries, so that a request
// caught by a dead keep-alive connection can be resent (up to
// resendBuffer).
func (s *stream) bufferBody(f *forwarding) {
	switch {
	case s.body == nil, s.upgrade != "":
		// No body, or an upgrade's, which is the tunnel's (tunnel.go).
	case f.numRetries > 0:
		f.body = newRetryBody(s.body, maxRetryBuffer, &f.stats.RetryOrShadowAbandoned)
	default:
		f.body = newRetryBody(s.body, resendBuffer, nil)
	}
}

// replayable reports whether another attempt can still send the whole
// body.
func (f *forwarding) replayable() bool { return f.body == nil || f.body.replayable() }

// startRouteTimeout starts the route timeout, which bounds all attempts
// and back-offs together and the response until its end. It cancels the
// stream's own context, with the cause errRouteTimeout, from the stream's
// reusable timer, as the max stream duration does: a context of its own
// per request (a cancel context, its Done channel, and the child map and
// AfterFunc of every exchange under it) was a third of the proxy's
// allocations per request. The router answers a stream so ended 504
// (UT); s.cancelled tells it from a stream the client or another timeout
// ended. f.gctx has no Deadline; nothing reads it.
func (s *stream) startRouteTimeout(f *forwarding) {
	f.gctx = s.ctx
	if f.timeout <= 0 {
		return
	}
	if s.rto == nil {
		s.rto = new(deadlineTimer)
	}
	f.deadline = nanotime() + int64(f.timeout)
	s.rto.startCause(f.timeout, s.cancel, errRouteTimeout)
}

// stopRouteTimeout ends the route timeout when the router is done (the
// response relayed or the stream answered) or hands the stream over to a
// tunnel, which the route timeout does not bound.
func (s *stream) stopRouteTimeout(f *forwarding) {
	if f.deadline != 0 {
		s.rto.stop()
		f.deadline = 0
	}
}

// errRouteTimeout is the cause of a stream's context the route timeout
// ended.
var errRouteTimeout = errors.New("httpconn: route timeout")

// cancelled reports that the stream's context ended for a reason other
// than the route timeout: the client went, or a stream timeout (idle,
// request, max duration) fired. The stream is then failed as such
// (failStream), not answered 504.
func (s *stream) cancelled() bool {
	c := context.Cause(s.ctx)
	return c != nil && c != errRouteTimeout
}

// routeTimeout answers a stream whose route timeout fired: 504 (UT).
func (s *stream) routeTimeout(f *forwarding) {
	f.stats.RqTimeout.Add(1)
	s.e.ResponseFlags |= FlagUT
	s.localReply(http.StatusGatewayTimeout, "upstream request timeout", "upstream_response_timeout")
}

// armRouteIdle applies the route's idle_timeout, which replaces the
// connection manager's stream_idle_timeout for this stream, also when
// that one is disabled.
func (s *stream) armRouteIdle(rt *Route) {
	if rt.idleTimeout >= 0 {
		s.idle.arm(rt.idleTimeout)
	}
}

// beginAttempt starts attempt n: a host from the load balancer (without
// the hosts tried, with previous_hosts), a request from the cluster's
// max_requests breaker, and the per-try timeout. The attempt then holds
// what a.end gives back.
func (s *stream) beginAttempt(f *forwarding, a *attempt, n int) bool {
	if n > 1 && context.Cause(s.ctx) == errRouteTimeout {
		// The route timeout cut the back-off (retry): no attempt goes
		// after it.
		s.routeTimeout(f)
		return false
	}
	s.e.Attempts = n
	if n > 1 {
		// The previous attempt's writer may still read its headers.
		f.hdr = f.hdr.Clone()
	}
	h, err := f.cl.PickHostFor(s.h.info.Local, f.exclude)
	if err != nil {
		s.e.ResponseFlags |= FlagUH
		s.localReply(http.StatusServiceUnavailable, "no healthy upstream", "no_healthy_upstream")
		return false
	}
	s.e.UpstreamHost = h.Address()
	if !f.cl.AcquireRequest() {
		s.overflow()
		return false
	}
	if f.vh.attemptReq {
		f.hdr["X-Envoy-Attempt-Count"] = []string{strconv.Itoa(n)}
	}
	a.n, a.h, a.cl, a.ctx = n, h, f.cl, f.gctx
	if p := f.policy; p != nil && p.perTry > 0 {
		if f.deadline != 0 && f.deadline-nanotime() < int64(p.perTry) {
			// The route timeout comes first: as WithTimeout does under
			// a parent with an earlier deadline.
			a.ctx, a.cancel = context.WithCancel(f.gctx)
		} else {
			a.ctx, a.cancel = context.WithTimeout(f.gctx, p.perTry)
		}
	}
	a.hc = f.cp.host(h)
	a.hc.active.Add(1)
	return true
}

// end gives back what beginAttempt took and counts the attempt's outcome
// on the host (its rq_active, and rq_success, rq_error or rq_timeout).
// Every attempt that reached h.BeginRequest ends exactly once.
func (a *attempt) end(o cluster.RequestOutcome) {
	a.hc.active.Add(-1)
	a.h.EndRequest(o)
	if a.cl != nil {
		a.cl.ReleaseRequest()
		a.cl = nil
	}
	if a.cancel != nil {
		a.cancel()
	}
}

// upstreamRequest builds the attempt's request. The h1 transport is done
// with the previous attempt's request (it is synchronous), so over
// HTTP/1.1 the stream's own is reused; h2's may still be read by its
// transport and is new each time. A body that can no longer be replayed
// (it outgrew the retry buffer since the retry was decided) ends the
// stream: retry buffer overflow.
func (s *stream) upstreamRequest(f *forwarding, a *attempt) (*http.Request, bool) {
	r := s.r
	var out *http.Request
	if f.h1 != nil {
		if s.h1s == nil {
			s.h1s = new(h1Scratch)
		}
		sc := s.h1s
		sc.url = url.URL{Scheme: "http", Host: sc.hostString(a.h.Address())}
		method := r.Method
		if s.upgrade != "" && !isConnect(r) {
			method = http.MethodGet // an RFC 8441 CONNECT is a GET upgrade over HTTP/1.1
		}
		sc.req = http.Request{
			Method:     method,
			URL:        &sc.url,
			Proto:      "HTTP/1.1",
			ProtoMajor: 1,
			ProtoMinor: 1,
			Header:     f.hdr,
			Host:       f.authority,
		}
		out = &sc.req
	} else {
		out = &http.Request{
			Method:     r.Method,
			URL:        &url.URL{Scheme: "http", Host: a.h.Address().String()},
			Proto:      "HTTP/1.1",
			ProtoMajor: 1,
			ProtoMinor: 1,
			Header:     f.hdr,
			Host:       f.authority,
		}
	}
	if !isConnect(r) {
		setTarget(out.URL, f.target)
	} // a CONNECT's target is its authority (out.Host), which net/http writes
	if f.body == nil {
		return out, true
	}
	body, ok := f.body.attempt()
	if !ok {
		a.h.BeginRequest()
		a.end(cluster.RequestError)
		s.e.ResponseFlags |= FlagUR
		s.localReply(http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: retry buffer overflow", "upstream_reset_before_response_started{retry_buffer_overflow}")
		return nil, false
	}
	out.Body, out.GetBody = body, f.body.getBody
	out.ContentLength = r.ContentLength
	if out.ContentLength <= 0 {
		out.ContentLength = -1
		out.TransferEncoding = []string{"chunked"}
	}
	return out, true
}

// send runs the attempt's exchange up to the response head, on the h1
// transport or the cluster's h2c one.
func (s *stream) send(f *forwarding, a *attempt, out *http.Request) (*http.Response, error) {
	a.h.BeginRequest()
	a.sent = time.Now()
	if f.h1 != nil {
		resp, err := f.h1.roundTrip(a.ctx, out, a.h, s.h1s)
		if err == nil {
			// The connection the head came on: the body's, or an
			// upgrade's tunnel (whose body is the connection itself).
			var c *h1Conn
			switch b := resp.Body.(type) {
			case *h1Body:
				c = b.c
			case *upgradedConn:
				c = b.c
			}
			if c != nil {
				s.e.UpstreamPeerURISAN = c.pc.PeerURISAN()
			}
			s.e.UpstreamTransportFailureReason = ""
		}
		return resp, err
	}
	resp, err := s.roundTripH2(f.tr, out, a.ctx, f.cl, a.hc, a.h)
	if err == nil {
		// A retry reached an upstream: an earlier attempt's handshake
		// failure is not why the request ended.
		s.e.UpstreamTransportFailureReason = ""
	}
	return resp, err
}

// retryAfterError ends an attempt that got no response. It reports true
// when another attempt goes (the policy retries this failure, the body
// can be replayed, retries and the retry breaker allow it, the back-off
// passed); otherwise the stream is answered (or already was, when it
// ended downstream).
func (s *stream) retryAfterError(f *forwarding, a *attempt, err error) bool {
	fail := s.classify(f, a, err)
	a.end(fail.outcome)
	if fail.flag == 0 { // the stream ended (downstream gone, timeout, bad body)
		return false
	}
	if fail.retriable && f.policy != nil && f.replayable() {
		if a.n <= f.numRetries {
			if s.retry(f.cl, f.policy, a.n, &s.tried, &f.exclude, a.h) {
				return true
			}
		} else {
			s.e.ResponseFlags |= FlagURX
			f.stats.RqRetryLimitExceeded.Add(1)
		}
	}
	s.e.ResponseFlags |= fail.flag
	s.localReply(fail.code, fail.msg, fail.details)
	return false
}

// retryAfterResponse counts the response and reports true when the
// policy retries it (retriable status or headers) and another attempt
// goes; the response is then drained and the attempt ended. Otherwise
// the response is the one relayed (retry_limit_exceeded when retries ran
// out on a retriable one, as Envoy).
func (s *stream) retryAfterResponse(f *forwarding, a *attempt, resp *http.Response) bool {
	f.stats.CountResponse(resp.StatusCode)
	switch {
	case f.policy != nil && f.policy.retriableResponse(resp.StatusCode, resp.Header):
		if a.n <= f.numRetries && f.replayable() {
			if s.retry(f.cl, f.policy, a.n, &s.tried, &f.exclude, a.h) {
				drain(resp.Body)
				a.end(outcomeOf(resp.StatusCode))
				return true
			}
		} else if a.n > f.numRetries {
			s.e.ResponseFlags |= FlagURX
			f.stats.RqRetryLimitExceeded.Add(1)
		}
	case a.n > 1:
		f.stats.RqRetrySuccess.Add(1)
	}
	return false
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
	var pc atomic.Pointer[pooledConn]
	connected := func() {
		if gotConn.CompareAndSwap(false, true) {
			hc.waiting.Add(-1)
			if relPending != nil {
				relPending()
			}
		}
	}
	ctx := context.WithValue(actx, hostKey{}, h)
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(ci httptrace.GotConnInfo) {
		pc.Store(pooledOf(ci.Conn))
		connected()
	}})
	resp, err := tr.RoundTrip(out.WithContext(ctx))
	connected()
	if c := pc.Load(); c != nil && err == nil {
		s.e.UpstreamPeerURISAN = c.PeerURISAN()
	}
	return resp, err
}

// pooledOf is the pool's connection under what http.Transport reports in
// its trace: the dialed connection, or for HTTP/2 with prior knowledge a
// *tls.Conn standing in for it (the transport's own wrapper, not TLS).
func pooledOf(c net.Conn) *pooledConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	pc, _ := c.(*pooledConn)
	return pc
}

// outcomeOf is how a response counts for the host: a 5xx is an error.
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

// drain discards a response that is retried, up to 64 KiB, so that its
// HTTP/1.1 connection goes back to the pool; a longer body is not worth
// reading and is abandoned (its connection closed, or its h2 stream
// reset).
func drain(b io.ReadCloser) {
	_, _ = io.CopyN(io.Discard, b, 64<<10)
	b.Close()
}

// attemptFailure is how an attempt that got no response ends, in Envoy's
// terms: the response flag, the local reply, the outcome for the host.
// flag 0 means the stream already ended (its reply, if any, is sent).
type attemptFailure struct {
	retriable    bool // by the route's policy
	flag         Flags
	code         int
	msg, details string
	outcome      cluster.RequestOutcome
}

// classify maps a RoundTrip error to Envoy's outcome.
func (s *stream) classify(f *forwarding, a *attempt, err error) attemptFailure {
	const prefix = "upstream connect error or disconnect/reset before headers. "
	if s.body != nil {
		if berr := s.body.readErr(); berr != nil && !s.cancelled() {
			s.requestBodyError(berr)
			return attemptFailure{outcome: cluster.RequestError}
		}
	}
	p := f.policy
	switch {
	case s.cancelled():
		s.failStream(err)
		return attemptFailure{outcome: cluster.RequestError}
	case f.gctx.Err() != nil:
		s.routeTimeout(f)
		return attemptFailure{outcome: cluster.RequestTimeout}
	case a.ctx.Err() != nil:
		f.stats.RqPerTryTimeout.Add(1)
		return attemptFailure{p != nil && p.retriableTimeout(), FlagUT, http.StatusGatewayTimeout, "upstream request timeout", "upstream_per_try_timeout", cluster.RequestTimeout}
	case errors.Is(err, cluster.ErrOverflow), errors.Is(err, errPendingOverflow):
		return attemptFailure{false, FlagUO, http.StatusServiceUnavailable, prefix + "reset reason: overflow", "upstream_reset_before_response_started{overflow}", cluster.RequestError}
	case errors.Is(err, errUpstreamHead):
		f.stats.RqRxReset.Add(1)
		return attemptFailure{false, FlagUPE, http.StatusServiceUnavailable, prefix + "reset reason: protocol error", "upstream_reset_before_response_started{protocol_error}", cluster.RequestError}
	case errors.Is(err, cluster.ErrNoHealthyUpstream):
		return attemptFailure{false, FlagUH, http.StatusServiceUnavailable, "no healthy upstream", "no_healthy_upstream", cluster.RequestError}
	}
	var ce *cluster.ConnectError
	if errors.As(err, &ce) {
		s.e.UpstreamTransportFailureReason = ce.TransportFailure
		m := prefix + "reset reason: connection failure, transport failure reason: " + ce.Err.Error()
		details := "upstream_reset_before_response_started{connection_failure}"
		if ce.TransportFailure != "" {
			// Envoy appends the transport's reason, spaces made '_'.
			details = "upstream_reset_before_response_started{connection_failure|" + strings.ReplaceAll(ce.TransportFailure, " ", "_") + "}"
		}
		return attemptFailure{p != nil && p.retriableReset(true), FlagUF, http.StatusServiceUnavailable, m, details, cluster.RequestError}
	}
	f.stats.RqRxReset.Add(1)
	return attemptFailure{p != nil && p.retriableReset(false), FlagUC, http.StatusServiceUnavailable, prefix + "reset reason: connection termination", "upstream_reset_before_response_started{connection_termination}", cluster.RequestError}
}
