package httpconn

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"
)

// h1Guard is a downstream HTTP/1.x connection as net/http's server reads
// it. net/http hides two framing facts the proxy must act on: it drops
// Content-Length when Transfer-Encoding is present (RFC 9112 §6.3 lets a
// proxy do that, but Envoy, and §6.1's advice against request smuggling,
// answer 400 and close unless allow_chunked_length), and it ignores
// Transfer-Encoding on HTTP/1.0 (the body bytes are then read as the next
// request). The handler never sees either. The guard follows the request
// framing of the byte stream as net/http will parse it (heads, then
// Content-Length or chunked bodies, trailers) without copying: heads are
// examined byte by byte, bodies skipped by count.
//
//   - A head that must be refused is cut before its final line feed and
//     continued with a line without a colon, which net/http answers with
//     400 and closes the connection; nothing after it is read.
//   - Framing net/http itself will refuse (an invalid Content-Length, a
//     transfer coding other than chunked, a malformed chunk) is passed
//     through up to the offending byte, then the stream ends in an error:
//     whatever net/http does with it, no further request can be read from
//     bytes the guard did not frame.
//   - A read that times out while a request head is under way (a
//     slowloris client: the deadline is net/http's ReadHeaderTimeout,
//     request_headers_timeout or stream_idle_timeout) answers 408 first,
//     as Envoy does, before net/http closes the connection.
//   - A hijacked connection (an Upgrade tunnel) passes bytes unexamined.
type h1Guard struct {
	net.Conn
	cfg  *Config
	info *ConnInfo

	pass atomic.Bool  // hijacked: no framing any more
	rd   atomic.Int64 // the read deadline last set (UnixNano; 0: none)

	sub []byte // a refused head's replacement, delivered before err
	err error  // sticky: the stream ends here
	// accounted: the guard answered and logged the request (a refused
	// head, a head timeout), the loop must not again.
	accounted bool

	st        uint8
	remaining int64 // body or chunk bytes left
	h         headState
}

// headState is the framing state of the head (or trailer) under way,
// and of the chunk-size line; reset with each head.
type headState struct {
	headLen  int
	lineNo   int   // 0: the request line
	lineLen  int   // bytes of the current line so far
	lastCR   bool  // the line's last byte was '\r'
	inValue  bool  // past the field name's ':'
	field    uint8 // fieldOther, fieldCL or fieldTE
	nameLen  int
	name     [17]byte // lower-cased field name prefix
	tail     [8]byte  // the request line's last bytes but CR (its version)
	http10   bool
	noColon  bool // a field line without ':', or an empty request line
	folded   bool // obs-fold (RFC 9112 §5.2: refused)
	clSeen   bool
	clBad    bool
	cl       int64 // the Content-Length value
	clCur    int64 // the value of the line being read
	clDigits int
	clTrail  bool
	teCount  int
	teBad    bool // a Transfer-Encoding other than exactly "chunked"
	teLen    int
	teVal    [7]byte
	teTrail  bool
	hosts    int // Host fields

	chunkDigits int
	chunkEnd    bool // past the digits (extension or whitespace)
	chunkBad    bool
}

const (
	gHead uint8 = iota
	gBody
	gChunkLine
	gChunkData
	gChunkCR
	gChunkLF
	gTrailer
	gLastByte // one more byte for net/http to see the error itself, then the end
)

const (
	fieldOther uint8 = iota
	fieldCL
	fieldTE
)

var (
	errFraming = errors.New("httpconn: malformed HTTP/1 framing; connection closed")
	errRefused = errors.New("httpconn: HTTP/1 request refused; connection closed")
)

// maxChunkLine is net/http's bound on a chunk-size line.
const maxChunkLine = 4096

func newH1Guard(c net.Conn, cfg *Config, info *ConnInfo) *h1Guard {
	return &h1Guard{Conn: c, cfg: cfg, info: info}
}

func (g *h1Guard) SetReadDeadline(t time.Time) error {
	g.storeDeadline(t)
	return g.Conn.SetReadDeadline(t)
}

func (g *h1Guard) SetDeadline(t time.Time) error {
	g.storeDeadline(t)
	return g.Conn.SetDeadline(t)
}

func (g *h1Guard) storeDeadline(t time.Time) {
	if t.IsZero() {
		g.rd.Store(0)
	} else {
		g.rd.Store(t.UnixNano())
	}
}

// hijacked ends the framing: the bytes are the handler's now.
func (g *h1Guard) hijacked() { g.pass.Store(true) }

