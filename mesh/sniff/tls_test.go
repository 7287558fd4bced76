package sniff

import (
	"bytes"
	"crypto/tls"
	"errors"
	mrand "math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
)

var realHelloCases = []struct {
	name string
	cfg  *tls.Config
	sni  string
	alpn []string
}{
	{"tls13", &tls.Config{ServerName: "www.Example.com", NextProtos: []string{"h2", "http/1.1"}}, "www.example.com", []string{"h2", "http/1.1"}},
	{"tls12-only", &tls.Config{ServerName: "reviews.default.svc.cluster.local", MaxVersion: tls.VersionTLS12, NextProtos: []string{"istio-peer-exchange", "istio"}}, "reviews.default.svc.cluster.local", []string{"istio-peer-exchange", "istio"}},
	{"tls10-to-12", &tls.Config{ServerName: "OLD.example", MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS12}, "old.example", nil},
	{"tls13-only", &tls.Config{ServerName: "a.b", MinVersion: tls.VersionTLS13, NextProtos: []string{"x-custom/9"}}, "a.b", []string{"x-custom/9"}},
	{"no-sni", &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}, "", []string{"h2"}},
	{"ip-no-sni", &tls.Config{ServerName: "10.1.2.3"}, "", nil},
	{"long-sni", &tls.Config{ServerName: strings.Repeat("a", 63) + "." + strings.Repeat("B", 63) + ".svc"}, strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + ".svc", nil},
}

func TestParseClientHelloReal(t *testing.T) {
	for _, tc := range realHelloCases {
		t.Run(tc.name, func(t *testing.T) {
			b := realHello(t, tc.cfg)
			ch, err := ParseClientHello(b)
			if err != nil {
				t.Fatal(err)
			}
			if ch.ServerName != tc.sni {
				t.Errorf("SNI %q, want %q", ch.ServerName, tc.sni)
			}
			if got := ch.ALPN.Strings(); !slices.Equal(got, tc.alpn) {
				t.Errorf("ALPN %q, want %q", got, tc.alpn)
			}
			if ch.ALPN.Len() != len(tc.alpn) {
				t.Errorf("ALPN.Len %d, want %d", ch.ALPN.Len(), len(tc.alpn))
			}
			// Bytes after the ClientHello (early data, a CCS) change nothing.
			more := append(slices.Clip(b), 23, 3, 3, 0, 2, 'h', 'i')
			if ch2, err := ParseClientHello(more); err != nil || ch2.ServerName != tc.sni {
				t.Errorf("with bytes after it: %q %v", ch2.ServerName, err)
			}
		})
	}
}

// Every strict prefix of a real ClientHello needs more bytes, and the
// length ParseClientHello asks for is never beyond what decides.
func TestParseClientHelloPrefixes(t *testing.T) {
	for _, tc := range realHelloCases {
		b := realHello(t, tc.cfg)
		for i := 0; i < len(b); i++ {
			_, need, err := parseClientHello(b[:i])
			if !errors.Is(err, ErrNeedMore) {
				t.Fatalf("%s: prefix %d/%d: %v, want ErrNeedMore", tc.name, i, len(b), err)
			}
			if need <= i || need > len(b) {
				t.Fatalf("%s: prefix %d/%d: need %d", tc.name, i, len(b), need)
			}
		}
	}
}

