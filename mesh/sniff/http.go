package sniff

import (
	"bytes"
	"fmt"
)

// Application protocols as Envoy's http_inspector names them.
const (
	HTTP10 = "http/1.0"
	HTTP11 = "http/1.1"
	H2C    = "h2c"
)

// h2Preface is the HTTP/2 client connection preface (RFC 9113 §3.4).
const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// HTTPResult is what http_inspector learns from a plaintext connection.
type HTTPResult struct {
	// Protocol is the application protocol Envoy sets: HTTP10, HTTP11 or
	// H2C.
	Protocol string
}

// DetectHTTP tells, as Envoy's http_inspector does, whether b starts an
// HTTP/2 prior-knowledge connection (the connection preface: "h2c") or an
// HTTP/1 request ("http/1.1" when the request line ends in HTTP/1.1,
// "http/1.0" for any other valid request line, HTTP/0.9 included).
//
// The request line is judged as Envoy's HTTP/1 parser (Balsa, with custom
// methods allowed) judges it once its first LF arrives: a method of RFC
// 9110 token characters, a request-target in origin, absolute, authority
// (CONNECT) or asterisk form, and an empty or "HTTP/d.d" version, separated
// by runs of whitespace (any byte up to 0x20). DetectHTTP returns
// ErrNotHTTP as soon as no continuation of b can pass, ErrNeedMore while one
// can, and ErrTooLarge when MaxRequestLineSize bytes hold no LF.
//
// DetectHTTP does not allocate.
func DetectHTTP(b []byte) (HTTPResult, error) {
	var d httpDetector
	return d.detect(b)
}

// Request-line parts.
const (
	partMethod = iota
	partTarget
	partVersion
)

// Request-target states, following Envoy's isUrlValid.
const (
	urlPath        = iota // origin or asterisk form, or the path of the others
	urlScheme             // absolute form: scheme characters
	urlColon              // saw "scheme:"
	urlSlash              // saw "scheme:/"
	urlHost               // authority, up to '/' or '?'
	urlHostAfterAt        // authority, right after '@' ("@@" is invalid)
)

// httpDetector is DetectHTTP's state, kept between calls by Inspect so
// that each byte is examined once however the bytes arrive. Between calls
// b must only grow.
type httpDetector struct {
	pos       int  // bytes of the request line examined
	http1     bool // b is known not to be the HTTP/2 preface
	part      int
	inWord    bool // inside the current part's non-whitespace run
	connect   int  // bytes of the method matching "CONNECT"; -1 on mismatch
	url       int
	verLen    int  // version bytes seen
	verClosed bool // whitespace followed the version
	done      bool
	res       HTTPResult
	err       error
}

// tchar marks RFC 9110 token characters.
var tchar = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	for _, c := range []byte("!#$%&'*+-.^_`|~") {
		t[c] = true
	}
	return t
}()

// hostChar marks the characters Envoy accepts in an authority.
var hostChar = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	for _, c := range []byte("!$%&'()*+,-.:;=@[]_~") {
		t[c] = true
	}
	return t
}()

