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
		// The route timeout bounded the wait for the tunnel's response
		// only (the h1 transport let go of it then): it must not cancel
		// the stream, and with it the tunnel, later.
		s.stopRouteTimeout(f)
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
		// The upstream's own field when it is the length written
		// plainly (as it nearly always is), else a new one.
		if !plainLength(resp.Header["Content-Length"], resp.ContentLength) {
			h["Content-Length"] = []string{strconv.FormatInt(resp.ContentLength, 10)}
		}
	}
	s.responseHeaderOps(h, f.routes, f.vh, f.rt, f.wc)
	if !s.cfg.filters.suppressEnvoy {
		h["X-Envoy-Upstream-Service-Time"] = msValues(s.e.UpstreamServiceTime.Milliseconds())
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
	rc := flusherOf(s.w)
	if resp.ContentLength < 0 && s.r.Method != http.MethodHead {
		// A streaming response (chunked, or HTTP/2 without a length:
		// server-sent events, long polls, gRPC) gets its head at once, as
		// Envoy sends headers when they arrive: net/http would hold it
		// until the first body byte, which such an upstream may send
		// much later. A response of known length comes whole, soon;
		// its head goes out with its first bytes (one write, not two).
		_ = rc.FlushError()
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
			_ = rc.FlushError()
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			switch {
			case s.cancelled():
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

// flusherOf is how the relay flushes w: its own FlushError (the HTTP/1.x
// loop's writer, net/http's HTTP/2 one), else through a
// ResponseController, which costs an allocation per response.
func flusherOf(w http.ResponseWriter) errFlusher {
	if f, ok := w.(errFlusher); ok {
		return f
	}
	return rcFlusher{http.NewResponseController(w)}
}

type errFlusher interface{ FlushError() error }

type rcFlusher struct{ *http.ResponseController }

func (f rcFlusher) FlushError() error { return f.Flush() }

// plainLength: vs is one Content-Length field that says n in plain
// decimal (no sign, no leading zero).
func plainLength(vs []string, n int64) bool {
	return len(vs) == 1 && parseDigits(vs[0]) == n && (len(vs[0]) == 1 || vs[0][0] != '0')
}

// msValues is a header value of ms milliseconds. Values under
// len(smallMs) are shared, made once: their slices have len == cap, so
// a header op that appends to one copies it.
func msValues(ms int64) []string {
	if ms >= 0 && ms < int64(len(smallMs)) {
		return smallMs[ms]
	}
	return []string{strconv.FormatInt(ms, 10)}
}

var smallMs = func() (t [128][]string) {
	for i := range t {
		t[i] = []string{strconv.Itoa(i)}
	}
	return t
}()
