package sniff

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
)

// writeRequest returns what net/http writes for req.
func writeRequest(t testing.TB, req *http.Request, proxy bool) []byte {
	t.Helper()
	var b bytes.Buffer
	write := req.Write
	if proxy {
		write = req.WriteProxy
	}
	if err := write(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func newRequest(t testing.TB, method, url, body string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	return req
}

// realH2C returns the first write of net/http's client speaking HTTP/2
// with prior knowledge over cleartext.
func realH2C(t testing.TB) []byte {
	t.Helper()
	c := &captureConn{}
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	tr := &http.Transport{
		Protocols:   &protos,
		DialContext: func(context.Context, string, string) (net.Conn, error) { return c, nil },
	}
	defer tr.CloseIdleConnections()
	if resp, err := (&http.Client{Transport: tr}).Get("http://h2c.example/"); err == nil {
		resp.Body.Close()
	}
	b := c.bytes()
	if !bytes.HasPrefix(b, []byte(h2Preface)) {
		t.Fatalf("net/http h2c client wrote %q", b)
	}
	return b
}

// TestDetectHTTPReal runs net/http's own bytes through the detector, and
// every prefix up to the deciding byte: those need more.
func TestDetectHTTPReal(t *testing.T) {
	connect := newRequest(t, "CONNECT", "http://ignored/", "")
	connect.URL.Opaque, connect.Host = "db.example.com:5432", "db.example.com:5432"
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"get", writeRequest(t, newRequest(t, "GET", "http://reviews:9080/reviews/0?x=1", ""), false), HTTP11},
		{"post", writeRequest(t, newRequest(t, "POST", "http://reviews:9080/api", `{"a":1}`), false), HTTP11},
		{"proxy absolute-form", writeRequest(t, newRequest(t, "GET", "http://user@example.com:8080/a?b=c", ""), true), HTTP11},
		{"connect", writeRequest(t, connect, false), HTTP11},
		{"custom method", writeRequest(t, newRequest(t, "PROPFIND", "http://dav/", ""), false), HTTP11},
		{"http/1.0", []byte("GET /index.html HTTP/1.0\r\nHost: a\r\n\r\n"), HTTP10},
		{"h2c prior knowledge", realH2C(t), H2C},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DetectHTTP(tc.b)
			if err != nil || got.Protocol != tc.want {
				t.Fatalf("%q: %+v %v, want %q", tc.b, got, err, tc.want)
			}
			decide := bytes.IndexByte(tc.b, '\n') + 1
			if tc.want == H2C {
				decide = len(h2Preface)
			}
			for i := range decide {
				if _, err := DetectHTTP(tc.b[:i]); !errors.Is(err, ErrNeedMore) {
					t.Fatalf("prefix %q: %v, want ErrNeedMore", tc.b[:i], err)
				}
			}
		})
	}
}

// Request lines as Envoy's http_inspector (Balsa, custom methods allowed)
// judges them.
var requestLines = []struct {
	line string
	want string // "" for ErrNotHTTP
}{
	{"GET / HTTP/1.1\r\n", HTTP11},
	{"GET / HTTP/1.1\n", HTTP11},
	{"get / HTTP/1.1\r\n", HTTP11}, // any token is a method
	{"M-SEARCH * HTTP/1.1\r\n", HTTP11},
	{"X_Y.Z!#$%&'*+-^`|~9 / HTTP/1.1\r\n", HTTP11},
	{"GET  /a  HTTP/1.1  \r\n", HTTP11}, // runs of whitespace separate
	{"GET\t/\tHTTP/1.1\r\n", HTTP11},
	{"GET /\rHTTP/1.1\r\n", HTTP11},
	{"OPTIONS * HTTP/1.1\r\n", HTTP11},
	{"GET * HTTP/1.1\r\n", HTTP11},
	{"CONNECT example.com:443 HTTP/1.1\r\n", HTTP11},
	{"CONNECT [::1]:443 HTTP/1.1\r\n", HTTP11},
	{"CONNECT /path HTTP/1.1\r\n", HTTP11},
	{"GET http://example.com/a?b HTTP/1.1\r\n", HTTP11},
	{"GET h+t.t-p://u:p@example.com:8443?q HTTP/1.1\r\n", HTTP11},
	{"GET http:// HTTP/1.1\r\n", HTTP11},
	{"GET http://a@b@c/ HTTP/1.1\r\n", HTTP11},
	{"GET /a/%7e?x=[1]{}|\\^\"<> HTTP/1.1\r\n", HTTP11},
	{"GET /HTTP/1.1\r\n", HTTP11}, // Envoy asks whether the line ends in HTTP/1.1
	{"GET / HTTP/1.0\r\n", HTTP10},
	{"GET /\r\n", HTTP10}, // HTTP/0.9
	{"GET /\n", HTTP10},
	{"GET / HTTP/2.0\r\n", HTTP10}, // any other valid version is 1.0
	{"GET / HTTP/0.9\r\n", HTTP10},
	{"GET / HTTP/1.2\r\n", HTTP10},
	{"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", HTTP10}, // not quite the preface
	{"GET / http/1.1\r\n", ""},
	{"GET / HTTP/1.1 extra\r\n", ""},
	{"GET / HTTP/11\r\n", ""},
	{"GET / HTTP/1.10\r\n", ""},
	{"GET / HTTP/1.\r\n", ""},
	{"GET / HTTP/a.1\r\n", ""},
	{"GET / HTTP\r\n", ""},
	{"GET\r\n", ""},
	{"GET \r\n", ""},
	{"\r\nGET / HTTP/1.1\r\n", ""},
	{"\nGET / HTTP/1.1\r\n", ""},
	{" GET / HTTP/1.1\r\n", ""},
	{"G(T / HTTP/1.1\r\n", ""},
	{"GÉT / HTTP/1.1\r\n", ""},
	{"GET /\x7f HTTP/1.1\r\n", ""},
	{"GET /\x80 HTTP/1.1\r\n", ""},
	{"GET example.com:443 HTTP/1.1\r\n", ""}, // authority form is CONNECT's
	{"GET 1http://x/ HTTP/1.1\r\n", ""},
	{"GET http:/x HTTP/1.1\r\n", ""},
	{"GET http: HTTP/1.1\r\n", ""},
	{"GET http HTTP/1.1\r\n", ""},
	{"GET http://a@@b/ HTTP/1.1\r\n", ""},
	{"GET http://exa^mple/ HTTP/1.1\r\n", ""},
	{"CONNECT exa^mple:443 HTTP/1.1\r\n", ""},
	{"SSH-2.0-OpenSSH_9.6\r\n", ""},
	{"\x00\x01\x02\x03", ""},
	{"\x16\x03\x01\x02\x00\x01", ""},
}

