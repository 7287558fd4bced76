package httpconn

import (
	"bytes"
	"context"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Serve runs HTTP on one accepted downstream connection until the
// connection ends or ctx is done, and drains it as Envoy's connection
// manager does on a listener drain (with Istio's immediate strategy):
//
//   - When info.Draining is done (the drain starts), the client is asked
//     to go: HTTP/1.1 responses from then on carry "Connection: close" and
//     an idle keep-alive connection is closed; HTTP/2 gets a GOAWAY at once
//     (streams in flight may finish, new ones are refused). Requests in
//     flight are not cut. A connection accepted while its listener is
//     already draining is served, with the same close on its response.
//   - When ctx is done (the drain period is over), the connection is
//     closed, whatever is in flight (a request the upstream holds open,
//     with no route timeout, would otherwise keep it for ever), and Serve
//     returns once the connection's requests have ended.
//
// codec_type AUTO tells HTTP/2 with prior knowledge (h2c) from HTTP/1.1 by
// the connection preface.
func (c *Config) Serve(ctx context.Context, down net.Conn, env Env, info ConnInfo) error {
	st := c.stats
	st.DownstreamCxTotal.Add(1)
	st.DownstreamCxActive.Add(1)
	defer st.DownstreamCxActive.Add(-1)
	if ctx.Err() != nil {
		return nil // drained before it was served: nothing to serve
	}
	var drainC <-chan struct{} // nil: no drain to watch (never, or already started)
	drainingAtStart := false
	if info.Draining != nil {
		drainC = info.Draining.Done()
		select {
		case <-drainC:
			drainingAtStart, drainC = true, nil
		default:
		}
	}

	h := &connHandler{cfg: c, env: env, info: info, ctx: ctx}
	protos := new(http.Protocols)
	isH2 := false
	switch c.codec {
	case codecHTTP1:
		protos.SetHTTP1(true)
	case codecHTTP2:
		protos.SetUnencryptedHTTP2(true)
		isH2 = true
	default:
		// AUTO: decide by the preface here, as Envoy does: the first byte
		// that differs from "PRI * HTTP/2.0…" means HTTP/1.1. (net/http's
		// own detection waits for 24 bytes, which stalls a short HTTP/1
		// request such as a malformed request line.)
		// The drain's end, or its start while the client has sent nothing
		// (an idle connection), ends the connection; a connection that
		// arrives while its listener drains is given its request.
		raw := down
		cut := func() { _ = raw.SetReadDeadline(time.Now()) }
		stop := context.AfterFunc(ctx, cut)
		stopDrain := func() bool { return false }
		if drainC != nil {
			stopDrain = context.AfterFunc(info.Draining, cut)
		}
		var conn net.Conn
		var err error
		isH2, conn, err = sniffPreface(raw, c.idleTimeout, c.headTimeout())
		stop()
		stopDrain()
		if err != nil {
			return nil // closed or silent before a request: nothing to serve
		}
		down = conn
		if isH2 {
			protos.SetUnencryptedHTTP2(true)
		} else {
			protos.SetHTTP1(true)
		}
	}
	if !isH2 {
		// HTTP/1.x: the proxy's own serving loop (h1serve.go), over the
		// framing checks of h1Guard.
		c.serveH1(ctx, down, h, drainC, drainingAtStart, c.codec != codecHTTP1)
		h.tunnels.Wait() // upgraded connections (tunnel.go)
		return nil
	}
	ln := newOneConnListener(down)
	srv := &http.Server{
		Handler: h,
		// Envoy's stream exists from a request's first byte, so
		// stream_idle_timeout bounds the head too, as does
		// request_headers_timeout; h1Guard answers 408 when it fires.
		ReadHeaderTimeout: c.headTimeout(),
		IdleTimeout:       c.idleTimeout,
		// net/http allows 4096 bytes over MaxHeaderBytes for the request
		// line and slack: the total matches max_request_headers_kb.
		MaxHeaderBytes: max(c.maxHeaderBytes-4096, 1024),
		ErrorLog:       serverLog,
		Protocols:      protos,
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams:          c.h2.maxStreams,
			MaxReceiveBufferPerStream:     c.h2.streamWindow,
			MaxReceiveBufferPerConnection: c.h2.connWindow,
			// A connection whose peer takes no byte for this long
			// (its TCP window closed) is closed: no stream on it can
			// move, so none would outlive its stream_idle_timeout.
			WriteByteTimeout: c.streamIdleTimeout,
		},
		ConnState: ln.connState,
		// Requests' contexts carry the connection's ConnInfo (ConnInfoFrom).
		ConnContext: func(ctx context.Context, _ net.Conn) context.Context { return withConnInfo(ctx, &h.info) },
	}
	if drainingAtStart {
		// HTTP/1.1: every response says "Connection: close".
		srv.SetKeepAlivesEnabled(false)
	}
	if isH2 {
		h.srv = srv // for the premature-reset GOAWAY
	}
	if isH2 && info.Draining != nil {
		// HTTP/2: the first stream after the drain's start sends the
		// GOAWAY again (connHandler.maybeGoAway): net/http registers the
		// connection for its shutdown hook only once it serves it, so a
		// drain that starts with the connection (or just after) has
		// nobody to send it to.
		h.goAwayOnStream = info.Draining.Done()
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ln)
	}()
	// Serve's listener closing (goAway's Shutdown) must not come before
	// the connection is taken, or it would never be served.
	select {
	case <-ln.taken:
	case <-served:
		return nil // net/http refused to serve (its setup failed): nothing served
	}
	endC := ctx.Done()
	for done := false; !done; {
		select {
		case <-ln.connDone():
			done = true
		case <-drainC:
			drainC = nil
			// HTTP/1.1: idle now: closed; busy: "Connection: close" on
			// its response (net/http's keep-alives off; unlike Shutdown
			// this does not drop a request read just after).
			srv.SetKeepAlivesEnabled(false)
			if isH2 {
				goAway(srv)
			}
		case <-endC:
			// The drain is over: cut the connection. Its requests see
			// their context cancelled and end (upstream requests too).
			endC = nil
			_ = down.Close()
		}
	}
	ln.Close()
	<-served
	h.tunnels.Wait() // upgraded connections net/http let go of (tunnel.go)
	return nil
}

