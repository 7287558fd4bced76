package httpconn

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// h1conn serves one downstream HTTP/1.x connection: the proxy's own
// serving loop in place of net/http's http.Server, which costs a
// background read goroutine, a context and a hand-off per request and a
// flush per response (its share was most of the HCM's CPU). Requests are
// parsed by http.ReadRequest (net/http's own parser, so the framing rules
// are the ones h1Guard follows underneath) on a bufio.Reader the
// connection owns, or, for a usual head already buffered whole, by
// fastRequest, which makes the same request with a quarter of the
// allocations and leaves everything else to it (h1fast.go); they run on the connection's goroutine one at a time;
// responses go through h1Writer into a bufio.Writer that is flushed when
// a response ends and no pipelined request is already waiting, or
// before the loop would block reading (so a pipelining client is never
// left waiting for an answer it has paid for).
//
// A client that goes away while its request waits for the upstream is
// noticed by a read of the connection that starts only when the request
// has been running for watchDelay (most finish earlier, so most pay
// for a timer reset, not a goroutine): its EOF cancels the request.
type h1conn struct {
	cfg    *Config
	h      *connHandler
	conn   net.Conn // the h1Guard over the downstream
	guard  *h1Guard
	cr     connReader
	br     *bufio.Reader
	bw     *bufio.Writer
	ctx    context.Context // the requests' context: Serve's, with ConnInfo
	cancel context.CancelCauseFunc
	remote string
	pend   []byte // a response's body held until its length is known
	w      h1Writer

	// sniffed: the first request's first bytes already arrived (the
	// preface sniff waited for them).
	sniffed bool
	cut     bool // the connection ends without flushing what is buffered

	mu        sync.Mutex
	idle      bool   // waiting for a request's first byte
	draining  bool   // responses say "Connection: close", idle ends the connection
	gen       uint64 // the request being served (bodyRead's check)
	bgOK      bool   // the request body is read: a background read may watch the client
	bgRunning bool
	bgAborted bool
	bgDone    chan struct{}
	ended     bool // the request's handler returned (or hijacked)
	gone      bool // the background read saw the client go
	watch     *time.Timer
}

// watchDelay is how long a request runs before its connection is watched
// for the client going away (net/http watches from the start, at the
// cost of a goroutine and a hand-off per request).
const watchDelay = 5 * time.Millisecond

// maxPostHandlerRead is how much of a request body the handler left
// unread is drained so that the connection can serve the next request
// (net/http's maxPostHandlerReadBytes); beyond it the connection closes.
const maxPostHandlerRead = 256 << 10

// aLongTimeAgo is a read deadline in the past: it ends a blocked read at
// once (below h1Guard's abortDeadline, so not taken for a slow client).
var aLongTimeAgo = time.Unix(1, 0)

var (
	h1ReaderPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4<<10) }}
	h1WriterPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}
)

// connReader is what the bufio.Reader reads the connection through: it
// bounds a request head (max_request_headers_kb, net/http's 431) and
// flushes pending response bytes before a read that may block.
type connReader struct {
	c        *h1conn
	remain   int64 // bytes the head may still take
	hitLimit bool
	// flush: the loop reads a head; pending response bytes go out
	// before a read that may block (a body may be read on another
	// goroutine, which must not touch the writer).
	flush bool
}

func (r *connReader) Read(p []byte) (int, error) {
	if r.remain <= 0 {
		r.hitLimit = true
		return 0, io.EOF
	}
	if int64(len(p)) > r.remain {
		p = p[:r.remain]
	}
	if r.flush && r.c.bw.Buffered() > 0 {
		if err := r.c.bw.Flush(); err != nil {
			return 0, err
		}
	}
	n, err := r.c.conn.Read(p)
	if r.remain != math.MaxInt64 {
		r.remain -= int64(n)
	}
	return n, err
}