func (g *h1Guard) Read(p []byte) (int, error) {
	if g.pass.Load() {
		return g.Conn.Read(p)
	}
	if len(g.sub) > 0 {
		n := copy(p, g.sub)
		g.sub = g.sub[n:]
		return n, nil
	}
	if g.err != nil {
		return 0, g.err
	}
	n, err := g.Conn.Read(p)
	if n > 0 {
		var refused bool
		n, refused = g.scan(p[:n])
		if refused {
			if n == 0 {
				n = copy(p, g.sub)
				g.sub = g.sub[n:]
			}
			return n, nil
		}
		if g.err != nil {
			return n, nil
		}
	}
	if err != nil && g.headUnderWay() && isTimeout(err) && g.rd.Load() > abortDeadline {
		g.headTimeout()
	}
	return n, err
}

// abortDeadline: net/http aborts its background read with a deadline in
// 1970 (aLongTimeAgo); such a timeout is not the client's.
var abortDeadline = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func (g *h1Guard) headUnderWay() bool {
	return g.st == gHead && (g.h.lineNo > 0 || g.h.lineLen > 0)
}

// scan follows the framing over b, the bytes just read. It returns how
// many of them net/http may have, and the details of a refused head
// (whose final line feed is then the first byte withheld); g.err is set
// when the stream must end after the bytes returned.
func (g *h1Guard) scan(b []byte) (int, bool) {
	for i := 0; i < len(b); {
		switch g.st {
		case gBody, gChunkData:
			take := int64(len(b) - i)
			if take > g.remaining {
				take = g.remaining
			}
			i += int(take)
			if g.remaining -= take; g.remaining == 0 {
				if g.st == gBody {
					g.st = gHead
				} else {
					g.st = gChunkCR
				}
			}
		case gHead:
			if g.h.lineLen == 0 {
				// A whole line in this read takes a few vector
				// searches, not a step per byte.
				if j := bytes.IndexByte(b[i:], '\n'); j > 0 && g.fastLine(b[i:i+j]) {
					i += j
					if g.h.headLen > g.cfg.maxHeaderBytes+8192 {
						g.err = errFraming
						return i, false
					}
				}
			}
			c := b[i]
			i++
			if c != '\n' {
				g.headByte(c)
				if g.h.headLen > g.cfg.maxHeaderBytes+8192 {
					// net/http answered 431 well before.
					g.err = errFraming
					return i, false
				}
				continue
			}
			if g.lineEnd() {
				continue
			}
			// The head is complete.
			details, end := g.headDone()
			if details != "" {
				return i - 1, true
			}
			if end {
				g.err = errFraming
				return i, false
			}
		case gChunkLine:
			c := b[i]
			i++
			if !g.chunkByte(c) {
				g.err = errFraming
				return i, false
			}
		case gChunkCR, gChunkLF:
			c := b[i]
			i++
			switch {
			case g.st == gChunkCR && c == '\r':
				g.st = gChunkLF
			case g.st == gChunkLF && c == '\n':
				g.st = gChunkLine
			case g.st == gChunkCR:
				// net/http reads two bytes for the CRLF after chunk
				// data and refuses them: let it have both.
				g.st = gLastByte
			default:
				g.err = errFraming
				return i, false
			}
		case gLastByte:
			g.err = errFraming
			return i + 1, false
		case gTrailer:
			c := b[i]
			i++
			g.h.headLen++
			if g.h.headLen > g.cfg.maxHeaderBytes+8192 {
				g.err = errFraming
				return i, false
			}
			if c != '\n' {
				g.h.lineLen++
				g.h.lastCR = c == '\r'
				continue
			}
			empty := g.h.lineLen == 0 || (g.h.lineLen == 1 && g.h.lastCR)
			g.h.lineLen, g.h.lastCR = 0, false
			if empty {
				g.h = headState{}
				g.st = gHead
			}
		}
	}
	return len(b), false
}

// fastLine takes a whole head line but its line feed, when it can tell
// at once that the line is not one whose value matters (not
// Content-Length nor Transfer-Encoding); false leaves it to headByte.
func (g *h1Guard) fastLine(line []byte) bool {
	h := &g.h
	n := len(line)
	if h.lineNo == 0 {
		// The request line: only its version matters.
		v := line
		if v[n-1] == '\r' {
			v = v[:n-1]
		}
		if bytes.IndexByte(v, '\r') >= 0 {
			return false
		}
		if len(v) >= len(h.tail) {
			copy(h.tail[:], v[len(v)-len(h.tail):])
		} else {
			h.tail = [len(h.tail)]byte{}
			copy(h.tail[len(h.tail)-len(v):], v)
		}
	} else {
		colon := bytes.IndexByte(line, ':')
		if line[0] == ' ' || line[0] == '\t' || colon == len("content-length") || colon == len("transfer-encoding") || colon == len("host") {
			return false
		}
		if colon >= 0 {
			h.inValue, h.field, h.nameLen = true, fieldOther, colon
		}
	}
	h.headLen += n
	h.lineLen = n
	h.lastCR = line[n-1] == '\r'
	return true
}

