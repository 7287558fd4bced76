package httpconn

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// The upstream HTTP/1.1 exchange's fast paths. net/http's Request.Write
// and ReadResponse cost about twenty allocations per request (a
// transferWriter, fmt, a header sorter, a MIME reader, one string per
// header value, a limited reader); on a keep-alive proxy they were most
// of the HCM's garbage, and with it of its GC time and tail latency. The
// common case (a request without a body, a response head that arrived
// whole with a Content-Length) is written and parsed here with what net/
// http would produce byte for byte and field for field; anything else
// (bodies to send, 1xx, chunked or close-delimited responses, heads that
// span reads, obs-fold, invalid bytes) takes net/http's own code, which
// stays the reference for every framing and validation rule.

// writeH1Request writes req's head as Request.Write would for a request
// without a body (same request line, Host, User-Agent, Content-Length
// and field order and sanitizing) and reports false, having written
// nothing, when req is not such a request.
func writeH1Request(bw *bufio.Writer, req *http.Request) bool {
	if req.Body != nil || req.ContentLength != 0 || req.Close || len(req.TransferEncoding) > 0 ||
		req.Trailer != nil || req.Method == http.MethodConnect || req.URL == nil {
		return false
	}
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	// Request.Write punycodes non-ASCII hosts, blanks invalid ones and
	// removes IPv6 zones: leave those to it.
	if host == "" || !asciiPrintable(host) || strings.IndexByte(host, '%') >= 0 || !httpguts.ValidHostHeader(host) {
		return false
	}
	u := req.URL
	if u.Opaque == "" || strings.HasPrefix(u.Opaque, "//") || u.ForceQuery || u.Fragment != "" {
		return false // setTarget's usual form only; RequestURI builds the rest
	}
	if ctlByte(u.Opaque) || ctlByte(u.RawQuery) {
		return false // Request.Write refuses it with an error of its own
	}
	// The fields net/http sorts, but those it writes itself. A head
	// with more fields than fit here goes to net/http.
	var keyArr [32]string
	keys := keyArr[:0]
	for k := range req.Header {
		switch k {
		case "Host", "User-Agent", "Content-Length", "Transfer-Encoding", "Trailer":
			continue
		}
		if len(keys) == len(keyArr) {
			return false
		}
		keys = append(keys, k)
	}
	slices.Sort(keys)

	method := req.Method
	if method == "" {
		method = http.MethodGet
	}
	bw.WriteString(method)
	bw.WriteByte(' ')
	bw.WriteString(u.Opaque)
	if u.RawQuery != "" {
		bw.WriteByte('?')
		bw.WriteString(u.RawQuery)
	}
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	bw.WriteString(host)
	bw.WriteString("\r\n")
	ua := "Go-http-client/1.1"
	if vs, ok := req.Header["User-Agent"]; ok {
		ua = ""
		if len(vs) > 0 {
			ua = vs[0]
		}
	}
	if ua != "" {
		if ua = reqFieldValue(ua); ua != "" {
			bw.WriteString("User-Agent: ")
			bw.WriteString(ua)
			bw.WriteString("\r\n")
		} else {
			bw.WriteString("User-Agent: \r\n")
		}
	}
	switch method {
	case http.MethodPost, http.MethodPut, http.MethodPatch:
		// Request.Write sends a zero length for these ("many servers
		// expect" one).
		bw.WriteString("Content-Length: 0\r\n")
	}
	for _, k := range keys {
		if !httpguts.ValidHeaderFieldName(k) {
			continue
		}
		for _, v := range req.Header[k] {
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(reqFieldValue(v))
			bw.WriteString("\r\n")
		}
	}
	bw.WriteString("\r\n")
	return true
}

// reqFieldValue is a field value as Request.Write sends it: CR and LF
// each made a space, surrounding whitespace trimmed.
func reqFieldValue(v string) string {
	if strings.ContainsAny(v, "\r\n") {
		v = strings.Map(func(r rune) rune {
			if r == '\r' || r == '\n' {
				return ' '
			}
			return r
		}, v)
	}
	return textproto.TrimString(v)
}

func asciiPrintable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// ctlByte: s holds a control byte (Request.Write's check on the target).
func ctlByte(s string) bool {
	for i := 0; i < len(s); i++ {
		if b := s[i]; b < ' ' || b == 0x7f {
			return true
		}
	}
	return false
}

// clBody is the body of a response of known length read by the fast
// path: n bytes from the connection's reader, io.ErrUnexpectedEOF if the
// connection ends before them (as net/http's body). One per h1Conn,
// reset by each response parsed; the h1Body over it ends its use.
type clBody struct {
	br *bufio.Reader
	n  int64
}

func (b *clBody) Read(p []byte) (int, error) {
	if b.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.n {
		p = p[:b.n]
	}
	m, err := b.br.Read(p)
	b.n -= int64(m)
	switch {
	case err == io.EOF && b.n > 0:
		err = io.ErrUnexpectedEOF
	case err == nil && b.n == 0:
		// The EOF comes with the last bytes, as net/http's body gives
		// it: the upstream connection goes back to its pool at once.
		err = io.EOF
	}
	return m, err
}

