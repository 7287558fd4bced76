package sniff

import (
	"bytes"
	"fmt"
	"iter"
	"strings"
)

// ClientHello is what tls_inspector takes from a TLS ClientHello.
type ClientHello struct {
	// ServerName is the server_name extension's host_name, ASCII
	// lower-cased as Envoy stores it; "" when the client sent none.
	ServerName string
	// ALPN is the protocol list the client offers, in its order. It is
	// empty when the extension is absent or malformed (Envoy ignores a
	// malformed list and leaves the TLS stack to reject it).
	ALPN ProtocolList
}

// ProtocolList is an ALPN ProtocolNameList in wire form: names, each
// prefixed by its one-byte length. It aliases the bytes it was parsed
// from, so parsing a ClientHello does not allocate for it.
type ProtocolList []byte

// All yields the protocol names in order. Each name aliases the list.
func (l ProtocolList) All() iter.Seq[[]byte] {
	return func(yield func([]byte) bool) {
		for len(l) > 0 {
			n := int(l[0])
			if n == 0 || 1+n > len(l) {
				return // not produced by ParseClientHello
			}
			if !yield(l[1 : 1+n]) {
				return
			}
			l = l[1+n:]
		}
	}
}

// Len returns the number of protocol names.
func (l ProtocolList) Len() int {
	n := 0
	for range l.All() {
		n++
	}
	return n
}

// Strings returns the protocol names, nil for an empty list. Names meshes
// commonly use are not allocated.
func (l ProtocolList) Strings() []string {
	n := l.Len()
	if n == 0 {
		return nil
	}
	out := make([]string, 0, n)
	for p := range l.All() {
		out = append(out, protocolName(p))
	}
	return out
}

// protocolName returns p as a string, without allocating for well-known
// names (the switch compares without converting).
func protocolName(p []byte) string {
	switch string(p) {
	case "h2":
		return "h2"
	case "http/1.1":
		return "http/1.1"
	case "http/1.0":
		return "http/1.0"
	case "h2c":
		return "h2c"
	case "istio":
		return "istio"
	case "istio-peer-exchange":
		return "istio-peer-exchange"
	case "istio-http/1.0":
		return "istio-http/1.0"
	case "istio-http/1.1":
		return "istio-http/1.1"
	case "istio-h2":
		return "istio-h2"
	}
	return string(p)
}

// TLS wire constants, with the limits BoringSSL (Envoy's TLS stack)
// applies while reading a ClientHello.
const (
	recordHeaderLen    = 5
	recordTypeHS       = 22
	maxPlaintextRecord = 1 << 14 // SSL3_RT_MAX_PLAIN_LENGTH
	maxEmptyRecords    = 32      // kMaxEmptyRecords
	hsHeaderLen        = 4
	hsTypeClientHello  = 1
	// maxHelloBody is kMaxMessageLen, BoringSSL's bound on a handshake
	// message a server that does not ask for client certificates reads
	// (tls_inspector's case). A longer ClientHello fails the handshake.
	maxHelloBody = 16384

	extServerName        = 0
	extALPN              = 16
	extSupportedVersions = 43

	versionTLS10 = 0x0301
	versionTLS12 = 0x0303
	versionTLS13 = 0x0304
)

// ParseClientHello parses the TLS records at the start of b, as Envoy's
// tls_inspector does with its peeked bytes, and returns the SNI and ALPN
// of the ClientHello they carry. The ClientHello may span several records.
//
// It returns ErrNotTLS as soon as b cannot start a ClientHello (its first
// byte is not a handshake record, the record version is not 3.x, or the
// handshake message is not a ClientHello); ErrNeedMore while b is an
// incomplete ClientHello; ErrTooLarge when MaxClientHelloSize bytes do not
// complete it; and an error wrapping ErrMalformed for records or a
// ClientHello Envoy's TLS stack would reject. Envoy marks the connection
// "tls" only when it returns no error.
//
// The result's ALPN aliases b; only ServerName is allocated.
func ParseClientHello(b []byte) (ClientHello, error) {
	ch, _, err := parseClientHello(b)
	return ch, err
}