// headByte takes one byte of a head line other than its line feed.
func (g *h1Guard) headByte(c byte) {
	g.h.headLen++
	if g.h.lineLen == 0 && g.h.lineNo > 0 && (c == ' ' || c == '\t') {
		g.h.folded = true
	}
	g.h.lineLen++
	g.h.lastCR = c == '\r'
	if g.h.lineNo == 0 {
		if c != '\r' {
			copy(g.h.tail[:], g.h.tail[1:])
			g.h.tail[len(g.h.tail)-1] = c
		}
		return
	}
	if !g.h.inValue {
		if c == ':' {
			g.h.inValue = true
			g.h.field = fieldOther
			switch {
			case g.h.nameLen == len("content-length") && string(g.h.name[:g.h.nameLen]) == "content-length":
				g.h.field = fieldCL
				g.h.clCur, g.h.clDigits, g.h.clTrail = 0, 0, false
			case g.h.nameLen == len("host") && string(g.h.name[:g.h.nameLen]) == "host":
				g.h.hosts++
			case g.h.nameLen == len("transfer-encoding") && string(g.h.name[:g.h.nameLen]) == "transfer-encoding":
				g.h.field = fieldTE
				g.h.teLen, g.h.teTrail = 0, false
			}
			return
		}
		if g.h.nameLen < len(g.h.name) {
			g.h.name[g.h.nameLen] = lower(c)
		}
		g.h.nameLen++
		return
	}
	switch g.h.field {
	case fieldCL:
		switch {
		case c == ' ' || c == '\t' || c == '\r':
			g.h.clTrail = g.h.clDigits > 0
		case c >= '0' && c <= '9' && !g.h.clTrail && g.h.clCur < 1e17:
			g.h.clCur = g.h.clCur*10 + int64(c-'0')
			g.h.clDigits++
		default:
			g.h.clBad = true
		}
	case fieldTE:
		switch {
		case c == ' ' || c == '\t' || c == '\r':
			g.h.teTrail = g.h.teLen > 0
		case g.h.teTrail || g.h.teLen == len(g.h.teVal):
			g.h.teBad = true
		default:
			g.h.teVal[g.h.teLen] = lower(c)
			g.h.teLen++
		}
	}
}

// lineEnd ends a head line at its line feed; it reports false when the
// line was the empty one that ends the head.
func (g *h1Guard) lineEnd() bool {
	g.h.headLen++
	empty := g.h.lineLen == 0 || (g.h.lineLen == 1 && g.h.lastCR)
	if empty && g.h.lineNo > 0 {
		return false
	}
	if g.h.lineNo == 0 {
		if empty {
			g.h.noColon = true // an empty request line: net/http refuses it
		}
		g.h.http10 = string(g.h.tail[:]) == "HTTP/1.0"
	} else {
		switch {
		case !g.h.inValue:
			g.h.noColon = true
		case g.h.field == fieldCL:
			if g.h.clDigits == 0 {
				g.h.clBad = true
			}
			if g.h.clSeen && g.h.clCur != g.h.cl {
				g.h.clBad = true // net/http refuses differing values
			}
			g.h.clSeen, g.h.cl = true, g.h.clCur
		case g.h.field == fieldTE:
			g.h.teCount++
			if g.h.teLen != len(g.h.teVal) || string(g.h.teVal[:]) != "chunked" {
				g.h.teBad = true
			}
		}
	}
	g.h.lineNo++
	g.h.lineLen, g.h.lastCR, g.h.inValue, g.h.nameLen, g.h.field = 0, false, false, 0, fieldOther
	if g.h.noColon && g.h.lineNo == 1 {
		// An empty request line is a whole (refused) head by itself.
		return false
	}
	return true
}

// headDone decides on a complete head and starts its body: details
// for a head the proxy refuses (400), end for one net/http will refuse
// itself.
func (g *h1Guard) headDone() (details string, end bool) {
	h := &g.h
	st, n := gHead, int64(0)
	switch {
	case h.folded: // before noColon: a folded line has no colon
		details = "http1.invalid_characters"
	case h.noColon:
		end = true
	case h.hosts > 1:
		// net/http's server refuses this; http.ReadRequest, which the
		// loop parses with, keeps the first.
		details = "http1.too_many_Host_headers"
	case h.teCount > 0 && h.http10:
		details = "http1.invalid_transfer_encoding"
	case h.teCount > 0 && h.clSeen && !g.cfg.allowChunkedLength:
		details = "http1.content_length_and_chunked_not_allowed"
	case h.teCount > 0:
		end = h.teCount > 1 || h.teBad // net/http: 501
		st = gChunkLine
	case h.clSeen:
		end = h.clBad // net/http: 400
		if h.cl > 0 {
			st, n = gBody, h.cl
		}
	}
	if details != "" {
		g.refuse(details)
	}
	g.h = headState{}
	g.st, g.remaining = st, n
	return details, end
}

