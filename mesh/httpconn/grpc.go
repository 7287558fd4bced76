package httpconn

import (
	"errors"
	"net/http"
	"strconv"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
)

// errMaxDuration cancels a stream that reached its max stream duration
// (max_stream_duration, or the gRPC deadline it takes from grpc-timeout).
var errMaxDuration = errors.New("max stream duration reached")

// grpcTimeouts are a route's timeouts that a gRPC call's own deadline
// (its grpc-timeout header) can set, as Envoy has them:
//
//   - max_grpc_timeout (deprecated; Istio still sets it, to 0): for a
//     gRPC request the router's timeout is the grpc-timeout (none without
//     one) instead of the route's timeout, capped by max_grpc_timeout
//     unless that is 0, less grpc_timeout_offset; the upstream is sent the
//     timeout it gets as its grpc-timeout.
//   - max_stream_duration: the stream's lifetime bound (the connection
//     manager's common_http_protocol_options.max_stream_duration unless
//     the route sets one; 0 disables), or, with grpc_timeout_header_max,
//     the grpc-timeout capped by that maximum (0: no cap) less
//     grpc_timeout_header_offset. Reaching it answers 408 (504 once the
//     request is complete) "downstream duration timeout", gRPC status
//     DEADLINE_EXCEEDED, flag DT, or resets a stream whose response has
//     begun.
type grpcTimeouts struct {
	max, offset             time.Duration // max_grpc_timeout (-1: unset), grpc_timeout_offset
	streamMax               time.Duration // max_stream_duration.max_stream_duration (-1: unset)
	headerMax, headerOffset time.Duration // grpc_timeout_header_max (-1: unset), its offset
}

var noGRPCTimeouts = grpcTimeouts{max: -1, streamMax: -1, headerMax: -1}

func parseGRPCTimeouts(a *routev3.RouteAction) grpcTimeouts {
	g := noGRPCTimeouts
	if d := a.GetMaxGrpcTimeout(); d != nil {
		g.max = d.AsDuration()
	}
	g.offset = a.GetGrpcTimeoutOffset().AsDuration()
	if m := a.GetMaxStreamDuration(); m != nil {
		if d := m.GetMaxStreamDuration(); d != nil {
			g.streamMax = d.AsDuration()
		}
		if d := m.GetGrpcTimeoutHeaderMax(); d != nil {
			g.headerMax = d.AsDuration()
		}
		g.headerOffset = m.GetGrpcTimeoutHeaderOffset().AsDuration()
	}
	return g
}

// routeTimeout is the router's timeout for r when the route takes it
// from the call's grpc-timeout (ok false: the route's own timeout holds),
// as Envoy's FilterUtility::finalTimeout: 0 is none.
func (g *grpcTimeouts) routeTimeout(r *http.Request) (d time.Duration, ok bool) {
	if g.max < 0 || !isGRPC(r) {
		return 0, false
	}
	d, _ = grpcTimeout(r.Header)
	if g.offset > 0 && d > g.offset {
		d -= g.offset
	}
	if g.max > 0 && (d == 0 || d > g.max) {
		d = g.max
	}
	return d, true
}

// streamDuration is the stream's max duration on this route (0: none),
// as Envoy's ActiveStream::refreshDurationTimeout; hcm is the connection
// manager's max_stream_duration.
func (g *grpcTimeouts) streamDuration(r *http.Request, hcm time.Duration) time.Duration {
	if t, has := grpcTimeout(r.Header); has && g.headerMax >= 0 {
		if g.headerMax > 0 && t > g.headerMax {
			t = g.headerMax
		}
		if t > 0 && g.headerOffset > 0 {
			if t > g.headerOffset {
				t -= g.headerOffset
			} else {
				t = 0
			}
		}
		return t
	}
	if g.streamMax >= 0 {
		return g.streamMax
	}
	return hcm
}

// grpcTimeout parses the grpc-timeout header: up to 8 digits and a unit
// (H, M, S, m, u, n). has is false without a valid one.
func grpcTimeout(h http.Header) (d time.Duration, has bool) {
	vs := h["Grpc-Timeout"]
	if len(vs) == 0 || len(vs[0]) < 2 || len(vs[0]) > 9 {
		return 0, false
	}
	v := vs[0]
	n, err := strconv.ParseUint(v[:len(v)-1], 10, 64)
	if err != nil {
		return 0, false
	}
	var unit time.Duration
	switch v[len(v)-1] {
	case 'H':
		unit = time.Hour
	case 'M':
		unit = time.Minute
	case 'S':
		unit = time.Second
	case 'm':
		unit = time.Millisecond
	case 'u':
		unit = time.Microsecond
	case 'n':
		unit = time.Nanosecond
	default:
		return 0, false
	}
	return time.Duration(n) * unit, true
}

// formatGRPCTimeout writes d as a grpc-timeout value in milliseconds (as
// Envoy sends it), in a coarser unit when milliseconds need more than 8
// digits.
func formatGRPCTimeout(d time.Duration) string {
	ms := d.Milliseconds()
	if d > 0 && ms == 0 {
		ms = 1
	}
	switch {
	case ms < 1e8:
		return strconv.FormatInt(ms, 10) + "m"
	case ms/1000 < 1e8:
		return strconv.FormatInt(ms/1000, 10) + "S"
	case ms/60000 < 1e8:
		return strconv.FormatInt(ms/60000, 10) + "M"
	}
	return strconv.FormatInt(ms/3600000, 10) + "H"
}

// armMaxDuration starts the stream's max duration for route rt (counted
// from the stream's start), from the stream's reusable timer.
func (s *stream) armMaxDuration(rt *Route) {
	g := &noGRPCTimeouts
	if rt != nil {
		g = &rt.grpcTO
	}
	d := g.streamDuration(s.r, s.cfg.maxStreamDuration)
	if d <= 0 {
		return
	}
	if s.msd == nil {
		s.msd = new(deadlineTimer)
	}
	s.msd.startCause(max(d-time.Since(s.e.Start), time.Nanosecond), s.cancel, errMaxDuration)
}

// maxDurationReply answers a stream that reached its max duration.
func (s *stream) maxDurationReply() {
	s.cfg.stats.DownstreamRqMaxDurationReached.Add(1)
	s.e.ResponseFlags |= FlagDT
	code := http.StatusRequestTimeout
	if s.body == nil || s.body.ended.Load() {
		code = http.StatusGatewayTimeout
	}
	s.grpcReplyStatus = 4 // DEADLINE_EXCEEDED
	s.localReply(code, "downstream duration timeout", "max_duration_timeout")
}