// parseClientHello is ParseClientHello that also returns, with
// ErrNeedMore, a length b must reach before the answer can change, so an
// incremental caller need not re-parse on every byte.
func parseClientHello(b []byte) (ClientHello, int, error) {
	// Envoy never reads past max_client_hello_size.
	limited := len(b) >= MaxClientHelloSize
	if limited {
		b = b[:MaxClientHelloSize]
	}
	needMore := func(need int) (ClientHello, int, error) {
		if limited {
			return ClientHello{}, 0, fmt.Errorf("%w: no complete ClientHello in max_client_hello_size (%d bytes)", ErrTooLarge, MaxClientHelloSize)
		}
		return ClientHello{}, need, ErrNeedMore
	}

	var (
		hdr     [hsHeaderLen]byte // the handshake message header, once seen
		hdrN    int
		msgLen  = -1 // handshake bytes (header included) the ClientHello needs
		got     int  // handshake bytes in the complete records walked
		frags   int  // non-empty records walked
		first   []byte
		empties int
		off     int
	)
	for {
		h := b[off:min(off+recordHeaderLen, len(b))]
		if err := checkRecordHeader(h, off == 0); err != nil {
			return ClientHello{}, 0, err
		}
		if len(h) < recordHeaderLen {
			if len(h) < 2 { // the next byte may still decide
				return needMore(len(b) + 1)
			}
			return needMore(off + recordHeaderLen)
		}
		n := int(h[3])<<8 | int(h[4])
		if n > maxPlaintextRecord {
			return ClientHello{}, 0, fmt.Errorf("%w: record length %d exceeds %d", ErrMalformed, n, maxPlaintextRecord)
		}
		end := off + recordHeaderLen + n
		frag := b[off+recordHeaderLen : min(end, len(b))]

		// Learn the handshake header from whatever of it has arrived, so a
		// message that is not a ClientHello, or too long to be one, is
		// turned away before the rest of it.
		for i := 0; hdrN < hsHeaderLen && i < len(frag); i++ {
			hdr[hdrN] = frag[i]
			hdrN++
		}
		if hdrN > 0 && hdr[0] != hsTypeClientHello {
			return ClientHello{}, 0, ErrNotTLS
		}
		if hdrN == hsHeaderLen && msgLen < 0 {
			body := int(hdr[1])<<16 | int(hdr[2])<<8 | int(hdr[3])
			if body > maxHelloBody {
				return ClientHello{}, 0, fmt.Errorf("%w: ClientHello of %d bytes exceeds %d", ErrMalformed, body, maxHelloBody)
			}
			msgLen = hsHeaderLen + body
		}
		if len(b) < end {
			if hdrN < hsHeaderLen {
				return needMore(len(b) + 1)
			}
			return needMore(end)
		}

		off = end
		if n == 0 {
			if empties++; empties > maxEmptyRecords {
				return ClientHello{}, 0, fmt.Errorf("%w: more than %d empty records", ErrMalformed, maxEmptyRecords)
			}
			continue
		}
		empties = 0
		if frags++; frags == 1 {
			first = frag
		}
		got += n
		if msgLen < 0 || got < msgLen {
			continue
		}
		if got > msgLen {
			// BoringSSL: the ClientHello must end the client's flight.
			return ClientHello{}, 0, fmt.Errorf("%w: %d bytes of handshake data after the ClientHello", ErrMalformed, got-msgLen)
		}
		msg := first
		if frags > 1 {
			msg = joinFragments(b[:off], msgLen)
		}
		ch, err := parseHelloBody(msg[hsHeaderLen:])
		return ch, 0, err
	}
}

// checkRecordHeader checks the bytes present of a record header. The first
// record decides whether this is TLS at all; a bad record after it is a
// broken ClientHello.
func checkRecordHeader(h []byte, first bool) error {
	if len(h) > 0 && h[0] != recordTypeHS {
		if first {
			return ErrNotTLS
		}
		return fmt.Errorf("%w: record type %d inside the ClientHello", ErrMalformed, h[0])
	}
	// BoringSSL checks only the major version before one is negotiated.
	if len(h) > 1 && h[1] != 3 {
		if first {
			return ErrNotTLS
		}
		return fmt.Errorf("%w: record version %d.x inside the ClientHello", ErrMalformed, h[1])
	}
	return nil
}