// chunkByte takes one byte of a chunk-size line; false: net/http will
// refuse the line.
func (g *h1Guard) chunkByte(c byte) bool {
	g.h.lineLen++
	if g.h.lineLen > maxChunkLine {
		return false
	}
	if c == '\n' {
		if g.h.chunkDigits == 0 || g.h.chunkBad {
			return false
		}
		g.h = headState{}
		if g.remaining == 0 {
			g.st = gTrailer
		} else {
			g.st = gChunkData
		}
		return true
	}
	if !g.h.chunkEnd {
		if isHex(c) {
			if g.h.chunkDigits == 15 {
				g.h.chunkBad = true // net/http: chunk length too large
			}
			g.remaining = g.remaining<<4 | int64(unhex(c))
			g.h.chunkDigits++
			return true
		}
		g.h.chunkEnd = true
	}
	switch c {
	case ';', ' ', '\t', '\r':
	default:
		if g.h.chunkDigits == 0 {
			g.h.chunkBad = true
		}
	}
	return true
}

func lower(c byte) byte {
	if c >= 'A' && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// refuse replaces the rest of a refused head: net/http reads a field
// line without a colon, answers 400 and closes. The request is counted
// and logged as Envoy's codec error (DPE).
func (g *h1Guard) refuse(details string) {
	g.sub = []byte(details + "\r\n\r\n")
	g.err = errRefused
	g.account(http.StatusBadRequest, FlagDPE, details)
}

// headTimeout answers a request whose head did not arrive in time with
// Envoy's 408 (request_headers_timeout or stream_idle_timeout, whichever
// is shorter), written before net/http closes the connection.
func (g *h1Guard) headTimeout() {
	c := g.cfg
	body, details, flags := "request header timeout", "request_header_timeout", Flags(0)
	if c.streamIdleTimeout > 0 && (c.requestHeadersTimeout <= 0 || c.streamIdleTimeout < c.requestHeadersTimeout) {
		body, details, flags = "stream timeout", "stream_idle_timeout", FlagSI
		c.stats.DownstreamRqIdle.Add(1)
	} else {
		c.stats.DownstreamRqHeaderTimeout.Add(1)
	}
	resp := "HTTP/1.1 408 Request Timeout\r\ncontent-length: " + strconv.Itoa(len(body)) +
		"\r\ncontent-type: text/plain\r\nserver: " + c.serverName + "\r\nconnection: close\r\n\r\n" + body
	_ = g.Conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = io.WriteString(g.Conn, resp)
	// The 408 is the connection's last word: its write side closes now,
	// so nothing net/http might still answer the broken head with (a 400
	// after the guard's error) can follow it.
	closeWrite(g.Conn)
	g.err = errFraming
	g.account(http.StatusRequestTimeout, flags, details)
}

// account counts and logs a request the guard answered for the loop.
func (g *h1Guard) account(code int, flags Flags, details string) {
	g.accounted = true
	accountH1(g.cfg, g.info, code, flags, details, g.h.http10)
}

// accountH1 counts and logs an HTTP/1 request answered before it reached
// the handler (a refused or timed-out head).
func accountH1(cfg *Config, info *ConnInfo, code int, flags Flags, details string, http10 bool) {
	st := cfg.stats
	st.DownstreamRqTotal.Add(1)
	st.DownstreamRqHTTP1Total.Add(1)
	st.countCode(code)
	if log := info.AccessLog; log != nil {
		proto := "HTTP/1.1"
		if http10 {
			proto = "HTTP/1.0"
		}
		log(Entry{Start: time.Now(), Protocol: proto, ResponseCode: code, ResponseFlags: flags,
			ResponseCodeDetails: details, DownstreamPeer: info.Peer, DownstreamLocal: info.Local})
	}
}

// closeWrite half-closes c, looking through the connection wrappers the
// downstream may be behind (the preface sniff's prefixConn, a TLS
// Downstream's NetConn).
func closeWrite(c net.Conn) {
	for range 4 {
		switch x := c.(type) {
		case interface{ CloseWrite() error }:
			_ = x.CloseWrite()
			return
		case *prefixConn:
			c = x.Conn
		case interface{ NetConn() net.Conn }:
			c = x.NetConn()
		default:
			return
		}
	}
}
