package sniff

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"
)

// captureConn records a client's first write and fails everything after
// it, so a client hands over its opening bytes and gives up.
type captureConn struct {
	mu  sync.Mutex
	out bytes.Buffer
}

var errCaptured = errors.New("captured")

func (c *captureConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.out.Len() > 0 {
		return 0, errCaptured
	}
	c.out.Write(b)
	return len(b), nil
}

func (c *captureConn) bytes() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.out.Bytes())
}
func (c *captureConn) Read([]byte) (int, error)         { return 0, errCaptured }
func (c *captureConn) Close() error                     { return nil }
func (c *captureConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *captureConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *captureConn) SetDeadline(time.Time) error      { return nil }
func (c *captureConn) SetReadDeadline(time.Time) error  { return nil }
func (c *captureConn) SetWriteDeadline(time.Time) error { return nil }

// realHello returns the first write of a crypto/tls client: its
// ClientHello record(s).
func realHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c := &captureConn{}
	_ = tls.Client(c, cfg).Handshake()
	b := c.bytes()
	if len(b) == 0 {
		t.Fatal("crypto/tls wrote no ClientHello")
	}
	return b
}

// ext is a ClientHello extension for the builder.
type ext struct {
	typ  uint16
	data []byte
}

func u16(v int) []byte { return []byte{byte(v >> 8), byte(v)} }

func u8Prefixed(b []byte) []byte  { return append([]byte{byte(len(b))}, b...) }
func u16Prefixed(b []byte) []byte { return append(u16(len(b)), b...) }

func sniExt(name string) ext {
	entry := append([]byte{0}, u16Prefixed([]byte(name))...)
	return ext{extServerName, u16Prefixed(entry)}
}

func alpnExt(names ...string) ext {
	var list []byte
	for _, n := range names {
		list = append(list, u8Prefixed([]byte(n))...)
	}
	return ext{extALPN, u16Prefixed(list)}
}

func versionsExt(vs ...int) ext {
	var list []byte
	for _, v := range vs {
		list = append(list, u16(v)...)
	}
	return ext{extSupportedVersions, u8Prefixed(list)}
}

// hello describes a ClientHello for the builder; zero fields get the
// values a TLS 1.2 client would send.
type hello struct {
	version     int
	sessionID   []byte
	suites      []byte
	compression []byte
	exts        []ext
	noExts      bool   // omit the extensions block entirely
	trailing    []byte // bytes after the extensions block
}

// message returns the handshake message (header included).
func (h hello) message() []byte {
	if h.version == 0 {
		h.version = versionTLS12
	}
	if h.suites == nil {
		h.suites = []byte{0x13, 0x01, 0xc0, 0x2f}
	}
	if h.compression == nil {
		h.compression = []byte{0}
	}
	b := u16(h.version)
	b = append(b, make([]byte, 32)...)
	b = append(b, u8Prefixed(h.sessionID)...)
	b = append(b, u16Prefixed(h.suites)...)
	b = append(b, u8Prefixed(h.compression)...)
	if !h.noExts {
		var exts []byte
		for _, e := range h.exts {
			exts = append(exts, u16(int(e.typ))...)
			exts = append(exts, u16Prefixed(e.data)...)
		}
		b = append(b, u16Prefixed(exts)...)
	}
	b = append(b, h.trailing...)
	return append([]byte{hsTypeClientHello, byte(len(b) >> 16), byte(len(b) >> 8), byte(len(b))}, b...)
}

// record returns the message in one handshake record.
func (h hello) record() []byte { return records(h.message(), 1<<14) }

// records frames a handshake stream in handshake records of at most size
// bytes.
func records(stream []byte, size int) []byte {
	var out []byte
	for len(stream) > 0 {
		n := min(size, len(stream))
		out = append(out, recordTypeHS, 3, 1, byte(n>>8), byte(n))
		out = append(out, stream[:n]...)
		stream = stream[n:]
	}
	return out
}

// handshakeStream extracts the handshake bytes from well-formed records.
func handshakeStream(t testing.TB, b []byte) []byte {
	t.Helper()
	var out []byte
	for len(b) > 0 {
		if len(b) < 5 || b[0] != recordTypeHS {
			t.Fatalf("not handshake records: % x", b[:min(len(b), 5)])
		}
		n := int(b[3])<<8 | int(b[4])
		out = append(out, b[5:5+n]...)
		b = b[5+n:]
	}
	return out
}

// tcpPair returns a connected loopback TCP pair, closed at the end of t.
func tcpPair(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// selfSigned returns a server certificate for names.
func selfSigned(t testing.TB, names ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: names[0]},
		DNSNames:     names,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