// A ClientHello may be cut into records of any size, with empty records
// between them; nothing else may come between them.
func TestParseClientHelloRecordFraming(t *testing.T) {
	b := realHello(t, &tls.Config{ServerName: "Frag.Example", NextProtos: []string{"h2"}})
	stream := handshakeStream(t, b)
	for _, size := range []int{1, 2, 3, 4, 5, 7, 100, 1000, len(stream) - 1} {
		framed := records(stream, size)
		ch, err := ParseClientHello(framed)
		if err != nil || ch.ServerName != "frag.example" || !slices.Equal(ch.ALPN.Strings(), []string{"h2"}) {
			t.Fatalf("records of %d bytes: %+v %v", size, ch, err)
		}
		for i := range framed {
			if _, err := ParseClientHello(framed[:i]); !errors.Is(err, ErrNeedMore) {
				t.Fatalf("records of %d bytes, prefix %d: %v", size, i, err)
			}
		}
	}

	empty := []byte{recordTypeHS, 3, 1, 0, 0}
	withEmpties := func(n int) []byte {
		out := bytes.Repeat(empty, n)
		return append(out, records(stream, 100)...)
	}
	if ch, err := ParseClientHello(withEmpties(maxEmptyRecords)); err != nil || ch.ServerName != "frag.example" {
		t.Errorf("%d empty records first: %v", maxEmptyRecords, err)
	}
	if _, err := ParseClientHello(withEmpties(maxEmptyRecords + 1)); !errors.Is(err, ErrMalformed) {
		t.Errorf("%d empty records: %v, want ErrMalformed", maxEmptyRecords+1, err)
	}

	split := records(stream, 10)
	for _, bad := range []struct {
		name   string
		header []byte
	}{
		{"change_cipher_spec", []byte{20, 3, 3, 0, 1, 1}},
		{"alert", []byte{21, 3, 3, 0, 2, 2, 40}},
		{"version 2.x", []byte{22, 2, 0, 0, 1, 1}},
	} {
		b := append(slices.Clip(split[:15]), bad.header...)
		b = append(b, split[15:]...)
		if _, err := ParseClientHello(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s inside the ClientHello: %v, want ErrMalformed", bad.name, err)
		}
	}

	// Data of the next handshake message in the ClientHello's last record.
	trailing := records(append(slices.Clip(stream), 20, 0, 0, 0), 1<<14)
	if _, err := ParseClientHello(trailing); !errors.Is(err, ErrMalformed) {
		t.Errorf("handshake data after the ClientHello: %v, want ErrMalformed", err)
	}
}

// Bytes that are not TLS are told apart from the first byte or two, so
// tls_inspector does not hold them back.
func TestParseClientHelloNotTLS(t *testing.T) {
	var req bytes.Buffer
	r, _ := http.NewRequest("GET", "http://example.com/", nil)
	r.Write(&req)
	for _, tc := range []struct {
		name   string
		b      []byte
		decide int // bytes after which ErrNotTLS is known
	}{
		{"http", req.Bytes(), 1},
		{"ssh", []byte("SSH-2.0-OpenSSH_9.6\r\n"), 1},
		{"h2 preface", []byte(h2Preface), 1},
		{"sslv2", []byte{0x80, 0x2e, 0x01, 0x03, 0x01}, 1},
		{"alert", []byte{21, 3, 3, 0, 2, 2, 40}, 1},
		{"application data", []byte{23, 3, 3, 0, 1, 0}, 1},
		{"record version 2", []byte{22, 2, 0, 0, 4}, 2},
		{"server hello", []byte{22, 3, 3, 0, 4, 2, 0, 0, 0}, 6},
	} {
		for i := 0; i < tc.decide; i++ {
			if _, err := ParseClientHello(tc.b[:i]); !errors.Is(err, ErrNeedMore) {
				t.Errorf("%s: %d bytes: %v, want ErrNeedMore", tc.name, i, err)
			}
		}
		for i := tc.decide; i <= len(tc.b); i++ {
			if _, err := ParseClientHello(tc.b[:i]); !errors.Is(err, ErrNotTLS) {
				t.Errorf("%s: %d bytes: %v, want ErrNotTLS", tc.name, i, err)
			}
		}
	}

	// Random bytes: no panic, and unless they start like a handshake
	// record, ErrNotTLS from the first byte.
	rng := mrand.New(mrand.NewPCG(1, 2))
	for range 5000 {
		b := make([]byte, rng.IntN(300))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		_, err := ParseClientHello(b)
		if len(b) > 0 && b[0] != recordTypeHS && !errors.Is(err, ErrNotTLS) {
			t.Fatalf("% x: %v, want ErrNotTLS", b[:min(len(b), 8)], err)
		}
		if len(b) > 0 && b[0] == recordTypeHS {
			b[1] = 3 // starts like TLS: must end in an error, never a result
			if _, err := ParseClientHello(b); err == nil {
				t.Fatalf("random bytes % x parsed as a ClientHello", b)
			}
		}
	}
}

