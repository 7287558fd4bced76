package httpconn

import (
	"context"
	"errors"
	"io"
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
