package httpconn

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
)

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
	case errMaxDuration:
		s.maxDurationReply()
	default:
		s.e.ResponseFlags |= FlagDC
		s.e.ResponseCodeDetails = "downstream_remote_disconnect"
		if s.wroteHeader {
			s.abort()
		}
	}
}

// faultAbort answers with the fault filter's abort: an HTTP status, or
// for a gRPC abort a trailers-only response with the grpc-status.
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

// directResponse answers with the route's direct_response, the route's
// response header edits applied.
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

// redirect answers with the route's redirect action: the Location built
// from the request's scheme, host, path and query with the action's
// replacements, as Envoy's RedirectAction.
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

// overflow answers a request refused by a circuit breaker (UO).
func (s *stream) overflow() {
	s.e.ResponseFlags |= FlagUO
	s.localReply(http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: overflow", "upstream_reset_before_response_started{overflow}")
}

// requestBodyError answers a request whose body failed to arrive: a
// timeout or disconnect as failStream does, anything else (a malformed
// body) as the client's fault, 400 (DPE).
func (s *stream) requestBodyError(err error) {
	if s.cancelled() {
		s.failStream(err)
		return
	}
	s.e.ResponseFlags |= FlagDPE
	s.localReply(http.StatusBadRequest, "", "downstream_protocol_error")
}
