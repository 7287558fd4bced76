//go:build linux

package integration

import (
	"crypto/tls"
	"net"
	"slices"
	"testing"
	"time"
)

// TestParseClientHello checks the wire reader's ClientHello parser (which
// the mTLS tests rely on to say what crossed the wire) on the bytes Go's
// own TLS client sends, post-quantum key share included; no root needed.
func TestParseClientHello(t *testing.T) {
	for _, tc := range []struct {
		sni  string
		alpn []string
	}{
		{"outbound_.8080_._.b.default.svc.cluster.local", []string{"istio-http/1.1", "istio", "http/1.1"}},
		{"outbound_.9000_._.b.default.svc.cluster.local", []string{"istio"}},
		{"", nil},
	} {
		cli, srv := net.Pipe()
		go func() {
			c := tls.Client(cli, &tls.Config{ServerName: tc.sni, NextProtos: tc.alpn, InsecureSkipVerify: true})
			_ = c.Handshake() // fails once srv closes
		}()
		_ = srv.SetDeadline(time.Now().Add(5 * time.Second))
		var got []byte
		buf := make([]byte, 4096)
		var ch clientHello
		var err error
		for {
			n, rerr := srv.Read(buf)
			got = append(got, buf[:n]...)
			if ch, err = parseClientHello(got); err == nil || rerr != nil {
				break
			}
		}
		srv.Close()
		cli.Close()
		if err != nil {
			t.Fatalf("SNI %q: %v (%d bytes)", tc.sni, err, len(got))
		}
		if ch.SNI != tc.sni || !slices.Equal(ch.ALPN, tc.alpn) {
			t.Errorf("parsed SNI %q ALPN %q, want %q %q", ch.SNI, ch.ALPN, tc.sni, tc.alpn)
		}
	}
	if _, err := parseClientHello([]byte("GET / HTTP/1.1\r\n\r\n")); err == nil {
		t.Error("plaintext HTTP parsed as a ClientHello")
	}
}

// TestFlowStream checks the wire reader's reassembly of one direction:
// segments out of order, retransmitted (a longer copy wins), overlapping,
// and a gap (the stream ends before it); sequence numbers wrapping.
func TestFlowStream(t *testing.T) {
	isn := uint32(0xFFFFFFF0) // the payload starts 15 bytes before the wrap
	f := &flowBytes{isn: isn, syn: true, segs: map[uint32][]byte{}}
	at := func(off uint32, s string) { f.segs[isn+1+off] = []byte(s) }
	at(10, "klmno")
	at(0, "abcde")
	at(5, "fghij")
	at(12, "mnopq") // overlaps klmno, extends it
	at(30, "after a gap")
	if got := string(f.stream()); got != "abcdefghijklmnopq" {
		t.Errorf("stream %q, want abcdefghijklmnopq", got)
	}
	g := &flowBytes{isn: 100, syn: true, segs: map[uint32][]byte{105: []byte("late")}}
	if got := g.stream(); got != nil {
		t.Errorf("stream without its first bytes: %q, want nil", got)
	}
}