// Every length field of a real ClientHello, corrupted, gives an error
// (possibly ErrNeedMore when the length grew), never a panic or a result.
func TestParseClientHelloCorruptLengths(t *testing.T) {
	b := realHello(t, &tls.Config{ServerName: "www.example.com", NextProtos: []string{"h2", "http/1.1"}})
	type field struct {
		name      string
		off, size int
	}
	fields := []field{{"record", 3, 2}, {"handshake", 6, 3}}
	opaque := map[string]bool{}
	p := 5 + 4 + 2 + 32
	fields = append(fields, field{"session_id", p, 1})
	p += 1 + int(b[p])
	fields = append(fields, field{"cipher_suites", p, 2})
	p += 2 + (int(b[p])<<8 | int(b[p+1]))
	fields = append(fields, field{"compression_methods", p, 1})
	p += 1 + int(b[p])
	fields = append(fields, field{"extensions", p, 2})
	for q := p + 2; q+4 <= len(b); {
		typ := int(b[q])<<8 | int(b[q+1])
		n := int(b[q+2])<<8 | int(b[q+3])
		name := "extension " + strconv.Itoa(typ)
		fields = append(fields, field{name, q + 2, 2})
		switch typ {
		case extServerName:
			fields = append(fields, field{"server_name list", q + 4, 2}, field{"host_name", q + 7, 2})
		case extALPN:
			fields = append(fields, field{"alpn list", q + 4, 2}, field{"alpn name", q + 6, 1})
		case extSupportedVersions:
			fields = append(fields, field{"versions list", q + 4, 1})
		default:
			opaque[name] = true
		}
		q += 4 + n
	}
	for _, f := range fields {
		orig := 0
		for i := range f.size {
			orig = orig<<8 | int(b[f.off+i])
		}
		for _, v := range []int{0, 1, orig - 1, orig + 1, orig + 2, 1<<(8*f.size) - 1} {
			if v < 0 || v == orig || v >= 1<<(8*f.size) {
				continue
			}
			bad := slices.Clone(b)
			for i := range f.size {
				bad[f.off+i] = byte(v >> (8 * (f.size - 1 - i)))
			}
			ch, err := ParseClientHello(bad)
			if err != nil {
				continue
			}
			// A shorter ALPN name leaves a malformed list, which Envoy
			// ignores: TLS without ALPN is then the right answer.
			if f.name == "alpn list" || f.name == "alpn name" {
				if ch.ALPN.Len() == 0 && ch.ServerName == "www.example.com" {
					continue
				}
			}
			// An opaque extension that grows by a few bytes swallows the
			// next one's header and the list may still be well-formed
			// (BoringSSL then fails on the extension's contents, which
			// tls_inspector does not read). What was read must not be
			// invented, though.
			if opaque[f.name] && (ch.ServerName == "" || ch.ServerName == "www.example.com") &&
				(ch.ALPN.Len() == 0 || slices.Equal(ch.ALPN.Strings(), []string{"h2", "http/1.1"})) {
				continue
			}
			t.Errorf("%s length %d -> %d: parsed as %+v", f.name, orig, v, ch)
		}
	}
}