func (b *clBody) Close() error { return nil }

// fastResponse parses the response head waiting whole in br when it is
// the common kind (HTTP/1.1, a final status with a body of known
// length, fields net/http would accept unchanged): it fills resp (its
// Header map, if any, is cleared and reused) and consumes the head; ok
// false leaves br untouched for http.ReadResponse. tooMany reports a
// head over the limit on field lines.
func fastResponse(br *bufio.Reader, req *http.Request, resp *http.Response, body *clBody) (ok, tooMany bool) {
	if req.Method == http.MethodHead || req.Method == http.MethodConnect {
		return false, false
	}
	buf, _ := br.Peek(br.Buffered())
	end := bytes.Index(buf, crlfcrlf)
	if end < 0 {
		return false, false // the head spans reads: net/http reads on
	}
	// "HTTP/1.1 ddd[ reason]\r\n"
	if end < 12 || string(buf[:9]) != "HTTP/1.1 " {
		return false, false
	}
	c0, c1, c2 := buf[9], buf[10], buf[11]
	if c0 < '2' || c0 > '5' || c1 < '0' || c1 > '9' || c2 < '0' || c2 > '9' {
		return false, false // 1xx, and what net/http would refuse
	}
	code := int(c0-'0')*100 + int(c1-'0')*10 + int(c2-'0')
	if code == http.StatusNoContent || code == http.StatusNotModified {
		return false, false
	}
	lineEnd := bytes.Index(buf[:end+2], crlf)
	if lineEnd == end {
		return false, false // no fields, so no Content-Length
	}
	if lineEnd > 12 && buf[12] != ' ' {
		return false, false
	}
	if bytes.IndexByte(buf[:lineEnd], '\n') >= 0 {
		return false, false
	}
	// Count the field lines first: the value slices share one array.
	lines := bytes.Count(buf[lineEnd+2:end+2], crlf)
	if lines > maxResponseHeaders {
		return false, true
	}
	head := string(buf[:end])
	h := resp.Header
	if h == nil {
		h = make(http.Header, lines)
	} else {
		clear(h)
	}
	vals := make([]string, lines)
	var cl int64 = -1
	closing := false
	for i, rest := 0, head[lineEnd+2:]; rest != ""; i++ {
		line := rest
		if j := strings.Index(rest, "\r\n"); j >= 0 {
			line, rest = rest[:j], rest[j+2:]
		} else {
			rest = ""
		}
		colon := strings.IndexByte(line, ':')
		if colon <= 0 {
			return false, false // obs-fold, a line without a name
		}
		name, v := line[:colon], line[colon+1:]
		if !httpguts.ValidHeaderFieldName(name) || !fieldValueOK(v) {
			return false, false
		}
		v = textproto.TrimString(v)
		key := textproto.CanonicalMIMEHeaderKey(name)
		switch key {
		case "Transfer-Encoding", "Trailer", "Pragma":
			return false, false
		case "Content-Length":
			if cl >= 0 {
				return false, false // duplicates: net/http's rules
			}
			if cl = parseDigits(v); cl < 0 {
				return false, false
			}
		case "Connection":
			closing = closing || httpguts.HeaderValuesContainsToken([]string{v}, "close")
		}
		vals[i] = v
		if prev, dup := h[key]; dup {
			h[key] = append(prev, v)
		} else {
			h[key] = vals[i : i+1 : i+1]
		}
	}
	if cl < 0 {
		return false, false // close-delimited: net/http's
	}
	if closing {
		delete(h, "Connection") // as ReadResponse does (shouldClose)
	}
	br.Discard(end + 4)
	*resp = http.Response{
		Status:        head[9:lineEnd],
		StatusCode:    code,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        h,
		ContentLength: cl,
		Close:         closing,
		Request:       req,
	}
	if cl == 0 {
		resp.Body = http.NoBody
	} else {
		*body = clBody{br: br, n: cl}
		resp.Body = body
	}
	return true, false
}

var crlf = []byte("\r\n")

// fieldValueOK: the raw value v holds no byte net/http's MIME reader
// refuses in a value (controls but HTAB; a bare CR or LF).
func fieldValueOK(v string) bool {
	for i := 0; i < len(v); i++ {
		if b := v[i]; (b < ' ' && b != '\t') || b == 0x7f {
			return false
		}
	}
	return true
}

// parseDigits parses a Content-Length of 1 to 18 digits; -1 otherwise.
func parseDigits(v string) int64 {
	if v == "" || len(v) > 18 {
		return -1
	}
	var n int64
	for i := 0; i < len(v); i++ {
		if v[i] < '0' || v[i] > '9' {
			return -1
		}
		n = n*10 + int64(v[i]-'0')
	}
	return n
}