// goAway sends an HTTP/2 graceful GOAWAY (error NO_ERROR) on srv's
// connection, by net/http's shutdown hook: Shutdown with a context
// already done starts the hook and returns at once; the connection itself
// goes on until its streams are done (or it is closed).
func goAway(srv *http.Server) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = srv.Shutdown(ctx)
}

// serverLog is net/http's ErrorLog for the downstream servers. What
// net/http reports there is mostly the client's doing (a bad preface, a
// reset mid-request) and already counted and logged by the proxy, so it is
// dropped; a handler panic, which net/http recovers and would otherwise
// hide, is a meshtun bug and goes to stderr with its stack.
var serverLog = log.New(panicOnly{os.Stderr}, "", 0)

// panicOnly passes on the "http: panic serving" reports only.
type panicOnly struct{ w io.Writer }

func (p panicOnly) Write(b []byte) (int, error) {
	if bytes.Contains(b, []byte("http: panic serving")) {
		_, _ = p.w.Write(append([]byte("meshtun: BUG: "), b...))
	}
	return len(b), nil
}

const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// headTimeout bounds the arrival of a request head once its first byte
// came: the shorter of request_headers_timeout and stream_idle_timeout
// (0: none).
func (c *Config) headTimeout() time.Duration {
	d := c.requestHeadersTimeout
	if s := c.streamIdleTimeout; s > 0 && (d <= 0 || s < d) {
		d = s
	}
	return d
}