// joinFragments reassembles a handshake message of msgLen bytes from the
// complete handshake records in b.
func joinFragments(b []byte, msgLen int) []byte {
	msg := make([]byte, 0, msgLen)
	for len(b) >= recordHeaderLen && len(msg) < msgLen {
		n := int(b[3])<<8 | int(b[4])
		msg = append(msg, b[recordHeaderLen:recordHeaderLen+n]...)
		b = b[recordHeaderLen+n:]
	}
	return msg
}

// parseHelloBody parses a ClientHello body and applies the checks
// BoringSSL makes before it calls the server-name callback, the point at
// which Envoy's tls_inspector declares the connection TLS: the message
// structure (SSL_parse_client_hello), the server_name extension
// (extract_sni), version negotiation for TLS 1.0–1.3 (Envoy's range) and
// the compression methods. Other extensions' contents are not validated.
func parseHelloBody(s []byte) (ClientHello, error) {
	var ch ClientHello
	legacyVersion, s, ok := readU16(s)
	if ok {
		_, s, ok = readBytes(s, 32) // random
	}
	if !ok {
		return ch, fmt.Errorf("%w: truncated before session_id", ErrMalformed)
	}
	sessionID, s, ok := readU8Prefixed(s)
	if !ok || len(sessionID) > 32 {
		return ch, fmt.Errorf("%w: bad session_id", ErrMalformed)
	}
	suites, s, ok := readU16Prefixed(s)
	if !ok || len(suites) < 2 || len(suites)%2 != 0 {
		return ch, fmt.Errorf("%w: bad cipher_suites", ErrMalformed)
	}
	compression, s, ok := readU8Prefixed(s)
	if !ok || len(compression) == 0 {
		return ch, fmt.Errorf("%w: bad compression_methods", ErrMalformed)
	}
	var exts []byte
	if len(s) > 0 {
		if exts, s, ok = readU16Prefixed(s); !ok {
			return ch, fmt.Errorf("%w: truncated extensions", ErrMalformed)
		}
		if len(s) != 0 {
			return ch, fmt.Errorf("%w: %d bytes after the extensions", ErrMalformed, len(s))
		}
	}

	var sni, alpn, versions []byte
	var hasSNI, hasVersions bool
	var dup dupSet
	for len(exts) > 0 {
		var typ int
		var data []byte
		typ, exts, ok = readU16(exts)
		if ok {
			data, exts, ok = readU16Prefixed(exts)
		}
		if !ok {
			return ch, fmt.Errorf("%w: truncated extension", ErrMalformed)
		}
		if dup.add(uint16(typ)) {
			return ch, fmt.Errorf("%w: duplicate extension %d", ErrMalformed, typ)
		}
		switch typ {
		case extServerName:
			sni, hasSNI = data, true
		case extALPN:
			alpn = data
		case extSupportedVersions:
			versions, hasVersions = data, true
		}
	}

	var host []byte
	if hasSNI {
		var err error
		if host, err = parseServerName(sni); err != nil {
			return ch, err
		}
	}
	version, err := negotiateVersion(legacyVersion, versions, hasVersions)
	if err != nil {
		return ch, err
	}
	if bytes.IndexByte(compression, 0) < 0 {
		return ch, fmt.Errorf("%w: compression_methods without null", ErrMalformed)
	}
	if version == versionTLS13 && len(compression) != 1 {
		return ch, fmt.Errorf("%w: TLS 1.3 with %d compression methods", ErrMalformed, len(compression))
	}
	ch.ALPN = parseALPN(alpn)
	if host != nil {
		ch.ServerName = lowerASCII(host)
	}
	return ch, nil
}

// parseServerName applies BoringSSL's extract_sni: exactly one name, of
// type host_name, 1 to 255 bytes without NUL.
func parseServerName(data []byte) ([]byte, error) {
	list, rest, ok := readU16Prefixed(data)
	var typ int
	var host []byte
	if ok {
		typ, list, ok = readU8(list)
	}
	if ok {
		host, list, ok = readU16Prefixed(list)
	}
	if !ok || len(list) != 0 || len(rest) != 0 {
		return nil, fmt.Errorf("%w: bad server_name extension", ErrMalformed)
	}
	if typ != 0 || len(host) == 0 || len(host) > 255 || bytes.IndexByte(host, 0) >= 0 {
		return nil, fmt.Errorf("%w: unrecognized server_name", ErrMalformed)
	}
	return host, nil
}