// fastRequest parses the downstream request head waiting whole in br,
// within limit bytes, when it is the common kind: a method net/http
// knows, an origin-form target whose path needs no unescaping, HTTP/1.1
// or 1.0, fields net/http would accept unchanged, no body or one of a
// single Content-Length. The request is what http.ReadRequest would
// return for the same bytes; nil leaves br untouched for it (and for
// its errors, which name what is wrong).
func fastRequest(br *bufio.Reader, limit int) *http.Request {
	buf, _ := br.Peek(br.Buffered())
	end := bytes.Index(buf, crlfcrlf)
	if end < 0 || end+4 > limit {
		return nil
	}
	lineEnd := bytes.Index(buf[:end+2], crlf)
	sp1 := bytes.IndexByte(buf[:lineEnd], ' ')
	if sp1 <= 0 {
		return nil
	}
	method := knownMethod(buf[:sp1])
	if method == "" {
		return nil // CONNECT, PRI, extension methods: net/http's
	}
	sp2 := sp1 + 1 + bytes.IndexByte(buf[sp1+1:lineEnd], ' ')
	if sp2 <= sp1+1 || buf[sp1+1] != '/' {
		return nil // no target, or not origin-form
	}
	var major, minor int
	switch string(buf[sp2+1 : lineEnd]) {
	case "HTTP/1.1":
		major, minor = 1, 1
	case "HTTP/1.0":
		major, minor = 1, 0
	default:
		return nil
	}
	target := buf[sp1+1 : sp2]
	pathEnd := bytes.IndexByte(target, '?')
	if pathEnd < 0 {
		pathEnd = len(target)
	} else if pathEnd == len(target)-1 || ctlByte(string(target[pathEnd+1:])) {
		return nil // ForceQuery, or what net/url refuses
	}
	for _, c := range target[:pathEnd] {
		if !plainPathByte[c] {
			return nil // unescaping, RawPath: net/url's
		}
	}
	lines := 0
	if lineEnd < end {
		lines = bytes.Count(buf[lineEnd+2:end+2], crlf)
	}
	head := string(buf[:end])
	h := make(http.Header, lines)
	vals := make([]string, lines)
	var cl int64 = -1
	for i, rest := 0, head[min(lineEnd+2, end):]; rest != ""; i++ {
		line := rest
		if j := strings.Index(rest, "\r\n"); j >= 0 {
			line, rest = rest[:j], rest[j+2:]
		} else {
			rest = ""
		}
		colon := strings.IndexByte(line, ':')
		if colon <= 0 {
			return nil
		}
		name, v := line[:colon], line[colon+1:]
		if !httpguts.ValidHeaderFieldName(name) || !fieldValueOK(v) {
			return nil
		}
		v = textproto.TrimString(v)
		key := textproto.CanonicalMIMEHeaderKey(name)
		switch key {
		case "Transfer-Encoding", "Trailer", "Pragma":
			return nil
		case "Host":
			if _, dup := h[key]; dup {
				return nil // net/http's "too many Host headers"
			}
		case "Content-Length":
			if cl >= 0 {
				return nil
			}
			if cl = parseDigits(v); cl < 0 {
				return nil
			}
		}
		vals[i] = v
		if prev, dup := h[key]; dup {
			h[key] = append(prev, v)
		} else {
			h[key] = vals[i : i+1 : i+1]
		}
	}
	uri := head[sp1+1 : sp2]
	box := new(requestBox) // the request and its URL in one allocation
	u := &box.u
	u.Path = uri[:pathEnd]
	if pathEnd < len(uri) {
		u.RawQuery = uri[pathEnd+1:]
	}
	conn := h["Connection"]
	closing := httpguts.HeaderValuesContainsToken(conn, "close")
	if minor == 0 {
		closing = closing || !httpguts.HeaderValuesContainsToken(conn, "keep-alive")
	}
	proto := "HTTP/1.1"
	if minor == 0 {
		proto = "HTTP/1.0"
	}
	req := &box.r
	*req = http.Request{
		Method:     method,
		URL:        u,
		Proto:      proto,
		ProtoMajor: major,
		ProtoMinor: minor,
		Header:     h,
		Close:      closing,
		RequestURI: uri,
		Body:       http.NoBody,
	}
	if vs := h["Host"]; len(vs) > 0 {
		req.Host = vs[0]
		delete(h, "Host") // as http.ReadRequest does
	}
	br.Discard(end + 4)
	if cl > 0 {
		req.ContentLength = cl
		req.Body = &clBody{br: br, n: cl}
	}
	return req
}

type requestBox struct {
	r http.Request
	u url.URL
}

// knownMethod is b as one of net/http's method constants (no string
// made), or "".
func knownMethod(b []byte) string {
	switch string(b) {
	case "GET":
		return http.MethodGet
	case "HEAD":
		return http.MethodHead
	case "POST":
		return http.MethodPost
	case "PUT":
		return http.MethodPut
	case "DELETE":
		return http.MethodDelete
	case "OPTIONS":
		return http.MethodOptions
	case "PATCH":
		return http.MethodPatch
	}
	return ""
}

// plainPathByte: bytes a path may hold for net/url to take it as its
// Path unchanged (nothing to unescape, no RawPath): unreserved
// characters and the sub-delimiters it leaves unescaped in a path.
var plainPathByte = func() (t [256]bool) {
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
	}
	for c := 'A'; c <= 'Z'; c++ {
		t[c] = true
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for _, c := range "-_.~$&+,/:;=@" {
		t[c] = true
	}
	return t
}()