// serveH1 runs the HTTP/1.x loop on down until the connection ends, is
// hijacked (an upgrade) or ctx is done.
func (c *Config) serveH1(ctx context.Context, down net.Conn, h *connHandler, drainC <-chan struct{}, drainingAtStart, sniffed bool) {
	g := newH1Guard(down, c, &h.info)
	hc := &h1conn{cfg: c, h: h, conn: g, guard: g, sniffed: sniffed, draining: drainingAtStart}
	hc.ctx, hc.cancel = context.WithCancelCause(withConnInfo(ctx, &h.info))
	defer hc.cancel(nil)
	if h.info.Peer.IsValid() {
		hc.remote = h.info.Peer.String()
	} else if a := down.RemoteAddr(); a != nil {
		hc.remote = a.String()
	}
	hc.cr = connReader{c: hc, remain: math.MaxInt64}
	hc.br = h1ReaderPool.Get().(*bufio.Reader)
	hc.br.Reset(&hc.cr)
	hc.bw = h1WriterPool.Get().(*bufio.Writer)
	hc.bw.Reset(g)

	// The drain's end closes the connection (whatever is in flight);
	// its start closes it if idle, else the response in flight says
	// "Connection: close".
	stop := context.AfterFunc(ctx, func() { _ = g.Close() })
	defer stop()
	if drainC != nil {
		stopDrain := context.AfterFunc(h.info.Draining, hc.drain)
		defer stopDrain()
	}
	hijacked := hc.loop()
	if hc.watch != nil {
		hc.watch.Stop()
	}
	if hijacked {
		return // the tunnel owns the connection and its reader
	}
	if !hc.cut {
		_ = hc.bw.Flush()
	}
	_ = g.Close()
	hc.bw.Reset(nil)
	h1WriterPool.Put(hc.bw)
	hc.br.Reset(nil)
	h1ReaderPool.Put(hc.br)
}

// drain is the drain's start: an idle connection is ended now.
func (hc *h1conn) drain() {
	hc.mu.Lock()
	hc.draining = true
	if hc.idle {
		_ = hc.conn.SetReadDeadline(aLongTimeAgo)
	}
	hc.mu.Unlock()
}

// loop serves requests until the connection is to close; true when a
// handler hijacked it.
func (hc *h1conn) loop() (hijacked bool) {
	cfg := hc.cfg
	headLimit := int64(max(cfg.maxHeaderBytes-4096, 1024) + 4096)
	for first := true; ; first = false {
		if !hc.waitRequest(first) {
			return false
		}
		// A head waiting whole in the buffer, of the usual kind, is
		// parsed without net/http's allocations (h1fast.go); anything
		// else, and every error, is http.ReadRequest's.
		req := fastRequest(hc.br, int(headLimit))
		if req == nil {
			hc.cr.remain, hc.cr.hitLimit, hc.cr.flush = headLimit, false, true
			var err error
			req, err = http.ReadRequest(hc.br)
			hc.cr.remain, hc.cr.flush = math.MaxInt64, false
			if err != nil {
				hc.badRequest(err)
				return false
			}
		}
		if d := cfg.headTimeout(); d > 0 || cfg.idleTimeout > 0 {
			_ = hc.conn.SetReadDeadline(time.Time{})
		}
		if code, why := checkRequest(req); code != 0 {
			hc.reject(code, why, req.ProtoMinor == 0)
			return false
		}
		if !hc.serveRequest(req) {
			return hc.w.hijacked
		}
	}
}

// waitRequest waits for the first byte of the next request (idle_timeout
// between requests), then bounds the arrival of its head
// (request_headers_timeout, stream_idle_timeout): false when the
// connection is to end instead.
func (hc *h1conn) waitRequest(first bool) bool {
	cfg := hc.cfg
	head := cfg.headTimeout()
	if hc.br.Buffered() == 0 && !(first && hc.sniffed) {
		if hc.bw.Buffered() > 0 {
			if hc.bw.Flush() != nil {
				return false
			}
		}
		hc.mu.Lock()
		if hc.draining && !first {
			hc.mu.Unlock()
			return false
		}
		hc.idle = true
		hc.mu.Unlock()
		wait := cfg.idleTimeout
		if first && head > 0 {
			// net/http's ReadHeaderTimeout counted from the accept.
			wait = head
		}
		if wait > 0 {
			_ = hc.conn.SetReadDeadline(time.Now().Add(wait))
		}
		_, err := hc.br.Peek(1)
		hc.mu.Lock()
		hc.idle = false
		hc.mu.Unlock()
		if err != nil {
			return false
		}
	} else if !first {
		hc.mu.Lock()
		draining := hc.draining
		hc.mu.Unlock()
		if draining {
			return false
		}
	}
	switch {
	case hc.headBuffered():
		// The whole head is here: reading it cannot block, no head
		// deadline to arm (what idle set is cleared once it is read).
	case head > 0:
		_ = hc.conn.SetReadDeadline(time.Now().Add(head))
	case cfg.idleTimeout > 0:
		_ = hc.conn.SetReadDeadline(time.Time{})
	}
	return true
}

