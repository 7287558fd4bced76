package httpconn

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"sync"

	"github.com/meshtun/meshtun/mesh/cluster"
)

// relay sends the upstream response downstream.
func (s *stream) relay(resp *http.Response, f *forwarding) cluster.RequestOutcome {
	if resp.StatusCode == http.StatusSwitchingProtocols || (isConnect(s.r) && resp.StatusCode >= 200 && resp.StatusCode < 300) {
		return s.tunnel(resp, f)
	}
	defer resp.Body.Close()
	h := s.w.Header()
	for k, vs := range resp.Header {
		h[k] = vs
	}
	stripHopByHop(h, false)
	stripPeerMetadata(h)
	if resp.ContentLength >= 0 && s.r.Method != http.MethodHead {
		h["Content-Length"] = []string{strconv.FormatInt(resp.ContentLength, 10)}
	}
	s.responseHeaderOps(h, f.routes, f.vh, f.rt, f.wc)
	if !s.cfg.filters.suppressEnvoy {
		h["X-Envoy-Upstream-Service-Time"] = []string{strconv.FormatInt(s.e.UpstreamServiceTime.Milliseconds(), 10)}
	}
	if f.vh.attemptRsp {
		h["X-Envoy-Attempt-Count"] = []string{strconv.Itoa(s.e.Attempts)}
	}
	if s.cfg.alwaysSetRequestID && s.e.RequestID != "" {
		h["X-Request-Id"] = []string{s.e.RequestID}
	}
	s.setServer(h)
	if s.closeConn {
		// A CONNECT the upstream refused: what the client sent after it
		// is tunnel data, not a request.
		h["Connection"] = []string{"close"}
	}
	s.e.ResponseCodeDetails = "via_upstream"
	s.writeHeader(resp.StatusCode)
	outcome := outcomeOf(resp.StatusCode)
	rc := http.NewResponseController(s.w)
	if resp.ContentLength < 0 && s.r.Method != http.MethodHead {
		// A streaming response (chunked, or HTTP/2 without a length:
		// server-sent events, long polls, gRPC) gets its head at once, as
		// Envoy sends headers when they arrive: net/http would hold it
		// until the first body byte, which such an upstream may send
		// much later. A response of known length comes whole, soon;
		// its head goes out with its first bytes (one write, not two).
		_ = rc.Flush()
	}

	s.idle.writesTo(s.w)
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
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
				if context.Cause(s.ctx) == errStreamIdle {
					// The client took nothing for stream_idle_timeout.
					s.e.ResponseFlags |= FlagSI
					s.e.ResponseCodeDetails = "stream_idle_timeout"
					s.cfg.stats.DownstreamRqIdle.Add(1)
				} else {
					s.e.ResponseFlags |= FlagDC
					s.e.ResponseCodeDetails = "downstream_remote_disconnect"
				}
				f.stats.RqTxReset.Add(1)
				s.abort()
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
				switch context.Cause(s.ctx) {
				case errStreamIdle:
					s.e.ResponseFlags |= FlagSI
					s.cfg.stats.DownstreamRqIdle.Add(1)
				case errMaxDuration:
					s.e.ResponseFlags |= FlagDT
					s.cfg.stats.DownstreamRqMaxDurationReached.Add(1)
				default:
					s.e.ResponseFlags |= FlagDC
				}
			case f.gctx.Err() != nil:
				s.e.ResponseFlags |= FlagUT
				f.stats.RqTimeout.Add(1)
				outcome = cluster.RequestTimeout
			default:
				s.e.ResponseFlags |= FlagUR
				f.stats.RqRxReset.Add(1)
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
