// Package sniff implements Envoy's tls_inspector and http_inspector
// listener filters: it reads the first bytes of a connection without
// consuming them, learns the transport protocol, the SNI and ALPN of a TLS
// ClientHello, or the HTTP version of a plaintext request, and hands the
// connection on with those bytes still to be read.
package sniff

import (
	"errors"
	"strings"
)

var (
	// ErrNeedMore means the bytes so far are a prefix of something the
	// inspector could still recognise.
	ErrNeedMore = errors.New("sniff: need more bytes")
	// ErrNotTLS means the bytes cannot start a TLS handshake.
	ErrNotTLS = errors.New("sniff: not TLS")
	// ErrNotHTTP means the bytes cannot start an HTTP/1.x or h2c request.
	ErrNotHTTP = errors.New("sniff: not HTTP")
)

// MaxClientHelloSize is Envoy's tls_inspector default max_client_hello_size.
const MaxClientHelloSize = 64 << 10

// ClientHello is what tls_inspector takes from a ClientHello.
type ClientHello struct {
	ServerName string   // lower-cased, as Envoy does
	ALPN       []string // in the client's order
}

// ParseClientHello parses the handshake at the start of b: one or more TLS
// records carrying a ClientHello.
func ParseClientHello(b []byte) (ClientHello, error) {
	var ch ClientHello
	// Record header: type 22 (handshake), version 3.x, length.
	if len(b) >= 1 && b[0] != 22 {
		return ch, ErrNotTLS
	}
	if len(b) >= 2 && b[1] != 3 {
		return ch, ErrNotTLS
	}
	if len(b) < 5 {
		return ch, ErrNeedMore
	}
	// Reassemble the handshake message from consecutive records.
	var hs []byte
	var single []byte
	rest := b
	for {
		if len(rest) < 5 {
			return ch, ErrNeedMore
		}
		if rest[0] != 22 || rest[1] != 3 {
			return ch, errors.New("sniff: ClientHello interrupted by a non-handshake record")
		}
		rl := int(rest[3])<<8 | int(rest[4])
		if rl == 0 || rl > 1<<14+256 {
			return ch, errors.New("sniff: bad TLS record length")
		}
		if len(rest) < 5+rl {
			if hs == nil && single == nil {
				// Check what we have of the first record early.
				if err := checkHandshakePrefix(rest[5:]); err != nil {
					return ch, err
				}
			}
			return ch, ErrNeedMore
		}
		frag := rest[5 : 5+rl]
		rest = rest[5+rl:]
		switch {
		case single == nil && hs == nil:
			single = frag
		case hs == nil:
			hs = append(append([]byte(nil), single...), frag...)
		default:
			hs = append(hs, frag...)
		}
		msg := single
		if hs != nil {
			msg = hs
		}
		if err := checkHandshakePrefix(msg); err != nil {
			return ch, err
		}
		if len(msg) >= 4 {
			ml := int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])
			if 4+ml > MaxClientHelloSize {
				return ch, errors.New("sniff: ClientHello larger than max_client_hello_size")
			}
			if len(msg) >= 4+ml {
				return parseHello(msg[4 : 4+ml])
			}
		}
	}
}

func checkHandshakePrefix(msg []byte) error {
	if len(msg) >= 1 && msg[0] != 1 { // client_hello
		return ErrNotTLS
	}
	return nil
}

// reader is a bounds-checked cursor over a handshake message.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) n(k int) []byte {
	if r.bad || k < 0 || len(r.b) < k {
		r.bad = true
		return nil
	}
	v := r.b[:k]
	r.b = r.b[k:]
	return v
}

func (r *reader) u8() int {
	v := r.n(1)
	if v == nil {
		return 0
	}
	return int(v[0])
}
func (r *reader) u16() int {
	v := r.n(2)
	if v == nil {
		return 0
	}
	return int(v[0])<<8 | int(v[1])
}

