package httpconn

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshtun/meshtun/mesh/cluster"
)

// upgradedConn is an upstream HTTP/1.1 connection after its 101
// (Switching Protocols): the response body the h1 transport returns then,
// as http.Transport does, readable and writable (bytes the upstream sent
// after its 101 are in the connection's read buffer). It is not pooled:
// Close closes the connection.
type upgradedConn struct{ c *h1Conn }

func (u *upgradedConn) Read(p []byte) (int, error)  { return u.c.br.Read(p) }
func (u *upgradedConn) Write(p []byte) (int, error) { return u.c.pc.Write(p) }
func (u *upgradedConn) Close() error                { return u.c.pc.Close() }

// connectedConn is an upstream HTTP/1.1 connection after its 2xx to a
// forwarded CONNECT: an upgradedConn that can half-close (halfClose).
type connectedConn struct{ *upgradedConn }

func (c connectedConn) CloseWrite() error { return c.c.pc.CloseWrite() }

// tunnel relays an upgraded exchange (a WebSocket, or another type the
// upgrade_configs allow): the upstream's 101 goes to the client with its
// Connection and Upgrade headers, then bytes are copied both ways until
// either side closes or fails, when both connections are closed, as
// Envoy ends an upgraded HTTP/1.1 stream with either end. The stream's
// idle timeout (stream_idle_timeout, or the route's idle_timeout) ends a
// tunnel in which no byte moved either way for that long, and the end of
// the listener's drain ends it too. The route timeout bounded the wait
// for the 101 only (the h1 transport let go of it then).
//
// The downstream connection is taken from net/http (Hijack), so the
// connection's Serve waits for the tunnel (connHandler.tunnels) before it
// returns and its caller closes the connection.
func (s *stream) tunnel(resp *http.Response, f *forwarding) cluster.RequestOutcome {
	up, ok := resp.Body.(io.ReadWriteCloser)
	connect := isConnect(s.r)
	if s.upgrade == "" || !ok || (connect && resp.StatusCode == http.StatusSwitchingProtocols) {
		// A 101 the request did not ask for: the upstream is out of step.
		resp.Body.Close()
		f.stats.RqRxReset.Add(1)
		s.e.ResponseFlags |= FlagUC
		s.localReply(http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: protocol error", "upstream_reset_before_response_started{protocol_error}")
		return cluster.RequestError
	}
	defer up.Close()

	h := http.Header{}
	for k, vs := range resp.Header {
		h[k] = vs
	}
	upgrade := resp.Header["Upgrade"]
	stripHopByHop(h, false)
	s.responseHeaderOps(h, f.routes, f.vh, f.rt, f.wc)
	if !s.cfg.filters.suppressEnvoy {
		h["X-Envoy-Upstream-Service-Time"] = []string{strconv.FormatInt(s.e.UpstreamServiceTime.Milliseconds(), 10)}
	}
	if s.cfg.alwaysSetRequestID && s.e.RequestID != "" {
		h["X-Request-Id"] = []string{s.e.RequestID}
	}
	s.setServer(h)
	if connect {
		// A CONNECT forwarded upstream: its 2xx starts the tunnel, whose
		// client end half-closes the upstream connection, as a
		// terminated CONNECT's does (connect.go).
		delete(h, "Content-Length")
		if uc, ok := up.(*upgradedConn); ok {
			up = connectedConn{uc}
		}
		if s.r.ProtoMajor == 2 {
			return s.tunnelH2(up, h)
		}
		s.closeConn = false
		return s.tunnelH1(up, h, resp.StatusCode)
	}
	if s.r.ProtoMajor == 2 {
		delete(h, "Sec-Websocket-Accept") // answers the key h2UpgradeHeaders made up
		return s.tunnelH2(up, h)
	}
	h["Connection"] = []string{"Upgrade"}
	h["Upgrade"] = upgrade
	return s.tunnelH1(up, h, http.StatusSwitchingProtocols)
}

// tunnelH1 answers an HTTP/1.1 client with the tunnel's head (code and
// headers h: the upstream's 101, or the 200 of a terminated CONNECT),
// then relays bytes both ways on the hijacked connection until either
// side closes or fails, or the stream's idle timeout or the drain's end
// cuts both.
func (s *stream) tunnelH1(up io.ReadWriteCloser, h http.Header, code int) cluster.RequestOutcome {
	s.h.tunnels.Add(1)
	defer s.h.tunnels.Done()
	down, brw, err := http.NewResponseController(s.w).Hijack()
	if err != nil {
		s.e.ResponseFlags |= FlagDC
		s.e.ResponseCodeDetails = "downstream_remote_disconnect"
		return cluster.RequestSuccess
	}
	defer down.Close()
	_ = down.SetDeadline(time.Time{}) // what net/http set is for requests, not a tunnel
	s.wroteHeader = true
	s.e.ResponseCode = code
	s.e.ResponseCodeDetails = "via_upstream"
	brw.WriteString("HTTP/1.1 " + strconv.Itoa(code) + " " + http.StatusText(code) + "\r\n")
	h.Write(brw)
	brw.WriteString("\r\n")
	if err := brw.Flush(); err != nil {
		s.e.ResponseFlags |= FlagDC
		s.e.ResponseCodeDetails = "downstream_remote_disconnect"
		return cluster.RequestSuccess
	}

	st := s.cfg.stats
	st.DownstreamCxUpgradesTotal.Add(1)
	st.DownstreamCxUpgradesActive.Add(1)
	defer st.DownstreamCxUpgradesActive.Add(-1)

	// Either end closes both: the stream's end (idle timeout), the
	// drain's end, or one direction finishing (but see halfClose).
	cut := func() {
		down.Close()
		up.Close()
	}
	stopStream := context.AfterFunc(s.ctx, cut)
	defer stopStream()
	stopDrain := context.AfterFunc(s.h.ctx, cut)
	defer stopDrain()

	var received atomic.Int64
	upDone := make(chan error, 1)
	go func() {
		// Bytes the client sent after its request are in brw.Reader;
		// the rest is read from the connection itself: net/http's reader
		// would cancel the request's context (and so cut the tunnel) at
		// the client's half-close.
		var src io.Reader = down
		if n := brw.Reader.Buffered(); n > 0 {
			src = io.MultiReader(io.LimitReader(brw.Reader, int64(n)), down)
		}
		_, err := s.copyTouch(up, src, &received)
		if err != nil || !halfClose(up) {
			cut()
		}
		upDone <- err
	}()
	sent, _ := s.copyTouch(down, up, nil)
	cut()
	<-upDone
	s.e.BytesSent += sent
	s.e.BytesReceived += received.Load()
	switch {
	case context.Cause(s.ctx) == errStreamIdle:
		s.e.ResponseFlags |= FlagSI
		st.DownstreamRqIdle.Add(1)
	case s.h.ctx.Err() != nil:
		s.e.ResponseFlags |= FlagDC
	}
	return cluster.RequestSuccess
}

// halfClose passes the client's end of its bytes on as a half-close of
// up, when up is a TCP connection of the proxy's own (a terminated
// CONNECT): the upstream may still answer, as Envoy's TCP tunnel lets it.
// An upgraded HTTP/1.1 connection has no half-close: false, and the
// caller closes both ends.
func halfClose(up io.ReadWriteCloser) bool {
	hc, ok := up.(interface{ CloseWrite() error })
	return ok && hc.CloseWrite() == nil
}

// copyTouch copies src to dst as bytes arrive, touching the stream's idle
// watch for each chunk, and counts into n when set. It returns at src's
// end or the first error.
func (s *stream) copyTouch(dst io.Writer, src io.Reader, n *atomic.Int64) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var total int64
	for {
		m, rerr := src.Read(buf)
		if m > 0 {
			s.idle.touch()
			w, werr := dst.Write(buf[:m])
			total += int64(w)
			if n != nil {
				n.Add(int64(w))
			}
			if werr != nil {
				return total, werr
			}
		}
		if rerr == io.EOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

// h2UpgradeHeaders turns the headers of an RFC 8441 extended CONNECT into
// those of an HTTP/1.1 upgrade: :protocol is gone (it is the Upgrade
// now), and a WebSocket gets the Sec-WebSocket-Key RFC 6455 requires of
// an HTTP/1.1 handshake, which RFC 8441 clients do not send (the
// upstream's Sec-WebSocket-Accept is not relayed).
func h2UpgradeHeaders(h http.Header) {
	delete(h, ":protocol")
	if strings.EqualFold(h.Get("Upgrade"), "websocket") && len(h["Sec-Websocket-Key"]) == 0 {
		var k [16]byte
		_, _ = rand.Read(k[:])
		h["Sec-Websocket-Key"] = []string{base64.StdEncoding.EncodeToString(k[:])}
	}
}

// tunnelH2 is the tunnel of an RFC 8441 extended CONNECT: the client gets
// 200 (the upstream's 101 translated, as Envoy does), then the stream's
// DATA frames carry the bytes: the request body upstream, the upstream's
// bytes as response body, each chunk flushed. Either end closes both: the
// handler returns (END_STREAM) and the upstream connection closes.
func (s *stream) tunnelH2(up io.ReadWriteCloser, h http.Header) cluster.RequestOutcome {
	wh := s.w.Header()
	for k, vs := range h {
		wh[k] = vs
	}
	s.e.ResponseCodeDetails = "via_upstream"
	s.writeHeader(http.StatusOK)
	rc := http.NewResponseController(s.w)
	if rc.Flush() != nil {
		s.e.ResponseFlags |= FlagDC
		return cluster.RequestSuccess
	}
	st := s.cfg.stats
	st.DownstreamCxUpgradesTotal.Add(1)
	st.DownstreamCxUpgradesActive.Add(1)
	defer st.DownstreamCxUpgradesActive.Add(-1)

	// cut unblocks both copies; the ResponseWriter must not be touched
	// once the handler returns (guarded by mu and done).
	var mu sync.Mutex
	done := false
	cut := func() {
		mu.Lock()
		if !done {
			_ = rc.SetReadDeadline(time.Unix(1, 0))
		}
		mu.Unlock()
		up.Close()
	}
	stopStream := context.AfterFunc(s.ctx, cut)
	stopDrain := context.AfterFunc(s.h.ctx, cut)
	upDone := make(chan struct{})
	go func() {
		defer close(upDone)
		var err error
		if s.body != nil {
			_, err = s.copyTouch(up, s.body, nil)
		}
		if err != nil || !halfClose(up) {
			cut()
		}
	}()
	sent, _ := s.copyTouch(flushWriter{s.w, rc}, up, nil)
	cut()
	<-upDone
	stopStream()
	stopDrain()
	mu.Lock()
	done = true
	mu.Unlock()
	s.e.BytesSent += sent
	switch {
	case context.Cause(s.ctx) == errStreamIdle:
		s.e.ResponseFlags |= FlagSI
		st.DownstreamRqIdle.Add(1)
	case s.h.ctx.Err() != nil:
		s.e.ResponseFlags |= FlagDC
	}
	return cluster.RequestSuccess
}

// flushWriter flushes each write: a tunnel's bytes go out as they come.
type flushWriter struct {
	w  io.Writer
	rc *http.ResponseController
}

func (f flushWriter) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	if err == nil {
		err = f.rc.Flush()
	}
	return n, err
}
