package httpconn

import (
	"bufio"
	"errors"
	"net"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// h1Writer is the http.ResponseWriter of an HTTP/1.x request served by
// h1conn, with what the handler chain asks of net/http's through
// http.ResponseController: Flush, Hijack (upgrades, CONNECT), read and
// write deadlines (timeouts), and full duplex (bodies streaming both
// ways). It follows net/http's framing: Content-Length when the handler
// set it or the whole body was written before the handler returned
// (up to pendMax bytes), else chunked on HTTP/1.1 or close-delimited on
// HTTP/1.0; trailers (http.TrailerPrefix or declared in "Trailer") on
// chunked responses. It adds Date, as net/http does, but sniffs no
// Content-Type: a proxy passes the upstream's headers as they are, as
// Envoy does.
//
// One h1Writer serves the connection's requests in turn (reset per
// request); its header map is reused.
type h1Writer struct {
	hc            *h1conn
	req           *http.Request
	header        http.Header
	status        int
	contentLength int64 // -1: not known
	written       int64
	wroteHeader   bool // the final status is set
	committed     bool // the head is in the write buffer
	chunked       bool
	noBody        bool
	isHead        bool
	closeAfter    bool // the connection closes after this response
	fullDuplex    bool
	hijacked      bool
	done          bool        // the handler returned
	wdeadline     atomic.Bool // the handler set a write deadline
	err           error
	headSent      atomic.Bool // for a 100 Continue read on another goroutine
}

// pendMax is how much of a body of unknown length is held, before the
// handler returns, to send it with a Content-Length instead of chunked
// (net/http's bufferBeforeChunkingSize).
const pendMax = 2048

var errHijacked = errors.New("httpconn: connection already hijacked")

func (w *h1Writer) reset(hc *h1conn, req *http.Request) {
	h := w.header
	if h == nil {
		h = make(http.Header, 8)
	} else {
		clear(h)
	}
	w.hc, w.req, w.header, w.status, w.contentLength, w.written = hc, req, h, 0, -1, 0
	w.wroteHeader, w.committed, w.chunked, w.noBody = false, false, false, false
	w.isHead, w.closeAfter = req.Method == http.MethodHead, req.Close
	w.fullDuplex, w.hijacked, w.done, w.err = false, false, false, nil
	w.wdeadline.Store(false)
	w.headSent.Store(false)
	hc.pend = hc.pend[:0]
}

func (w *h1Writer) Header() http.Header { return w.header }

func (w *h1Writer) WriteHeader(code int) {
	if w.hijacked || w.wroteHeader {
		return
	}
	if code >= 100 && code <= 199 && code != http.StatusSwitchingProtocols {
		// Informational: sent at once, the final status follows.
		if w.committed || w.headSent.Load() {
			return
		}
		bw := w.hc.bw
		bw.WriteString("HTTP/1.1 ")
		bw.WriteString(statusLine(code))
		bw.WriteString("\r\n")
		w.writeFields(w.header)
		bw.WriteString("\r\n")
		if err := bw.Flush(); err != nil {
			w.err = err
		}
		return
	}
	w.wroteHeader = true
	w.status = code
	if cl := w.header["Content-Length"]; len(cl) > 0 {
		if v, err := strconv.ParseInt(cl[0], 10, 64); err == nil && v >= 0 {
			w.contentLength = v
		} else {
			delete(w.header, "Content-Length")
		}
	}
	if w.isHead || !bodyAllowed(code) {
		w.noBody = true
	}
}

// bodyAllowed: 1xx, 204 and 304 responses have no body.
func bodyAllowed(code int) bool {
	return (code < 100 || code > 199) && code != http.StatusNoContent && code != http.StatusNotModified
}

func (w *h1Writer) Write(p []byte) (int, error) {
	if w.hijacked {
		return 0, http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if w.noBody {
		if w.isHead {
			return len(p), nil
		}
		return 0, http.ErrBodyNotAllowed
	}
	if w.contentLength >= 0 && w.written+int64(len(p)) > w.contentLength {
		return 0, http.ErrContentLength
	}
	if w.err != nil {
		return 0, w.err
	}
	w.written += int64(len(p))
	hc := w.hc
	if !w.committed {
		if w.contentLength < 0 && len(hc.pend)+len(p) <= pendMax {
			hc.pend = append(hc.pend, p...)
			return len(p), nil
		}
		w.commit()
	}
	return w.writeBody(p)
}

func (w *h1Writer) writeBody(p []byte) (int, error) {
	bw := w.hc.bw
	if w.chunked {
		var hex [16]byte
		bw.Write(strconv.AppendInt(hex[:0], int64(len(p)), 16))
		bw.WriteString("\r\n")
		bw.Write(p)
		if _, err := bw.WriteString("\r\n"); err != nil {
			w.err = err
			return 0, err
		}
		return len(p), nil
	}
	n, err := bw.Write(p)
	if err != nil {
		w.err = err
	}
	return n, err
}

// commit writes the response head (and the body held so far) to the
// write buffer, deciding the framing and whether the connection stays.
func (w *h1Writer) commit() {
	w.committed = true
	w.headSent.Store(true)
	hc, h := w.hc, w.header
	delete(h, "Transfer-Encoding")
	if !w.noBody && w.contentLength < 0 {
		if w.req.ProtoMinor >= 1 {
			w.chunked = true
		} else {
			w.closeAfter = true // HTTP/1.0: the close ends the body
		}
	}
	hc.mu.Lock()
	draining := hc.draining
	hc.mu.Unlock()
	if draining || hasToken(h["Connection"], "close") {
		w.closeAfter = true
	}
	if !w.closeAfter && !w.fullDuplex && w.req.ContentLength > 0 {
		// A body the handler left mostly unread is not drained for the
		// next request: the connection closes instead (net/http's).
		if b, ok := w.req.Body.(*downBody); ok && w.req.ContentLength-b.read() > maxPostHandlerRead {
			w.closeAfter = true
		}
	}
	http10 := w.req.ProtoMinor == 0
	switch {
	case w.closeAfter && http10:
		delete(h, "Connection")
	case w.closeAfter:
		h["Connection"] = connClose
	case http10:
		// Only a client that asked for keep-alive gets it.
		h["Connection"] = connKeepAlive
	}

	bw := hc.bw
	if http10 {
		bw.WriteString("HTTP/1.0 ")
	} else {
		bw.WriteString("HTTP/1.1 ")
	}
	bw.WriteString(statusLine(w.status))
	bw.WriteString("\r\n")
	w.writeFields(h)
	if _, ok := h["Date"]; !ok {
		bw.WriteString("Date: ")
		bw.WriteString(httpDate())
		bw.WriteString("\r\n")
	}
	if w.chunked {
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	}
	bw.WriteString("\r\n")
	if len(hc.pend) > 0 {
		_, _ = w.writeBody(hc.pend)
		hc.pend = hc.pend[:0]
	}
}

var (
	connClose     = []string{"close"}
	connKeepAlive = []string{"keep-alive"}
)

// writeFields writes the header fields of h but trailers, with net/http's
// sanitizing: invalid names dropped, line breaks in values made spaces.
func (w *h1Writer) writeFields(h http.Header) {
	bw := w.hc.bw
	for k, vs := range h {
		if strings.HasPrefix(k, http.TrailerPrefix) || !httpguts.ValidHeaderFieldName(k) {
			continue
		}
		for _, v := range vs {
			bw.WriteString(k)
			bw.WriteString(": ")
			writeValue(bw, v)
			bw.WriteString("\r\n")
		}
	}
}

// writeValue writes a field value with CR and LF as spaces (a value
// cannot end the head) and surrounding whitespace trimmed.
func writeValue(bw *bufio.Writer, v string) {
	if strings.ContainsAny(v, "\r\n") {
		v = strings.NewReplacer("\r\n", " ", "\r", " ", "\n", " ").Replace(v)
	}
	if len(v) > 0 && (v[0] == ' ' || v[0] == '\t' || v[len(v)-1] == ' ' || v[len(v)-1] == '\t') {
		v = textproto.TrimString(v)
	}
	bw.WriteString(v)
}

// finish ends the response once the handler returned: a body still held
// goes out with its Content-Length, a chunked body gets its last chunk and
// trailers, and the write buffer is flushed unless a pipelined request is
// already waiting (its response will go out with this one). It reports
// whether the connection may serve another request.
func (w *h1Writer) finish() bool {
	if w.hijacked {
		return false
	}
	w.done = true
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	hc := w.hc
	if !w.committed {
		if w.contentLength < 0 && bodyAllowed(w.status) && (!w.isHead || len(hc.pend) > 0) && !w.hasTrailers() {
			w.contentLength = int64(len(hc.pend))
			w.header["Content-Length"] = []string{itoa(len(hc.pend))}
			w.noBody = w.noBody || len(hc.pend) == 0
		}
		w.commit()
	}
	if w.chunked {
		bw := hc.bw
		bw.WriteString("0\r\n")
		w.writeTrailers()
		bw.WriteString("\r\n")
	}
	if w.contentLength >= 0 && !w.isHead && w.written != w.contentLength {
		w.closeAfter = true // a short body: only the close tells the client
	}
	if w.closeAfter || !hc.pipelined() {
		if err := hc.bw.Flush(); err != nil {
			w.err = err
		}
	}
	if w.wdeadline.Load() && !w.closeAfter {
		_ = hc.conn.SetWriteDeadline(time.Time{})
	}
	return w.err == nil && !w.closeAfter
}

// hasTrailers: the handler declared or set trailers (which need chunked
// framing).
func (w *h1Writer) hasTrailers() bool {
	if len(w.header["Trailer"]) > 0 {
		return true
	}
	for k := range w.header {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			return true
		}
	}
	return false
}

// writeTrailers writes the trailer fields: those declared in the
// "Trailer" header, and those set with http.TrailerPrefix.
func (w *h1Writer) writeTrailers() {
	h := w.header
	if len(h) == 0 {
		return
	}
	bw := w.hc.bw
	for _, decl := range h["Trailer"] {
		for decl != "" {
			var k string
			k, decl, _ = strings.Cut(decl, ",")
			k = http.CanonicalHeaderKey(strings.TrimSpace(k))
			if !httpguts.ValidTrailerHeader(k) {
				continue
			}
			for _, v := range h[k] {
				bw.WriteString(k)
				bw.WriteString(": ")
				writeValue(bw, v)
				bw.WriteString("\r\n")
			}
		}
	}
	for k, vs := range h {
		name, ok := strings.CutPrefix(k, http.TrailerPrefix)
		if !ok || !httpguts.ValidHeaderFieldName(name) || !httpguts.ValidTrailerHeader(name) {
			continue
		}
		for _, v := range vs {
			bw.WriteString(name)
			bw.WriteString(": ")
			writeValue(bw, v)
			bw.WriteString("\r\n")
		}
	}
}

// flushPartial sends what the response wrote so far without its end (an
// aborted stream: the close that follows tells the client).
func (w *h1Writer) flushPartial() {
	w.done = true
	w.closeAfter = true
	_ = w.hc.bw.Flush()
}

// Flush sends the head and the body so far (a streaming response). A
// response whose whole known length is written while the next pipelined
// request is already buffered is left in the buffer: it goes out with
// the responses behind it, in one write.
func (w *h1Writer) Flush() { _ = w.FlushError() }

func (w *h1Writer) FlushError() error {
	if w.hijacked {
		return http.ErrHijacked
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.committed {
		w.commit()
	}
	if w.contentLength >= 0 && w.written == w.contentLength && !w.isHead && w.hc.pipelined() {
		return w.err
	}
	if err := w.hc.bw.Flush(); err != nil {
		w.err = err
	}
	return w.err
}

// Hijack hands the connection to the handler (an upgrade or CONNECT
// tunnel): what the client sent past the request stays readable from
// the returned reader.
func (w *h1Writer) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if w.hijacked {
		return nil, nil, errHijacked
	}
	hc := w.hc
	hc.stopWatch()
	if w.committed {
		_ = hc.bw.Flush()
	}
	w.hijacked = true
	hc.guard.hijacked()
	return hc.conn, bufio.NewReadWriter(hc.br, bufio.NewWriter(hc.conn)), nil
}

// SetReadDeadline and SetWriteDeadline may be called from a timer's
// goroutine (the stream's timeouts) while the handler runs.
func (w *h1Writer) SetReadDeadline(t time.Time) error { return w.hc.conn.SetReadDeadline(t) }

func (w *h1Writer) SetWriteDeadline(t time.Time) error {
	w.wdeadline.Store(true)
	return w.hc.conn.SetWriteDeadline(t)
}

// EnableFullDuplex lets the response stream out while the request body
// still streams in; without it a response started over an unread body
// closes the connection after it.
func (w *h1Writer) EnableFullDuplex() error {
	w.fullDuplex = true
	return nil
}

// httpDate is the Date header value, formatted once a second.
func httpDate() string {
	now := time.Now()
	sec := now.Unix()
	if d := dateCache.Load(); d != nil && d.sec == sec {
		return d.s
	}
	d := &cachedDate{sec: sec, s: now.UTC().Format(http.TimeFormat)}
	dateCache.Store(d)
	return d.s
}

type cachedDate struct {
	sec int64
	s   string
}

var dateCache atomic.Pointer[cachedDate]

func itoa(n int) string { return strconv.Itoa(n) }