// The rules BoringSSL applies before Envoy's inspector declares TLS.
func TestParseClientHelloEnvoyRules(t *testing.T) {
	sv13 := versionsExt(0x0a0a, versionTLS13, versionTLS12)
	for _, tc := range []struct {
		name string
		h    hello
		sni  string
		alpn []string
		err  error
	}{
		{"minimal, no extensions", hello{noExts: true}, "", nil, nil},
		{"empty extensions block", hello{}, "", nil, nil},
		{"sni upper-cased", hello{exts: []ext{sniExt("API.Example.COM")}}, "api.example.com", nil, nil},
		{"sni non-ASCII bytes kept", hello{exts: []ext{sniExt("Ex\xc3\x84mple.\xffZ")}}, "ex\xc3\x84mple.\xffz", nil, nil},
		{"sni 255 bytes", hello{exts: []ext{sniExt(strings.Repeat("a", 255))}}, strings.Repeat("a", 255), nil, nil},
		{"sni 256 bytes", hello{exts: []ext{sniExt(strings.Repeat("a", 256))}}, "", nil, ErrMalformed},
		{"sni empty", hello{exts: []ext{sniExt("")}}, "", nil, ErrMalformed},
		{"sni with NUL", hello{exts: []ext{sniExt("a\x00b")}}, "", nil, ErrMalformed},
		{"sni name type 1", hello{exts: []ext{{extServerName, u16Prefixed(append([]byte{1}, u16Prefixed([]byte("a"))...))}}}, "", nil, ErrMalformed},
		{"sni two names", hello{exts: []ext{{extServerName, u16Prefixed(append(append([]byte{0}, u16Prefixed([]byte("a"))...), append([]byte{0}, u16Prefixed([]byte("b"))...)...))}}}, "", nil, ErrMalformed},
		{"sni empty extension", hello{exts: []ext{{extServerName, nil}}}, "", nil, ErrMalformed},
		{"alpn", hello{exts: []ext{sniExt("x"), alpnExt("h2", "http/1.1")}}, "x", []string{"h2", "http/1.1"}, nil},
		{"alpn empty name ignored", hello{exts: []ext{sniExt("x"), alpnExt("h2", "")}}, "x", nil, nil},
		{"alpn empty list ignored", hello{exts: []ext{sniExt("x"), {extALPN, u16Prefixed(nil)}}}, "x", nil, nil},
		{"alpn trailing byte ignored", hello{exts: []ext{{extALPN, append(alpnExt("h2").data, 0)}}}, "", nil, nil},
		{"alpn truncated ignored", hello{exts: []ext{{extALPN, alpnExt("h2").data[:3]}}}, "", nil, nil},
		{"duplicate extension", hello{exts: []ext{sniExt("a"), {23, nil}, {23, nil}}}, "", nil, ErrMalformed},
		{"duplicate sni", hello{exts: []ext{sniExt("a"), sniExt("b")}}, "", nil, ErrMalformed},
		{"many extensions", hello{exts: manyExts(200, false)}, "", nil, nil},
		{"many extensions, late duplicate", hello{exts: manyExts(200, true)}, "", nil, ErrMalformed},
		{"truncated extension", hello{noExts: true, trailing: u16Prefixed([]byte{0, 23, 0, 5})}, "", nil, ErrMalformed},
		{"truncated extensions block", hello{noExts: true, trailing: []byte{0, 9, 0, 23}}, "", nil, ErrMalformed},
		{"bytes after extensions", hello{exts: []ext{sniExt("a")}, trailing: []byte{0}}, "", nil, ErrMalformed},
		{"session_id 32", hello{sessionID: make([]byte, 32)}, "", nil, nil},
		{"session_id 33", hello{sessionID: make([]byte, 33)}, "", nil, ErrMalformed},
		{"odd cipher_suites", hello{suites: []byte{0x13, 0x01, 0xc0}}, "", nil, ErrMalformed},
		{"no cipher_suites", hello{suites: []byte{}}, "", nil, ErrMalformed},
		{"no compression", hello{compression: []byte{}}, "", nil, ErrMalformed},
		{"no null compression", hello{compression: []byte{1}}, "", nil, ErrMalformed},
		{"tls1.2 two compressions", hello{compression: []byte{1, 0}}, "", nil, nil},
		{"tls1.3 two compressions", hello{compression: []byte{1, 0}, exts: []ext{sv13}}, "", nil, ErrMalformed},
		{"tls1.3 one compression", hello{exts: []ext{sv13, sniExt("v13")}}, "v13", nil, nil},
		{"ssl3 client", hello{version: 0x0300}, "", nil, ErrMalformed},
		{"tls1.0 client", hello{version: versionTLS10}, "", nil, nil},
		{"future legacy version", hello{version: 0x0305}, "", nil, nil},
		{"only unknown versions", hello{exts: []ext{versionsExt(0x7f1c, 0x0a0a)}}, "", nil, ErrMalformed},
		{"only ssl3 in versions", hello{exts: []ext{versionsExt(0x0300)}}, "", nil, ErrMalformed},
		{"empty versions", hello{exts: []ext{versionsExt()}}, "", nil, ErrMalformed},
		{"odd versions", hello{exts: []ext{{extSupportedVersions, u8Prefixed([]byte{3, 3, 3})}}}, "", nil, ErrMalformed},
		{"tls1.3 before odd tail", hello{exts: []ext{{extSupportedVersions, u8Prefixed([]byte{3, 4, 3})}}}, "", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch, err := ParseClientHello(tc.h.record())
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("got %+v, %v; want %v", ch, err, tc.err)
				}
				return
			}
			if err != nil || ch.ServerName != tc.sni || !slices.Equal(ch.ALPN.Strings(), tc.alpn) {
				t.Fatalf("got %q %q %v; want %q %q", ch.ServerName, ch.ALPN.Strings(), err, tc.sni, tc.alpn)
			}
		})
	}

	// BoringSSL refuses a ClientHello over 16 KiB as soon as its header
	// says so.
	big := hello{exts: []ext{{21, make([]byte, maxHelloBody)}}}.message()
	b := records(big, 1<<14)
	if _, err := ParseClientHello(b[:9]); !errors.Is(err, ErrMalformed) {
		t.Errorf("oversized ClientHello header: %v, want ErrMalformed", err)
	}
	// A record longer than 16 KiB, from its header.
	if _, err := ParseClientHello([]byte{22, 3, 1, 0x40, 0x01}); !errors.Is(err, ErrMalformed) {
		t.Errorf("oversized record header: %v, want ErrMalformed", err)
	}
}