// headBuffered reports whether the buffer holds a whole request head
// (its empty line), as it usually does: a client writes a head at once.
func (hc *h1conn) headBuffered() bool {
	b, _ := hc.br.Peek(hc.br.Buffered())
	return bytes.Contains(b, crlfcrlf) || bytes.Contains(b, lflf)
}

var crlfcrlf, lflf = []byte("\r\n\r\n"), []byte("\n\n")

// checkRequest applies the checks net/http's server makes beyond
// parsing: the protocol version, Host, and header names and values.
func checkRequest(r *http.Request) (int, string) {
	if r.ProtoMajor != 1 || r.ProtoMinor > 1 {
		return http.StatusHTTPVersionNotSupported, "unsupported protocol version"
	}
	// http.ReadRequest moved Host to r.Host (a second Host field is
	// refused by h1Guard, which counts them).
	if r.ProtoMinor == 1 && r.Host == "" && r.Method != http.MethodConnect {
		if _, ok := r.Header["Host"]; !ok || r.URL.Host == "" {
			return http.StatusBadRequest, "missing required Host header"
		}
	}
	if r.Host != "" && !httpguts.ValidHostHeader(r.Host) {
		return http.StatusBadRequest, "malformed Host header"
	}
	for k, vv := range r.Header {
		if !httpguts.ValidHeaderFieldName(k) {
			return http.StatusBadRequest, "invalid header name"
		}
		for _, v := range vv {
			if !httpguts.ValidHeaderFieldValue(v) {
				return http.StatusBadRequest, "invalid header value"
			}
		}
	}
	return 0, ""
}

// badRequest answers a request head that could not be read as net/http
// does (431 for a head over the limit, 501 for a transfer coding other
// than chunked, nothing for a connection that closed or timed out, else
// 400), and logs it with its reason, as Envoy logs a codec error.
func (hc *h1conn) badRequest(err error) {
	if hc.guard.accounted {
		// The guard refused the head (and logged it): net/http's plain
		// 400; or the head timed out and the guard sent the 408.
		if !isCommonReadError(err) {
			hc.replyPlain(http.StatusBadRequest, "")
		}
		return
	}
	var code int
	var why string
	switch {
	case hc.cr.hitLimit:
		code, why = http.StatusRequestHeaderFieldsTooLarge, "headers_too_large"
	case strings.HasPrefix(err.Error(), "unsupported transfer encoding"):
		code, why = http.StatusNotImplemented, "invalid_transfer_encoding"
	case isCommonReadError(err):
		return
	default:
		code, why = http.StatusBadRequest, codecReason(err)
	}
	hc.reject(code, why, false)
}

// isCommonReadError: the client went, or the head timed out (h1Guard
// answered that 408): no reply (net/http's isCommonNetReadError).
func isCommonReadError(err error) bool {
	if err == io.EOF || isTimeout(err) {
		return true
	}
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "read"
}

// codecReason names what was wrong with a head net/http's parser
// refused, for the access log's response code details.
func codecReason(err error) string {
	msg := err.Error()
	for _, m := range [...]struct{ prefix, reason string }{
		{"malformed HTTP request", "invalid_request_line"},
		{"malformed HTTP version", "invalid_version"},
		{"invalid method", "invalid_method"},
		{"missing form body", "invalid_request_line"},
		{"malformed MIME header", "invalid_header"},
		{"invalid header", "invalid_header"},
		{"too many transfer encodings", "invalid_transfer_encoding"},
		{"bad Content-Length", "invalid_content_length"},
		{"http: message cannot contain multiple Content-Length", "invalid_content_length"},
		{"invalid Content-Length", "invalid_content_length"},
		{"unexpected EOF", "unexpected_eof"},
		{"parse ", "invalid_url"},
	} {
		if strings.HasPrefix(msg, m.prefix) {
			return m.reason
		}
	}
	if errors.Is(err, errFraming) {
		return "invalid_framing"
	}
	return "codec_error"
}

// reject answers a request refused before the handler with net/http's
// plain reply and closes the connection; the access log gets
// http1.<why> with flag DPE.
func (hc *h1conn) reject(code int, why string, http10 bool) {
	hc.replyPlain(code, why)
	details := "http1." + strings.ReplaceAll(why, " ", "_")
	accountH1(hc.cfg, &hc.h.info, code, FlagDPE, details, http10)
}

