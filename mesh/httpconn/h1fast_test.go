package httpconn

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// filled is a reader over raw with as much of it buffered as fits, as
// the serving loop's reader holds a head that arrived in one segment.
func filled(raw string) *bufio.Reader {
	br := bufio.NewReaderSize(strings.NewReader(raw), 4096)
	_, _ = br.Peek(1)
	return br
}

// requestHeads are downstream heads, each with whether the fast path
// takes it; the differential checks below hold for all of them.
var requestHeads = []struct {
	raw  string
	fast bool
}{
	{"GET /x HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n", true},
	{"GET /a/b;c=d/e@f:g?q=1&r=%20x HTTP/1.1\r\nHost: svc:8080\r\n\r\n", true},
	{"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", true},
	{"GET / HTTP/1.0\r\nHost: a\r\n\r\n", true},
	{"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", true},
	{"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: b\r\n\r\n", true},
	{"PUT /p HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", true},
	{"DELETE /p HTTP/1.1\r\nhost: a\r\nx-request-id: abc\r\nX-Two: 1\r\nx-two: 2\r\n\r\n", true},
	{"OPTIONS /p HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Pad: \t v \t\r\n\r\n", true},
	{"PATCH /p HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n1234567", true},
	{"GET /p HTTP/1.1\r\nX-No-Host: 1\r\n\r\n", true},
	{"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"GET /a%20b HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"GET /a!b HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"GET /a? HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"GET http://a/b HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"GET * HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", false},
	{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false},
	{"get / HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"GET / HTTP/1.2\r\nHost: a\r\n\r\n", false},
	{"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", false},
	{"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", false},
	{"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", false},
	{"GET / HTTP/1.1\r\nHost: a\r\n Folded: x\r\n\r\n", false},
	{"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n  b\r\n\r\n", false},
	{"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", false},
	{"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", false},
	{"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", false},
	{"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", false},
	{"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", false},
	{"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx", false},
	{"GET / HTTP/1.1\r\nHost: a\r\nPragma: no-cache\r\n\r\n", false},
	{"GET / HTTP/1.1\r\nHost: a\r\nTrailer: X\r\n\r\n", false},
	{"GET / HTTP/1.1\nHost: a\n\n", false},
	{"GET / HTTP/1.1\r\nHost: a\r\n", false},
	{"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", false},
}

// TestFastRequestMatchesReadRequest: where the fast path parses a head,
// the request is field for field the one http.ReadRequest makes of the
// same bytes, its body reads the same and the bytes after it are left
// in place; it declines exactly the heads it is not meant for.
func TestFastRequestMatchesReadRequest(t *testing.T) {
	for _, tc := range requestHeads {
		got := checkFastRequest(t, tc.raw)
		if got != tc.fast {
			t.Errorf("%q: fast path taken = %v, want %v", tc.raw, got, tc.fast)
		}
	}
}

// FuzzFastRequest holds the fast path to http.ReadRequest on any input.
func FuzzFastRequest(f *testing.F) {
	for _, tc := range requestHeads {
		f.Add(tc.raw)
	}
	f.Fuzz(func(t *testing.T, raw string) { checkFastRequest(t, raw) })
}

// checkFastRequest compares the fast path with http.ReadRequest on raw;
// true when the fast path took it.
func checkFastRequest(t *testing.T, raw string) bool {
	t.Helper()
	br := filled(raw)
	buffered := br.Buffered()
	fr := fastRequest(br, 1<<20)
	if fr == nil {
		if br.Buffered() != buffered {
			t.Fatalf("%q: declined but consumed %d bytes", raw, buffered-br.Buffered())
		}
		return false
	}
	rr, err := http.ReadRequest(filled(raw))
	if err != nil {
		t.Fatalf("%q: fast path parsed what http.ReadRequest refuses: %v", raw, err)
	}
	if fr.Method != rr.Method || fr.RequestURI != rr.RequestURI || fr.Proto != rr.Proto ||
		fr.ProtoMajor != rr.ProtoMajor || fr.ProtoMinor != rr.ProtoMinor || fr.Host != rr.Host ||
		fr.Close != rr.Close || fr.ContentLength != rr.ContentLength {
		t.Fatalf("%q: fast %+v\nnet/http %+v", raw, fr, rr)
	}
	if !reflect.DeepEqual(fr.URL, rr.URL) {
		t.Fatalf("%q: URL fast %#v, net/http %#v", raw, fr.URL, rr.URL)
	}
	if !reflect.DeepEqual(fr.Header, rr.Header) {
		t.Fatalf("%q: header fast %q, net/http %q", raw, fr.Header, rr.Header)
	}
	if !reflect.DeepEqual(fr.TransferEncoding, rr.TransferEncoding) || !reflect.DeepEqual(fr.Trailer, rr.Trailer) {
		t.Fatalf("%q: framing fast %v %v, net/http %v %v", raw, fr.TransferEncoding, fr.Trailer, rr.TransferEncoding, rr.Trailer)
	}
	if (fr.Body == http.NoBody) != (rr.Body == http.NoBody) {
		t.Fatalf("%q: NoBody fast %v, net/http %v", raw, fr.Body == http.NoBody, rr.Body == http.NoBody)
	}
	fb, ferr := io.ReadAll(fr.Body)
	// net/http's body reads through its own reader: compare with a
	// reader positioned the same way.
	rbr := filled(raw)
	rr2, _ := http.ReadRequest(rbr)
	rb, rerr := io.ReadAll(rr2.Body)
	if !bytes.Equal(fb, rb) || (ferr == nil) != (rerr == nil) {
		t.Fatalf("%q: body fast %q %v, net/http %q %v", raw, fb, ferr, rb, rerr)
	}
	frest, _ := io.ReadAll(br)
	rrest, _ := io.ReadAll(rbr)
	if !bytes.Equal(frest, rrest) {
		t.Fatalf("%q: left after the request: fast %q, net/http %q", raw, frest, rrest)
	}
	return true
}

// responseHeads are upstream response heads (to a GET), each with
// whether the fast path takes it.
var responseHeads = []struct {
	raw  string
	fast bool
}{
	{"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello", true},
	{"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", true},
	{"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 3\r\nx-a: 1\r\nX-A: 2\r\n\r\nabcHTTP/1.1 200 OK\r\n", true},
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi", true},
	{"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, Close\r\nX: y\r\n\r\nhi", true},
	{"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\nX-Pad: \t v \t\r\nX-Empty:\r\n\r\nnope", true},
	{"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", true},
	{"HTTP/1.1 204 No Content\r\n\r\n", false},
	{"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\n", false},
	{"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false},
	{"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", false},
	{"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", false},
	{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", false},
	{"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited", false},
	{"HTTP/1.1 200 OK\r\n\r\n", false},
	{"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", false},
	{"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTrailer: X\r\n\r\nx", false},
	{"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nPragma: no-cache\r\n\r\nx", false},
	{"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n folded\r\n\r\nx", false},
	{"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nx", false},
	{"HTTP/1.1 2000 OK\r\nContent-Length: 1\r\n\r\nx", false},
	{"HTTP/1.1 600 X\r\nContent-Length: 1\r\n\r\nx", false},
	{"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n", false},
	{"HTTP/1.1 200 OK\nContent-Length: 1\n\nx", false},
}

// TestFastResponseMatchesReadResponse: where the fast path parses a
// response head, the response is the one http.ReadResponse makes of the
// same bytes (status, header, length, close), its body reads the same,
// with the same error when the connection ends early.
func TestFastResponseMatchesReadResponse(t *testing.T) {
	for _, tc := range responseHeads {
		if got := checkFastResponse(t, tc.raw); got != tc.fast {
			t.Errorf("%q: fast path taken = %v, want %v", tc.raw, got, tc.fast)
		}
	}
}

// TestFastResponseReusesHeader: a stream's second response clears the
// header map of the first, with nothing of it left over.
func TestFastResponseReusesHeader(t *testing.T) {
	req := &http.Request{Method: http.MethodGet}
	var resp http.Response
	var body clBody
	if ok, _ := fastResponse(filled("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-First: 1\r\n\r\n"), req, &resp, &body); !ok {
		t.Fatal("first response declined")
	}
	first := resp.Header
	if ok, _ := fastResponse(filled("HTTP/1.1 201 Created\r\nContent-Length: 0\r\nX-Second: 2\r\n\r\n"), req, &resp, &body); !ok {
		t.Fatal("second response declined")
	}
	if want := (http.Header{"Content-Length": {"0"}, "X-Second": {"2"}}); !reflect.DeepEqual(resp.Header, want) || resp.StatusCode != 201 {
		t.Fatalf("second response: %d %v, want 201 %v", resp.StatusCode, resp.Header, want)
	}
	if reflect.ValueOf(first).Pointer() != reflect.ValueOf(resp.Header).Pointer() {
		t.Error("the header map was not reused")
	}
}

// TestFastResponseTooManyHeaders: a head over 100 field lines is an
// upstream protocol error on the fast path too.
func TestFastResponseTooManyHeaders(t *testing.T) {
	var b strings.Builder
	b.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n")
	for i := 0; i < maxResponseHeaders; i++ {
		b.WriteString("X: y\r\n")
	}
	b.WriteString("\r\n")
	var resp http.Response
	ok, tooMany := fastResponse(filled(b.String()), &http.Request{Method: http.MethodGet}, &resp, new(clBody))
	if ok || !tooMany {
		t.Fatalf("101 field lines: ok %v, tooMany %v; want false, true", ok, tooMany)
	}
}

// FuzzFastResponse holds the fast path to http.ReadResponse on any input.
func FuzzFastResponse(f *testing.F) {
	for _, tc := range responseHeads {
		f.Add(tc.raw)
	}
	f.Fuzz(func(t *testing.T, raw string) { checkFastResponse(t, raw) })
}

func checkFastResponse(t *testing.T, raw string) bool {
	t.Helper()
	req := &http.Request{Method: http.MethodGet}
	br := filled(raw)
	buffered := br.Buffered()
	var fr http.Response
	var body clBody
	ok, tooMany := fastResponse(br, req, &fr, &body)
	if !ok {
		if br.Buffered() != buffered {
			t.Fatalf("%q: declined but consumed %d bytes", raw, buffered-br.Buffered())
		}
		if tooMany {
			t.Fatalf("%q: too many headers", raw)
		}
		return false
	}
	rbr := filled(raw)
	rr, err := http.ReadResponse(rbr, req)
	if err != nil {
		t.Fatalf("%q: fast path parsed what http.ReadResponse refuses: %v", raw, err)
	}
	if fr.Status != rr.Status || fr.StatusCode != rr.StatusCode || fr.Proto != rr.Proto ||
		fr.ProtoMajor != rr.ProtoMajor || fr.ProtoMinor != rr.ProtoMinor ||
		fr.ContentLength != rr.ContentLength || fr.Close != rr.Close || fr.Request != rr.Request {
		t.Fatalf("%q: fast %+v\nnet/http %+v", raw, fr, rr)
	}
	if !reflect.DeepEqual(fr.Header, rr.Header) {
		t.Fatalf("%q: header fast %q, net/http %q", raw, fr.Header, rr.Header)
	}
	if fr.Trailer != nil || rr.Trailer != nil || fr.TransferEncoding != nil || rr.TransferEncoding != nil {
		t.Fatalf("%q: trailer or transfer coding: fast %v %v, net/http %v %v", raw, fr.Trailer, fr.TransferEncoding, rr.Trailer, rr.TransferEncoding)
	}
	if (fr.Body == http.NoBody) != (rr.Body == http.NoBody) {
		t.Fatalf("%q: NoBody fast %v, net/http %v", raw, fr.Body == http.NoBody, rr.Body == http.NoBody)
	}
	fb, ferr := io.ReadAll(fr.Body)
	rb, rerr := io.ReadAll(rr.Body)
	if !bytes.Equal(fb, rb) || ferr != rerr {
		t.Fatalf("%q: body fast %q %v, net/http %q %v", raw, fb, ferr, rb, rerr)
	}
	frest, _ := io.ReadAll(br)
	rrest, _ := io.ReadAll(rbr)
	if !bytes.Equal(frest, rrest) {
		t.Fatalf("%q: left after the response: fast %q, net/http %q", raw, frest, rrest)
	}
	return true
}

// TestClBodyEOFWithLastBytes: the last bytes of a body come with io.EOF
// (the upstream connection is pooled by that read), and a connection
// that ends early is io.ErrUnexpectedEOF.
func TestClBodyEOFWithLastBytes(t *testing.T) {
	b := &clBody{br: filled("helloNEXT"), n: 5}
	p := make([]byte, 64)
	n, err := b.Read(p)
	if n != 5 || err != io.EOF || string(p[:n]) != "hello" {
		t.Fatalf("Read = %d %q %v, want 5 hello EOF", n, p[:n], err)
	}
	if n, err := b.Read(p); n != 0 || err != io.EOF {
		t.Fatalf("Read after the end = %d %v", n, err)
	}
	short := &clBody{br: filled("hel"), n: 5}
	got, err := io.ReadAll(short)
	if string(got) != "hel" || err != io.ErrUnexpectedEOF {
		t.Fatalf("short body: %q %v, want hel, unexpected EOF", got, err)
	}
}

// TestWriteH1RequestMatchesWrite: the fast writer's head is byte for
// byte Request.Write's, for requests as the router builds them; those it
// is not for are left to Request.Write with nothing written.
func TestWriteH1RequestMatchesWrite(t *testing.T) {
	mk := func(method, host, opaque, query string, h http.Header) *http.Request {
		return &http.Request{
			Method: method, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
			URL:    &url.URL{Scheme: "http", Host: "10.0.0.1:80", Opaque: opaque, RawQuery: query},
			Header: h, Host: host,
		}
	}
	full := http.Header{
		"User-Agent":   {"curl/8"},
		"Accept":       {"*/*"},
		"X-Request-Id": {"abc"},
		"X-Multi":      {"1", "2"},
		"X-Newline":    {"a\r\nb\nc"},
		"X-Pad":        {"  v \t"},
		"Content-Type": {"text/plain"},
		"Bad Name":     {"dropped"},
		"Host":         {"ignored"},
		"Trailer":      {"X"},
	}
	for _, tc := range []struct {
		name string
		req  *http.Request
		fast bool
	}{
		{"get", mk("GET", "svc", "/x", "", http.Header{"User-Agent": nil}), true},
		{"default user agent", mk("GET", "svc", "/x", "a=1&b", http.Header{"Accept": {"*/*"}}), true},
		{"empty user agent value", mk("GET", "svc", "/x", "", http.Header{"User-Agent": {""}}), true},
		{"many fields", mk("GET", "svc:8080", "/a/b", "q", full), true},
		{"post without body", mk("POST", "svc", "/p", "", http.Header{"User-Agent": nil}), true},
		{"put", mk("PUT", "svc", "/p", "", nil), true},
		{"patch", mk("PATCH", "svc", "/p", "", nil), true},
		{"delete", mk("DELETE", "svc", "/p", "", nil), true},
		{"no method", mk("", "svc", "/p", "", nil), true},
		{"url host", mk("GET", "", "/p", "", nil), true},
		{"ipv6 zone", mk("GET", "[fe80::1%25eth0]:80", "/p", "", nil), false},
		{"non-ascii host", mk("GET", "café.example", "/p", "", nil), false},
		{"invalid host", mk("GET", "a b", "/p", "", nil), false},
		{"control in target", mk("GET", "svc", "/p\x01", "", nil), false},
		{"path form", &http.Request{Method: "GET", URL: &url.URL{Path: "/p"}, Host: "svc"}, false},
		{"connect", mk("CONNECT", "svc:443", "", "", nil), false},
		{"with body", func() *http.Request {
			r := mk("POST", "svc", "/p", "", nil)
			r.Body, r.ContentLength = io.NopCloser(strings.NewReader("x")), 1
			return r
		}(), false},
		{"close", func() *http.Request { r := mk("GET", "svc", "/p", "", nil); r.Close = true; return r }(), false},
	} {
		var fast bytes.Buffer
		bw := bufio.NewWriter(&fast)
		ok := writeH1Request(bw, tc.req)
		bw.Flush()
		if ok != tc.fast {
			t.Errorf("%s: fast path taken = %v, want %v", tc.name, ok, tc.fast)
			continue
		}
		if !ok {
			if fast.Len() != 0 {
				t.Errorf("%s: declined but wrote %q", tc.name, fast.String())
			}
			continue
		}
		var ref bytes.Buffer
		if err := tc.req.Write(&ref); err != nil {
			t.Fatalf("%s: Request.Write: %v", tc.name, err)
		}
		if fast.String() != ref.String() {
			t.Errorf("%s:\nfast     %q\nnet/http %q", tc.name, fast.String(), ref.String())
		}
	}
}

// TestPlainLength: the upstream's Content-Length field is passed on only
// when it is the length in plain decimal.
func TestPlainLength(t *testing.T) {
	for _, tc := range []struct {
		vs   []string
		n    int64
		want bool
	}{
		{[]string{"5"}, 5, true},
		{[]string{"0"}, 0, true},
		{[]string{"1234"}, 1234, true},
		{[]string{"007"}, 7, false},
		{[]string{"5"}, 6, false},
		{[]string{"5", "5"}, 5, false},
		{nil, 5, false},
		{[]string{""}, 0, false},
		{[]string{"+5"}, 5, false},
	} {
		if got := plainLength(tc.vs, tc.n); got != tc.want {
			t.Errorf("plainLength(%q, %d) = %v, want %v", tc.vs, tc.n, got, tc.want)
		}
	}
	if v := msValues(7); len(v) != 1 || v[0] != "7" || cap(v) != 1 {
		t.Errorf("msValues(7) = %q (cap %d)", v, cap(v))
	}
	if v := msValues(1500); len(v) != 1 || v[0] != "1500" {
		t.Errorf("msValues(1500) = %q", v)
	}
}

// TestSharedHeaderValuesStayIntact: values shared across requests stay
// what they are. x-forwarded-proto's is appended to by a header op on
// every request, and each request sees one appended value (the shared
// slice was not written through); Server, x-envoy-expected-rq-timeout-ms
// and x-envoy-upstream-service-time, set after the header ops, keep one
// value each.
func TestSharedHeaderValuesStayIntact(t *testing.T) {
	u := startUpstream(t, named("u"))
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	r := prefixRoute("/", "c")
	r.RequestHeadersToAdd = []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-forwarded-proto", Value: "extra"}, AppendAction: corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD}}
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env)
	c := client(false)
	for i := 0; i < 3; i++ {
		resp, _ := get(t, c, p, "svc", "/")
		rh := resp.Header
		if vs := rh.Values("X-Seen-X-Forwarded-Proto"); len(vs) != 2 || vs[0] != "http" || vs[1] != "extra" {
			t.Fatalf("request %d: x-forwarded-proto upstream = %q, want [http extra]", i, vs)
		}
		if vs := rh.Values("X-Seen-X-Envoy-Expected-Rq-Timeout-Ms"); len(vs) != 1 || vs[0] != "15000" {
			t.Fatalf("request %d: x-envoy-expected-rq-timeout-ms = %q", i, vs)
		}
		if vs := rh.Values("Server"); len(vs) != 1 || vs[0] != DefaultServerName {
			t.Fatalf("request %d: Server = %q", i, vs)
		}
		if vs := rh.Values("X-Envoy-Upstream-Service-Time"); len(vs) != 1 || parseDigits(vs[0]) < 0 {
			t.Fatalf("request %d: x-envoy-upstream-service-time = %q", i, vs)
		}
	}
	if v := schemeValues("http"); len(v) != 1 || cap(v) != 1 || v[0] != "http" {
		t.Errorf("shared x-forwarded-proto value now %q (cap %d)", v, cap(v))
	}
}