func isAlpha(c byte) bool { return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' }
func isDigit(c byte) bool { return '0' <= c && c <= '9' }

func (d *httpDetector) finish(res HTTPResult, err error) (HTTPResult, error) {
	d.done, d.res, d.err = true, res, err
	return res, err
}

func (d *httpDetector) detect(b []byte) (HTTPResult, error) {
	if d.done {
		return d.res, d.err
	}
	if len(b) > MaxRequestLineSize {
		b = b[:MaxRequestLineSize]
	}
	if !d.http1 {
		// Envoy checks for the preface first, and waits while b is a
		// prefix of it.
		n := min(len(b), len(h2Preface))
		if string(b[:n]) == h2Preface[:n] {
			if n == len(h2Preface) {
				return d.finish(HTTPResult{Protocol: H2C}, nil)
			}
			return HTTPResult{}, ErrNeedMore
		}
		d.http1 = true
		d.connect = 0
		// Envoy rejects a leading CR or LF; Balsa any leading whitespace.
		if b[0] <= ' ' {
			return d.finish(HTTPResult{}, ErrNotHTTP)
		}
	}
	for ; d.pos < len(b); d.pos++ {
		c := b[d.pos]
		if c == '\n' {
			return d.endOfLine(b[:d.pos])
		}
		if !d.step(c) {
			return d.finish(HTTPResult{}, ErrNotHTTP)
		}
	}
	if len(b) == MaxRequestLineSize {
		return d.finish(HTTPResult{}, fmt.Errorf("%w: no request line in %d bytes", ErrTooLarge, MaxRequestLineSize))
	}
	return HTTPResult{}, ErrNeedMore
}

// step examines one byte of the request line before its LF and reports
// whether the line can still be valid.
func (d *httpDetector) step(c byte) bool {
	if c <= ' ' { // whitespace separates parts
		if d.inWord {
			d.inWord = false
			switch d.part {
			case partMethod:
				d.part = partTarget
			case partTarget:
				if !d.targetComplete() {
					return false
				}
				d.part = partVersion
			case partVersion:
				d.verClosed = true
			}
		}
		return true
	}
	first := !d.inWord
	d.inWord = true
	switch d.part {
	case partMethod:
		if d.connect >= 0 {
			if d.connect < len("CONNECT") && c == "CONNECT"[d.connect] {
				d.connect++
			} else {
				d.connect = -1
			}
		}
		return tchar[c]
	case partTarget:
		if first {
			return d.targetStart(c)
		}
		return d.targetStep(c)
	default:
		// The version is everything from here to the line's last
		// non-whitespace byte, so it must be exactly "HTTP/d.d".
		if d.verClosed || d.verLen >= len("HTTP/1.1") {
			return false
		}
		i := d.verLen
		d.verLen++
		switch {
		case i < len("HTTP/"):
			return c == "HTTP/"[i]
		case i == len("HTTP/")+1:
			return c == '.'
		default:
			return isDigit(c)
		}
	}
}

func (d *httpDetector) targetStart(c byte) bool {
	switch {
	case c == '/' || c == '*':
		d.url = urlPath
		return true
	case d.connect == len("CONNECT"):
		d.url = urlHost
		return d.targetStep(c)
	case isAlpha(c):
		d.url = urlScheme
		return true
	}
	return false
}

func (d *httpDetector) targetStep(c byte) bool {
	switch d.url {
	case urlPath:
		return c < 0x7f // and > ' ', which step has checked
	case urlScheme:
		switch {
		case isAlpha(c) || isDigit(c) || c == '+' || c == '-' || c == '.':
			return true
		case c == ':':
			d.url = urlColon
			return true
		}
		return false
	case urlColon:
		d.url = urlSlash
		return c == '/'
	case urlSlash:
		d.url = urlHost
		return c == '/'
	default: // urlHost, urlHostAfterAt
		switch {
		case c == '/' || c == '?':
			d.url = urlPath
			return true
		case c == '@':
			if d.url == urlHostAfterAt {
				return false
			}
			d.url = urlHostAfterAt
			return true
		}
		d.url = urlHost
		return hostChar[c]
	}
}

// targetComplete reports whether the request-target may end here.
func (d *httpDetector) targetComplete() bool {
	return d.url != urlScheme && d.url != urlColon && d.url != urlSlash
}

// endOfLine judges the request line (without its LF).
func (d *httpDetector) endOfLine(line []byte) (HTTPResult, error) {
	// A line that ends inside a part closes it.
	if d.inWord && d.part == partTarget && !d.targetComplete() {
		return d.finish(HTTPResult{}, ErrNotHTTP)
	}
	// Without a target (no part after the method) the line is invalid;
	// the version may be absent (HTTP/0.9) or must be complete.
	hasTarget := d.part > partTarget || d.part == partTarget && d.inWord
	if !hasTarget || d.verLen != 0 && d.verLen != len("HTTP/1.1") {
		return d.finish(HTTPResult{}, ErrNotHTTP)
	}
	// Envoy asks whether the trimmed request line ends in "HTTP/1.1";
	// everything else valid is HTTP/1.0.
	for len(line) > 0 && line[len(line)-1] <= ' ' {
		line = line[:len(line)-1]
	}
	if bytes.HasSuffix(line, []byte("HTTP/1.1")) {
		return d.finish(HTTPResult{Protocol: HTTP11}, nil)
	}
	return d.finish(HTTPResult{Protocol: HTTP10}, nil)
}