// replyPlain writes net/http's plain answer to a request it refused
// before its handler, with "Connection: close".
func (hc *h1conn) replyPlain(code int, why string) {
	text := http.StatusText(code)
	body := "400 Bad Request"
	switch code {
	case http.StatusRequestHeaderFieldsTooLarge:
		body = "431 " + text
	case http.StatusNotImplemented:
		body = "Unsupported transfer encoding"
	case http.StatusBadRequest:
		if strings.Contains(why, " ") {
			body += ": " + why
		}
	default:
		body = text + ": " + why
	}
	bw := hc.bw
	bw.WriteString("HTTP/1.1 ")
	bw.WriteString(statusLine(code))
	bw.WriteString("\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n")
	bw.WriteString(body)
	_ = bw.Flush()
	if code == http.StatusRequestHeaderFieldsTooLarge {
		// The client may still be sending its head: half-close and let
		// it read the answer rather than reset it.
		closeWrite(hc.guard.Conn)
		_ = hc.conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, _ = io.Copy(io.Discard, io.LimitReader(hc.guard.Conn, 256<<10))
	}
}

// statusLine is "<code> <reason>" of a status line.
func statusLine(code int) string {
	if code == http.StatusOK {
		return "200 OK"
	}
	text := http.StatusText(code)
	if text == "" {
		text = "status code " + itoa(code)
	}
	return itoa(code) + " " + text
}

// serveRequest runs the handler for req and finishes its response; false
// when the connection is not to serve another request.
func (hc *h1conn) serveRequest(req *http.Request) bool {
	req.RemoteAddr = hc.remote
	w := &hc.w
	w.reset(hc, req)
	hc.mu.Lock()
	hc.gen++
	gen := hc.gen
	hc.mu.Unlock()
	var b *downBody
	if req.Body != nil && req.Body != http.NoBody {
		b = &downBody{hc: hc, rc: req.Body, gen: gen}
		req.Body = b
		if hasToken(req.Header["Expect"], "100-continue") {
			if req.ProtoMinor >= 1 && req.ContentLength != 0 {
				b.expect = true
			}
		} else if len(req.Header["Expect"]) > 0 {
			w.closeAfter = true
			w.Header()["Connection"] = []string{"close"}
			w.WriteHeader(http.StatusExpectationFailed)
			w.finish()
			return false
		}
	} else {
		if len(req.Header["Expect"]) > 0 && !hasToken(req.Header["Expect"], "100-continue") {
			w.closeAfter = true
			w.WriteHeader(http.StatusExpectationFailed)
			w.finish()
			return false
		}
		hc.bodyRead(gen) // nothing to read: the client may be watched now
	}

	aborted := hc.run(w, req)
	hc.stopWatch()
	if w.hijacked {
		return false
	}
	if hc.ctx.Err() != nil {
		// The drain's end or the client gone: the connection is cut,
		// nothing more of the response goes out.
		hc.cut = true
		return false
	}
	if aborted {
		// Resets the stream: the response so far goes out (without its
		// end), then the connection closes.
		w.flushPartial()
		return false
	}
	keep := w.finish()
	if b != nil && !b.finish(keep) {
		keep = false
	}
	hc.mu.Lock()
	gone := hc.gone
	hc.mu.Unlock()
	if gone {
		return false
	}
	if !keep {
		_ = hc.bw.Flush()
	}
	return keep
}

// run calls the handler; true when it panicked (http.ErrAbortHandler is
// how a stream resets; any other panic is a bug, reported with its stack
// as net/http reported it).
func (hc *h1conn) run(w *h1Writer, r *http.Request) (panicked bool) {
	defer func() {
		if p := recover(); p != nil {
			panicked = true
			if p != http.ErrAbortHandler {
				buf := make([]byte, 64<<10)
				buf = buf[:runtime.Stack(buf, false)]
				serverLog.Printf("http: panic serving %v: %v\n%s", hc.remote, p, buf)
			}
		}
	}()
	hc.h.serveStream(hc.ctx, w, r)
	return false
}

// bodyRead is called once the request body was read to its end (or there
// is none): the bufio.Reader is free, so the watch for the client going
// away may read the connection from now on.
func (hc *h1conn) bodyRead(gen uint64) {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if gen != hc.gen || hc.ended {
		return
	}
	hc.bgOK = true
	if hc.watch == nil {
		hc.watch = time.AfterFunc(watchDelay, hc.watchClient)
	} else {
		hc.watch.Reset(watchDelay)
	}
}

// pipelined reports whether the next request's bytes are already
// buffered (its response will flush this one).
func (hc *h1conn) pipelined() bool {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	return !hc.bgRunning && hc.br.Buffered() > 0
}