// parseALPN applies Envoy's tls_inspector onALPN: a well-formed, non-empty
// ProtocolNameList of non-empty names, or nothing.
func parseALPN(data []byte) ProtocolList {
	list, rest, ok := readU16Prefixed(data)
	if !ok || len(rest) != 0 || len(list) < 2 {
		return nil
	}
	for s := list; len(s) > 0; {
		var name []byte
		if name, s, ok = readU8Prefixed(s); !ok || len(name) == 0 {
			return nil
		}
	}
	return ProtocolList(list)
}

// negotiateVersion finds the version BoringSSL, limited to TLS 1.0–1.3 as
// Envoy's inspector is, would pick: the highest it supports in the
// client's supported_versions, or else the legacy version capped at 1.2.
func negotiateVersion(legacy int, data []byte, present bool) (int, error) {
	if !present {
		if legacy < versionTLS10 {
			return 0, fmt.Errorf("%w: client version 0x%04x is below TLS 1.0", ErrMalformed, legacy)
		}
		return min(legacy, versionTLS12), nil
	}
	list, rest, ok := readU8Prefixed(data)
	if !ok || len(rest) != 0 || len(list) == 0 {
		return 0, fmt.Errorf("%w: bad supported_versions", ErrMalformed)
	}
	for v := versionTLS13; v >= versionTLS10; v-- {
		for s := list; len(s) > 0; s = s[2:] {
			if len(s) < 2 {
				return 0, fmt.Errorf("%w: bad supported_versions", ErrMalformed)
			}
			if int(s[0])<<8|int(s[1]) == v {
				return v, nil
			}
		}
	}
	return 0, fmt.Errorf("%w: no version between TLS 1.0 and 1.3 offered", ErrMalformed)
}

// dupSet tracks extension types to reject duplicates, as BoringSSL does.
// Real ClientHellos carry a few dozen extensions at most: those are kept
// in a small array; a bitmap on the stack takes over past it.
type dupSet struct {
	small [48]uint16
	n     int
	big   *[1 << 13]byte
}

func (d *dupSet) add(t uint16) (dup bool) {
	if d.n < len(d.small) {
		for _, u := range d.small[:d.n] {
			if u == t {
				return true
			}
		}
		d.small[d.n] = t
		d.n++
		return false
	}
	if d.big == nil {
		d.big = new([1 << 13]byte)
		for _, u := range d.small {
			d.big[u>>3] |= 1 << (u & 7)
		}
	}
	if d.big[t>>3]&(1<<(t&7)) != 0 {
		return true
	}
	d.big[t>>3] |= 1 << (t & 7)
	return false
}

// lowerASCII returns b as a string with A–Z lower-cased and every other
// byte kept, as Envoy's absl::AsciiStrToLower does; one allocation.
func lowerASCII(b []byte) string {
	upper := false
	for _, c := range b {
		if 'A' <= c && c <= 'Z' {
			upper = true
			break
		}
	}
	if !upper {
		return string(b)
	}
	var sb strings.Builder
	sb.Grow(len(b))
	for _, c := range b {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		sb.WriteByte(c)
	}
	return sb.String()
}

func readU8(s []byte) (int, []byte, bool) {
	if len(s) < 1 {
		return 0, s, false
	}
	return int(s[0]), s[1:], true
}

func readU16(s []byte) (int, []byte, bool) {
	if len(s) < 2 {
		return 0, s, false
	}
	return int(s[0])<<8 | int(s[1]), s[2:], true
}

func readBytes(s []byte, n int) ([]byte, []byte, bool) {
	if len(s) < n {
		return nil, s, false
	}
	return s[:n], s[n:], true
}

func readU8Prefixed(s []byte) ([]byte, []byte, bool) {
	n, s, ok := readU8(s)
	if !ok {
		return nil, s, false
	}
	return readBytes(s, n)
}

func readU16Prefixed(s []byte) ([]byte, []byte, bool) {
	n, s, ok := readU16(s)
	if !ok {
		return nil, s, false
	}
	return readBytes(s, n)
}