func TestDetectHTTPRequestLines(t *testing.T) {
	for _, tc := range requestLines {
		got, err := DetectHTTP([]byte(tc.line))
		if tc.want == "" {
			if !errors.Is(err, ErrNotHTTP) {
				t.Errorf("%q: %+v %v, want ErrNotHTTP", tc.line, got, err)
			}
			continue
		}
		if err != nil || got.Protocol != tc.want {
			t.Errorf("%q: %+v %v, want %q", tc.line, got, err, tc.want)
		}
	}
}

// Non-HTTP bytes are turned away as soon as no continuation could be a
// request line; bytes that could still be one wait.
func TestDetectHTTPEarly(t *testing.T) {
	for _, b := range []string{
		"\x16", "\x00", " ", "\r", "\n", "\x80", "G(", "GET /\x80", "GET /a\x7f", "GET 1", "GET http:x", "GET http:/x",
		"GET http://a@@", "GET http://a^", "GET / X", "GET / HTTP/1.1 x", "GET / HTTP/1.1.", "GET / HTTP/1.a",
		"GET / HTTP/1.1 H", "CONNECT a^", "SSH-2.0-OpenSSH_9.6 1",
	} {
		if _, err := DetectHTTP([]byte(b)); !errors.Is(err, ErrNotHTTP) {
			t.Errorf("%q: %v, want ErrNotHTTP", b, err)
		}
	}
	for _, b := range []string{
		"", "G", "GE", "GET", "GET ", "GET /", "GET / HT", "GET / HTTP/1.1", "GET / HTTP/1.1\r", "GET / HTTP/1.1 \r",
		"GET http:", "GET http:/", "GET http://a@", "CONNECT a:1", "P", "PRI * HTTP/2", "PRI * HTTP/2.0\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r", "SSH-2.0-OpenSSH_9.6", "SSH-2.0-OpenSSH_9.6 /", "GET\t", "X",
	} {
		if _, err := DetectHTTP([]byte(b)); !errors.Is(err, ErrNeedMore) {
			t.Errorf("%q: %v, want ErrNeedMore", b, err)
		}
	}
	hello := realHello(t, &tls.Config{ServerName: "x.example"})
	if _, err := DetectHTTP(hello[:1]); !errors.Is(err, ErrNotHTTP) {
		t.Errorf("first byte of a ClientHello: %v, want ErrNotHTTP", err)
	}
}

// http_inspector reads 64 KiB at most looking for the request line.
func TestDetectHTTPTooLarge(t *testing.T) {
	long := append([]byte("GET /"), bytes.Repeat([]byte("a"), MaxRequestLineSize)...)
	if _, err := DetectHTTP(long[:MaxRequestLineSize-1]); !errors.Is(err, ErrNeedMore) {
		t.Errorf("under the limit: %v, want ErrNeedMore", err)
	}
	if _, err := DetectHTTP(long); !errors.Is(err, ErrTooLarge) {
		t.Errorf("no LF in %d bytes: %v, want ErrTooLarge", len(long), err)
	}
	line := append(append(long[:MaxRequestLineSize-len(" HTTP/1.1\r\n"):MaxRequestLineSize-len(" HTTP/1.1\r\n")], " HTTP/1.1\r\n"...), "Host: x\r\n"...)
	if got, err := DetectHTTP(line); err != nil || got.Protocol != HTTP11 {
		t.Errorf("request line of exactly %d bytes: %+v %v", MaxRequestLineSize, got, err)
	}
}