func parseHello(body []byte) (ClientHello, error) {
	var ch ClientHello
	r := reader{b: body}
	r.n(2)       // legacy_version
	r.n(32)      // random
	r.n(r.u8())  // session id
	r.n(r.u16()) // cipher suites
	r.n(r.u8())  // compression methods
	if r.bad {
		return ch, errors.New("sniff: malformed ClientHello")
	}
	if len(r.b) == 0 {
		return ch, nil // no extensions
	}
	exts := reader{b: r.n(r.u16())}
	if r.bad {
		return ch, errors.New("sniff: malformed ClientHello extensions")
	}
	for len(exts.b) > 0 && !exts.bad {
		typ := exts.u16()
		data := reader{b: exts.n(exts.u16())}
		switch typ {
		case 0: // server_name
			list := reader{b: data.n(data.u16())}
			for len(list.b) > 0 && !list.bad {
				nt := list.u8()
				name := list.n(list.u16())
				if nt == 0 && !list.bad && ch.ServerName == "" {
					ch.ServerName = strings.ToLower(string(name))
				}
			}
			if list.bad || data.bad {
				return ch, errors.New("sniff: malformed server_name extension")
			}
		case 16: // application_layer_protocol_negotiation
			list := reader{b: data.n(data.u16())}
			for len(list.b) > 0 && !list.bad {
				p := list.n(list.u8())
				if !list.bad && len(p) > 0 {
					ch.ALPN = append(ch.ALPN, string(p))
				}
			}
			if list.bad || data.bad {
				return ch, errors.New("sniff: malformed ALPN extension")
			}
		}
	}
	if exts.bad {
		return ch, errors.New("sniff: malformed ClientHello extensions")
	}
	return ch, nil
}

// HTTP application protocols as Envoy's http_inspector names them.
const (
	HTTP10 = "http/1.0"
	HTTP11 = "http/1.1"
	H2C    = "h2c"
)

const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// maxRequestLine bounds how much DetectHTTP reads looking for a request line.
const maxRequestLine = 64 << 10

// DetectHTTP reports the HTTP version a connection starts with.
func DetectHTTP(b []byte) (string, error) {
	if len(b) == 0 {
		return "", ErrNeedMore
	}
	// h2c prior knowledge.
	n := min(len(b), len(h2Preface))
	if string(b[:n]) == h2Preface[:n] {
		if n == len(h2Preface) {
			return H2C, nil
		}
		return "", ErrNeedMore
	}
	// HTTP/1.x request line: token SP target SP HTTP/1.d CRLF.
	i := 0
	for i < len(b) && isTokenChar(b[i]) {
		i++
	}
	if i == len(b) {
		if i > maxRequestLine {
			return "", ErrNotHTTP
		}
		return "", ErrNeedMore
	}
	if i == 0 || b[i] != ' ' {
		return "", ErrNotHTTP
	}
	j := i + 1
	for j < len(b) && b[j] != ' ' {
		if b[j] < 0x21 || b[j] == 0x7f {
			return "", ErrNotHTTP
		}
		j++
	}
	if j == len(b) {
		if j > maxRequestLine {
			return "", ErrNotHTTP
		}
		return "", ErrNeedMore
	}
	if j == i+1 {
		return "", ErrNotHTTP
	}
	ver := b[j+1:]
	const prefix = "HTTP/1."
	m := min(len(ver), len(prefix))
	if string(ver[:m]) != prefix[:m] {
		return "", ErrNotHTTP
	}
	if len(ver) <= len(prefix) {
		return "", ErrNeedMore
	}
	proto := HTTP11
	switch ver[len(prefix)] {
	case '0':
		proto = HTTP10
	case '1':
	default:
		return "", ErrNotHTTP
	}
	eol := ver[len(prefix)+1:]
	switch {
	case len(eol) == 0:
		return "", ErrNeedMore
	case eol[0] == '\n':
		return proto, nil
	case eol[0] != '\r':
		return "", ErrNotHTTP
	case len(eol) == 1:
		return "", ErrNeedMore
	case eol[1] != '\n':
		return "", ErrNotHTTP
	}
	return proto, nil
}

func isTokenChar(c byte) bool {
	if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}