// sniffPreface reads until the bytes diverge from the HTTP/2 connection
// preface or match all of it, and returns a conn that replays them. The
// first byte may take idle (the connection's idle timeout); the rest of
// the preface head (a head under way: a slowloris sending one byte at a
// time) only head.
func sniffPreface(c net.Conn, idle, head time.Duration) (bool, net.Conn, error) {
	if idle > 0 {
		_ = c.SetReadDeadline(time.Now().Add(idle))
	}
	if idle > 0 || head > 0 {
		defer c.SetReadDeadline(time.Time{})
	}
	buf := make([]byte, len(h2Preface))
	n := 0
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		if n == 0 && m > 0 && head > 0 {
			_ = c.SetReadDeadline(time.Now().Add(head))
		}
		n += m
		if string(buf[:n]) != h2Preface[:n] {
			return false, &prefixConn{Conn: c, pre: buf[:n]}, nil
		}
		if err != nil {
			return false, nil, err
		}
	}
	return true, &prefixConn{Conn: c, pre: buf}, nil
}

// prefixConn replays bytes already read from Conn.
type prefixConn struct {
	net.Conn
	pre []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.pre) > 0 {
		n := copy(b, p.pre)
		p.pre = p.pre[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

// oneConnListener hands out one connection, then blocks until closed.
// It also tells when the connection was taken by the server (taken) and
// when it ended (connDone), from the server's ConnState.
type oneConnListener struct {
	conn      net.Conn
	given     atomic.Bool
	closed    chan struct{}
	closeOnce sync.Once
	taken     chan struct{} // the server tracks the connection
	done      chan struct{} // the connection is closed or hijacked
	doneOnce  sync.Once
}

func newOneConnListener(c net.Conn) *oneConnListener {
	return &oneConnListener{conn: c, closed: make(chan struct{}), taken: make(chan struct{}), done: make(chan struct{})}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	if l.given.CompareAndSwap(false, true) {
		return l.conn, nil
	}
	<-l.closed
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return nil
}

func (l *oneConnListener) connState(_ net.Conn, s http.ConnState) {
	switch s {
	case http.StateNew:
		close(l.taken)
	case http.StateHijacked:
		if g, ok := l.conn.(*h1Guard); ok {
			g.hijacked() // the handler's bytes from now on
		}
		l.doneOnce.Do(func() { close(l.done) })
	case http.StateClosed:
		l.doneOnce.Do(func() { close(l.done) })
	}
}

func (l *oneConnListener) connDone() <-chan struct{} { return l.done }

func (l *oneConnListener) Addr() net.Addr { return l.conn.LocalAddr() }

// connHandler serves the requests of one downstream connection.
type connHandler struct {
	cfg     *Config
	env     Env
	info    ConnInfo
	counted atomic.Bool // downstream_cx_http{1,2}_total counted
	xfcc    xfccCache   // the connection's x-forwarded-client-cert element

	// ctx is Serve's: its end (the drain's end) also ends the
	// connection's tunnels, which Serve waits for (tunnels) since
	// net/http no longer tracks a hijacked connection.
	ctx     context.Context
	tunnels sync.WaitGroup

	// goAwayOnStream (the listener's drain start), once done, makes the
	// next HTTP/2 stream send the connection's GOAWAY on srv, for a drain
	// that started before net/http registered the connection for its
	// shutdown hook. Set before the connection is served; a stream's
	// check is a non-blocking channel receive.
	goAwayOnStream <-chan struct{}
	srv            *http.Server // HTTP/2 only
	goneAway       atomic.Bool

	// Envoy's premature-reset detection (CVE-2023-44487, "rapid
	// reset"): streams ended, and those the client reset within
	// prematureResetLifetime of their start.
	streamsClosed   atomic.Uint64
	prematureResets atomic.Uint64
	resetGoAway     atomic.Bool
}

// Envoy's runtime defaults overload.premature_reset_min_stream_lifetime_seconds
// and overload.premature_reset_total_stream_count.
const (
	prematureResetLifetime = time.Second
	prematureResetTotal    = 500
)

// streamEnded counts an HTTP/2 stream's end for the premature-reset
// detection, as Envoy's ConnectionManagerImpl does: once half of the
// connection's streams (of at least prematureResetTotal, or half of that
// number already) were reset by the client before a second had passed,
// the connection gets a GOAWAY and takes no more streams: a rapid-reset
// flood costs a bounded number of handlers and upstream requests.
func (h *connHandler) streamEnded(reset bool, lifetime time.Duration) {
	closed := h.streamsClosed.Add(1)
	premature := h.prematureResets.Load()
	if reset && lifetime < prematureResetLifetime {
		premature = h.prematureResets.Add(1)
	}
	if premature == 0 {
		return
	}
	if closed < prematureResetTotal {
		if premature*2 < prematureResetTotal {
			return
		}
	} else if premature*2 < closed {
		return
	}
	if h.resetGoAway.CompareAndSwap(false, true) {
		h.cfg.stats.PrematureResets.Add(1)
		goAway(h.srv)
	}
}

func (h *connHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.serveStream(r.Context(), w, r)
}

// serveStream serves request r, whose context is ctx. The context comes
// beside the request rather than in it: the HTTP/1.x loop (h1serve.go)
// reads requests with http.ReadRequest, and r.WithContext would copy each
// one (a Request is about 250 bytes) only to carry the connection's
// context.
func (h *connHandler) serveStream(ctx context.Context, w http.ResponseWriter, r *http.Request) {
	cfg := h.cfg
	st := cfg.stats
	if h.counted.CompareAndSwap(false, true) {
		if r.ProtoMajor == 2 {
			st.DownstreamCxHTTP2Total.Add(1)
		} else {
			st.DownstreamCxHTTP1Total.Add(1)
		}
	}
	st.DownstreamRqTotal.Add(1)
	if r.ProtoMajor == 2 {
		h.maybeGoAway()
		st.DownstreamRqHTTP2Total.Add(1)
	} else {
		st.DownstreamRqHTTP1Total.Add(1)
	}
	st.DownstreamRqActive.Add(1)

	s := streamPool.Get().(*stream)
	s.init(h, ctx, w, r)
	defer func() {
		st.DownstreamRqActive.Add(-1)
		if h.srv != nil {
			h.streamEnded(s.clientReset(), time.Since(s.e.Start))
		}
		s.finish()
	}()
	s.serve()
}

// clientReset reports whether the client ended the stream before its
// handler did: the request's context is done then only when the client
// reset it (or the connection went), or when the proxy itself reset it
// for a timeout, which Envoy does not count as a premature reset.
func (s *stream) clientReset() bool {
	if s.rctx.Err() == nil {
		return false
	}
	c := context.Cause(s.ctx)
	return c != errStreamIdle && c != errRequestTimeout
}

// maybeGoAway sends the GOAWAY of a drain that began before the
// connection's first stream (see goAwayOnStream); once per connection.
func (h *connHandler) maybeGoAway() {
	if h.goAwayOnStream == nil {
		return
	}
	select {
	case <-h.goAwayOnStream:
		if h.goneAway.CompareAndSwap(false, true) {
			goAway(h.srv)
		}
	default:
	}
}

// replyHeader resets the response header for a reply of the proxy's own
// (a local reply or a redirect): only server and the request id.
func (s *stream) replyHeader() http.Header {
	h := s.w.Header()
	clear(h)
	s.setServer(h)
	if s.cfg.alwaysSetRequestID && s.e.RequestID != "" {
		h["X-Request-Id"] = []string{s.e.RequestID}
	}
	if s.closeConn {
		h["Connection"] = []string{"close"}
	}
	return h
}

// localReply answers from the proxy itself (no upstream response): with
// a text/plain body as Envoy's local replies, or, for gRPC requests, as a
// trailers-only gRPC response whose grpc-status maps the HTTP status.
func (s *stream) localReply(code int, body, details string) {
	s.e.ResponseCodeDetails = details
	if s.wroteHeader {
		s.abort()
		return
	}
	h := s.replyHeader()
	if isGRPC(s.r) && code != http.StatusOK {
		h["Content-Type"] = []string{"application/grpc"}
		gs := grpcStatusFor(code)
		if s.grpcReplyStatus != 0 {
			gs = s.grpcReplyStatus
		}
		h["Grpc-Status"] = []string{strconv.Itoa(gs)}
		if body != "" {
			h["Grpc-Message"] = []string{body}
		}
		s.writeHeader(http.StatusOK)
		s.e.ResponseCode = http.StatusOK
		return
	}
	if body != "" {
		h["Content-Type"] = []string{"text/plain"}
		h["Content-Length"] = []string{strconv.Itoa(len(body))}
	}
	s.writeHeader(code)
	if body != "" && s.r.Method != http.MethodHead {
		if s.r.ProtoMajor == 2 && s.cfg.streamIdleTimeout > 0 {
			// net/http sends the body after the handler returns, past
			// the idle watch: a client with a closed flow-control
			// window would hold the stream for ever without a deadline.
			_ = http.NewResponseController(s.w).SetWriteDeadline(time.Now().Add(s.cfg.streamIdleTimeout))
		}
		n, _ := io.WriteString(s.w, body)
		s.e.BytesSent += int64(n)
	}
}

// grpcStatusFor is Envoy's Grpc::Utility::httpToGrpcStatus.
func grpcStatusFor(code int) int {
	switch code {
	case 400:
		return 13 // INTERNAL
	case 401:
		return 16 // UNAUTHENTICATED
	case 403:
		return 7 // PERMISSION_DENIED
	case 404:
		return 12 // UNIMPLEMENTED
	case 429, 502, 503, 504:
		return 14 // UNAVAILABLE
	}
	return 2 // UNKNOWN
}

func (s *stream) writeHeader(code int) {
	s.wroteHeader = true
	s.e.ResponseCode = code
	s.w.WriteHeader(code)
}

// setServer applies server_header_transformation.
func (s *stream) setServer(h http.Header) {
	switch s.cfg.serverTransform {
	case 0: // OVERWRITE
		h["Server"] = s.cfg.serverVals
	case 1: // APPEND_IF_ABSENT
		if _, ok := h["Server"]; !ok {
			h["Server"] = s.cfg.serverVals
		}
	}
}

// abort resets the downstream stream after its response started (HTTP/2
// RST_STREAM, HTTP/1.1 connection close), as Envoy does when an upstream
// fails mid-response.
func (s *stream) abort() {
	s.aborted = true
}

// idleWatch is the per-stream idle timer (stream_idle_timeout, or the
// route's idle_timeout): it fires when neither side moved a byte for d.
// touch is one atomic store, cheap enough for every body read and write;
// the timer is only re-armed when it fires early. mu orders arm (the
// route replacing the timeout) against fire, so a shorter route timeout
// is never overwritten by a re-arm computed from the old one.
// Firing cancels the stream with errStreamIdle; a stream blocked reading
// a stalled body is ended by its bodyUnblock, one blocked writing its
// response to a client that reads nothing by the write deadline fire sets
// (writesTo): Envoy's idle timer ends a stream that makes no progress
// either way, so a slow reader cannot hold an upstream slot for ever.
type idleWatch struct {
	last   atomic.Int64 // nanotime of the last activity
	cancel context.CancelCauseFunc

	mu sync.Mutex
	d  time.Duration // 0: disarmed
	t  *time.Timer
	w  http.ResponseWriter // set while the response body is relayed
	// fired: the stream was cancelled for idleness (writesTo then cuts
	// the writes at once: the relay may still hold buffered bytes).
	fired bool
}

// writesTo tells the watch that the stream now writes its response body
// to w: a fire from now on (or one already past) also cuts the blocked
// write.
func (iw *idleWatch) writesTo(w http.ResponseWriter) {
	iw.mu.Lock()
	iw.w = w
	if iw.fired {
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now())
	}
	iw.mu.Unlock()
}

// bodyUnblock ends a stream whose client stalls mid-body. Cancelling the
// stream is not enough then: the router is blocked reading the body on
// the stream's goroutine (it streams it upstream). When a timeout cancels
// the stream (request_timeout or stream_idle_timeout) while the body is
// unfinished, the downstream read deadline is moved to now: the read
// fails and the stream answers 408, and an HTTP/1.1 connection closes
// (its unread body is in the way), as in Envoy. A complete request (say,
// a GET waiting for its upstream) keeps its connection readable.
//
// The deadline is moved under mu and only before finish: once the
// handler returns, the ResponseWriter belongs to the next request (HTTP/1.1)
// or is gone (HTTP/2, where touching it would crash).
type bodyUnblock struct {
	stop func() bool // context.AfterFunc's

	mu   sync.Mutex
	done bool
	w    http.ResponseWriter
	body *countingBody
}

func newBodyUnblock(ctx context.Context, w http.ResponseWriter, body *countingBody) *bodyUnblock {
	u := &bodyUnblock{w: w, body: body}
	u.stop = context.AfterFunc(ctx, func() {
		if c := context.Cause(ctx); c != errRequestTimeout && c != errStreamIdle && c != errMaxDuration {
			return
		}
		u.mu.Lock()
		defer u.mu.Unlock()
		if !u.done && !u.body.ended.Load() {
			_ = http.NewResponseController(u.w).SetReadDeadline(time.Now())
		}
	})
	return u
}

// finish is called by the stream before its handler returns.
func (u *bodyUnblock) finish() {
	u.stop()
	u.mu.Lock()
	u.done = true
	u.w, u.body = nil, nil
	u.mu.Unlock()
}

func (iw *idleWatch) touch() { iw.last.Store(nanotime()) }

// reset readies the watch (new or pooled with its stream) for a stream
// whose context cancel ends: disarmed, idle counted from now. A fire left
// from the previous stream finds it disarmed, or re-arms it from the new
// stream's own state (it reads cancel and d under mu).
func (iw *idleWatch) reset(cancel context.CancelCauseFunc) {
	iw.mu.Lock()
	iw.cancel = cancel
	iw.d = 0
	iw.fired = false
	iw.mu.Unlock()
	iw.touch()
}

// arm sets the idle timeout to d, counted from the last activity; 0
// disables it (a route's idle_timeout of 0 turns off the connection
// manager's). Called on the stream goroutine.
func (iw *idleWatch) arm(d time.Duration) {
	iw.mu.Lock()
	defer iw.mu.Unlock()
	iw.d = d
	if d <= 0 {
		if iw.t != nil {
			iw.t.Stop()
		}
		return
	}
	rem := max(d-time.Duration(nanotime()-iw.last.Load()), time.Nanosecond)
	if iw.t == nil {
		// Created stopped and started by Reset once iw.t is set, so that
		// fire, which re-arms through iw.t, never sees it unset.
		iw.t = time.AfterFunc(time.Duration(1<<62), iw.fire)
	}
	iw.t.Reset(rem)
}

// stop disarms the watch for good (the stream ended).
func (iw *idleWatch) stop() {
	iw.mu.Lock()
	iw.d = 0
	iw.cancel = nil
	iw.w = nil // the ResponseWriter is not the watch's to touch any more
	if iw.t != nil {
		iw.t.Stop()
	}
	iw.mu.Unlock()
}

func (iw *idleWatch) fire() {
	iw.mu.Lock()
	d := iw.d
	if d <= 0 {
		iw.mu.Unlock()
		return
	}
	if idle := time.Duration(nanotime() - iw.last.Load()); idle < d {
		iw.t.Reset(d - idle)
		iw.mu.Unlock()
		return
	}
	cancel := iw.cancel
	iw.fired = true
	iw.mu.Unlock()
	cancel(errStreamIdle)
	// A write blocked on the client (HTTP/1.1: the socket; HTTP/2: the
	// flow-control window) fails at once; HTTP/2 resets the stream.
	// Under mu: stop, before the handler returns, takes w away.
	iw.mu.Lock()
	if w := iw.w; w != nil && iw.cancel != nil {
		_ = http.NewResponseController(w).SetWriteDeadline(time.Now())
	}
	iw.mu.Unlock()
}

var epoch = time.Now()

func nanotime() int64 { return int64(time.Since(epoch)) }