func manyExts(n int, dupLast bool) []ext {
	var out []ext
	for i := range n {
		out = append(out, ext{uint16(1000 + i), nil})
	}
	if dupLast {
		out = append(out, ext{1000 + 3, nil})
	}
	return out
}

// max_client_hello_size: a ClientHello not complete within 64 KiB (here
// cut into one-byte records) is ErrTooLarge, as Envoy closes it.
func TestParseClientHelloTooLarge(t *testing.T) {
	msg := hello{exts: []ext{sniExt("big.example"), {21, make([]byte, 12000)}}}.message()
	if ch, err := ParseClientHello(records(msg, 1<<14)); err != nil || ch.ServerName != "big.example" {
		t.Fatalf("in one record: %v", err)
	}
	b := records(msg, 1)
	if len(b) <= MaxClientHelloSize {
		t.Fatalf("test hello too small: %d", len(b))
	}
	if _, err := ParseClientHello(b[:MaxClientHelloSize-1]); !errors.Is(err, ErrNeedMore) {
		t.Errorf("just under the limit: %v, want ErrNeedMore", err)
	}
	for _, n := range []int{MaxClientHelloSize, len(b)} {
		if _, err := ParseClientHello(b[:n]); !errors.Is(err, ErrTooLarge) {
			t.Errorf("%d bytes: %v, want ErrTooLarge", n, err)
		}
	}
}