// watchClient reads the connection while a request runs (on the timer's
// goroutine): bytes are the next pipelined request, kept buffered; an
// error other than the loop's own abort means the client went, which
// cancels its requests (flag DC), as net/http's background read does.
func (hc *h1conn) watchClient() {
	hc.mu.Lock()
	if !hc.bgOK || hc.bgRunning || hc.br.Buffered() > 0 {
		hc.mu.Unlock()
		return
	}
	hc.bgRunning = true
	done := make(chan struct{})
	hc.bgDone = done
	hc.mu.Unlock()

	_, err := hc.br.Peek(1)

	hc.mu.Lock()
	hc.bgRunning = false
	if err != nil && !hc.bgAborted {
		hc.gone = true
		hc.cancel(context.Canceled)
	}
	close(done)
	hc.mu.Unlock()
}

// stopWatch ends the watch before the loop (or a hijacker) reads the
// connection itself.
func (hc *h1conn) stopWatch() {
	hc.mu.Lock()
	hc.bgOK = false
	hc.ended = true
	if hc.watch != nil {
		hc.watch.Stop()
	}
	if !hc.bgRunning {
		hc.mu.Unlock()
		return
	}
	hc.bgAborted = true
	_ = hc.conn.SetReadDeadline(aLongTimeAgo)
	done := hc.bgDone
	hc.mu.Unlock()
	<-done
	hc.mu.Lock()
	hc.bgAborted = false
	hc.mu.Unlock()
	_ = hc.conn.SetReadDeadline(time.Time{})
}

// downBody is a request body as the handler reads it: the 100 Continue a
// client waits for goes out before its first read, the end of the body
// lets the client be watched, and reads after the handler returned (a
// transport still sending a body it gave up) fail instead of taking the
// next request's bytes.
type downBody struct {
	hc     *h1conn
	rc     io.ReadCloser
	gen    uint64
	mu     sync.Mutex
	n      atomic.Int64
	expect bool
	eof    bool
	err    error
	closed bool
}

// read is how many body bytes the handler has read.
func (b *downBody) read() int64 { return b.n.Load() }

func (b *downBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, http.ErrBodyReadAfterClose
	}
	if b.err != nil {
		return 0, b.err
	}
	if b.eof {
		return 0, io.EOF
	}
	if b.expect {
		b.expect = false
		if !b.hc.w.headSent.Load() {
			bw := b.hc.bw
			bw.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
			if err := bw.Flush(); err != nil {
				b.err = err
				return 0, err
			}
		}
	}
	n, err := b.rc.Read(p)
	b.n.Add(int64(n))
	switch {
	case err == io.EOF:
		b.eof = true
		b.hc.bodyRead(b.gen)
	case err != nil:
		b.err = err
	}
	return n, err
}

// Close does not drain (the loop does, bounded, after the handler).
func (b *downBody) Close() error { return nil }

// finish ends the body after its handler: what is left of it (up to
// maxPostHandlerRead) is read so that the next request can be; false
// when the connection cannot go on (it is then closed here, which also
// ends a read some transport goroutine may still have blocked on it).
func (b *downBody) finish(keep bool) bool {
	if b.mu.TryLock() {
		if b.eof && b.err == nil {
			b.closed = true
			b.mu.Unlock()
			return true
		}
		// A client still waiting for 100 Continue sends no body: the
		// connection closes (as net/http's does).
		if keep && b.err == nil && !b.expect {
			_ = b.hc.bw.Flush()
			left := int64(maxPostHandlerRead)
			if r := b.hc.w.req.ContentLength; r > 0 && r-b.n.Load() > left {
				left = 0
			}
			if left > 0 {
				m, err := io.CopyN(io.Discard, b.rc, left+1)
				b.n.Add(m)
				if err == io.EOF {
					b.eof = true
				}
			}
		}
		ok := b.eof && b.err == nil
		b.closed = true
		b.mu.Unlock()
		if ok {
			return true
		}
	}
	_ = b.hc.bw.Flush()
	_ = b.hc.conn.Close()
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	return false
}

// hasToken reports whether a comma-separated header holds token
// (case-insensitive).
func hasToken(vs []string, token string) bool {
	for _, v := range vs {
		for v != "" {
			var part string
			part, v, _ = strings.Cut(v, ",")
			if strings.EqualFold(strings.TrimSpace(part), token) {
				return true
			}
		}
	}
	return false
}