// Fed in pieces, the detector Inspect keeps reaches the same answer as
// DetectHTTP on the whole.
func TestHTTPDetectorIncremental(t *testing.T) {
	inputs := [][]byte{[]byte(h2Preface + "\x00\x00\x00\x04"), realH2C(t)}
	for _, tc := range requestLines {
		inputs = append(inputs, []byte(tc.line+"Host: x\r\n\r\n"))
	}
	for _, b := range inputs {
		want, wantErr := DetectHTTP(b)
		for _, step := range []int{1, 2, 3, 5, 17} {
			var d httpDetector
			var got HTTPResult
			var err error
			for n := 0; ; n += step {
				if got, err = d.detect(b[:min(n, len(b))]); !errors.Is(err, ErrNeedMore) || n >= len(b) {
					break
				}
			}
			if got != want || !sameErr(err, wantErr) {
				t.Errorf("%q in pieces of %d: %+v %v, whole: %+v %v", b, step, got, err, want, wantErr)
			}
		}
	}
}

func sameErr(a, b error) bool {
	for _, e := range []error{ErrNeedMore, ErrNotHTTP, ErrTooLarge, ErrNotTLS, ErrMalformed} {
		if errors.Is(a, e) != errors.Is(b, e) {
			return false
		}
	}
	return (a == nil) == (b == nil)
}

func TestDetectHTTPNoAllocs(t *testing.T) {
	for _, b := range [][]byte{
		writeRequest(t, newRequest(t, "GET", "http://productpage:9080/productpage", ""), false),
		[]byte(h2Preface), []byte("SSH-2.0-OpenSSH_9.6\r\n"), []byte("GET / HT"),
	} {
		if n := testing.AllocsPerRun(100, func() { DetectHTTP(b) }); n != 0 {
			t.Errorf("DetectHTTP(%q) allocates %v times", b, n)
		}
	}
}

func FuzzDetectHTTP(f *testing.F) {
	for _, tc := range requestLines {
		f.Add([]byte(tc.line), []byte("Host: x\r\n"), uint8(3))
	}
	f.Add([]byte(h2Preface), []byte{0, 0, 0, 4}, uint8(1))
	f.Add(writeRequest(f, newRequest(f, "POST", "http://a/b", "x"), false), []byte{}, uint8(7))
	f.Add(writeRequest(f, newRequest(f, "GET", "http://a:1/b?c", ""), true), []byte{}, uint8(2))
	f.Fuzz(func(t *testing.T, b, more []byte, step uint8) {
		got, err := DetectHTTP(b)
		switch {
		case err == nil:
			if got.Protocol != HTTP10 && got.Protocol != HTTP11 && got.Protocol != H2C {
				t.Fatalf("protocol %q", got.Protocol)
			}
		case errors.Is(err, ErrNeedMore):
			if len(b) >= MaxRequestLineSize {
				t.Fatalf("ErrNeedMore on %d bytes", len(b))
			}
		case errors.Is(err, ErrNotHTTP), errors.Is(err, ErrTooLarge):
		default:
			t.Fatalf("unexpected error %v", err)
		}
		// A decision does not change with more bytes.
		all := append(slices.Clip(b), more...)
		got2, err2 := DetectHTTP(all)
		if !errors.Is(err, ErrNeedMore) && (got2 != got || !sameErr(err, err2)) {
			t.Fatalf("decision changed with more bytes: %+v %v -> %+v %v", got, err, got2, err2)
		}
		// Pieces give the same answer as the whole.
		var d httpDetector
		var got3 HTTPResult
		var err3 error
		n := max(int(step), 1)
		for i := 0; ; i += n {
			if got3, err3 = d.detect(all[:min(i, len(all))]); !errors.Is(err3, ErrNeedMore) || i >= len(all) {
				break
			}
		}
		if got3 != got2 || !sameErr(err3, err2) {
			t.Fatalf("in pieces of %d: %+v %v, whole: %+v %v", n, got3, err3, got2, err2)
		}
	})
}

func BenchmarkDetectHTTP(b *testing.B) {
	req := writeRequest(b, newRequest(b, "GET", "http://productpage:9080/productpage?u=normal", ""), false)
	b.SetBytes(int64(bytes.IndexByte(req, '\n') + 1))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DetectHTTP(req); err != nil {
			b.Fatal(err)
		}
	}
}