// Parsing allocates the SNI string and nothing else.
func TestParseClientHelloAllocs(t *testing.T) {
	b := realHello(t, &tls.Config{ServerName: "WWW.Example.com", NextProtos: []string{"h2", "http/1.1"}})
	if n := testing.AllocsPerRun(200, func() { ParseClientHello(b) }); n > 1 {
		t.Errorf("ParseClientHello: %v allocations, want at most 1", n)
	}
	ch, _ := ParseClientHello(b)
	if n := testing.AllocsPerRun(200, func() { ch.ALPN.Strings() }); n > 1 {
		t.Errorf("ALPN.Strings with well-known names: %v allocations, want 1", n)
	}
}

func FuzzParseClientHello(f *testing.F) {
	for _, tc := range realHelloCases {
		f.Add(realHello(f, tc.cfg), []byte{23, 3, 3})
	}
	stream := hello{exts: []ext{sniExt("Fuzz.Example"), alpnExt("h2", "http/1.1"), versionsExt(versionTLS13)}}.message()
	f.Add(records(stream, 3), []byte{})
	f.Add(append(bytes.Repeat([]byte{22, 3, 1, 0, 0}, 3), records(stream, 50)...), []byte{1})
	f.Add(hello{exts: []ext{sniExt("a\x00")}}.record(), []byte{})
	f.Add([]byte{22, 3, 1, 0, 4, 1, 0, 0, 0}, []byte{0})
	f.Add([]byte("GET / HTTP/1.1\r\n"), []byte{})
	f.Fuzz(func(t *testing.T, b, more []byte) {
		ch, need, err := parseClientHello(b)
		switch {
		case err == nil:
			if ch.ServerName != strings.ToLower(ch.ServerName) && strings.ContainsAny(ch.ServerName, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") {
				t.Fatalf("SNI %q not lower-cased", ch.ServerName)
			}
			if len(ch.ServerName) > 255 || strings.IndexByte(ch.ServerName, 0) >= 0 {
				t.Fatalf("SNI %q accepted", ch.ServerName)
			}
			for p := range ch.ALPN.All() {
				if len(p) == 0 {
					t.Fatal("empty ALPN name")
				}
			}
		case errors.Is(err, ErrNeedMore):
			if need <= len(b) || len(b) >= MaxClientHelloSize {
				t.Fatalf("ErrNeedMore on %d bytes asks for %d", len(b), need)
			}
			// No decision before need bytes.
			ext := append(slices.Clip(b), more...)
			if len(ext) < need {
				if _, err := ParseClientHello(ext); !errors.Is(err, ErrNeedMore) {
					t.Fatalf("decided %v at %d bytes, before the %d asked for", err, len(ext), need)
				}
			}
			return
		case errors.Is(err, ErrNotTLS), errors.Is(err, ErrMalformed), errors.Is(err, ErrTooLarge):
		default:
			t.Fatalf("unexpected error %v", err)
		}
		// A decision does not change with more bytes.
		ch2, err2 := ParseClientHello(append(slices.Clip(b), more...))
		if (err == nil) != (err2 == nil) || errors.Is(err, ErrNotTLS) != errors.Is(err2, ErrNotTLS) ||
			ch.ServerName != ch2.ServerName || !bytes.Equal(ch.ALPN, ch2.ALPN) {
			t.Fatalf("decision changed with more bytes: %+v %v -> %+v %v", ch, err, ch2, err2)
		}
	})
}

func BenchmarkParseClientHello(b *testing.B) {
	hello := realHello(b, &tls.Config{ServerName: "Reviews.default.svc.cluster.local", NextProtos: []string{"h2", "http/1.1"}})
	b.SetBytes(int64(len(hello)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseClientHello(hello); err != nil {
			b.Fatal(err)
		}
	}
}
