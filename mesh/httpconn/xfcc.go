package httpconn

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"net/http"
	"strings"
	"sync"

	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
)

// x-forwarded-client-cert (XFCC) tells the application behind the proxy
// who the TLS client was: with Istio's inbound APPEND_FORWARD + URI, the
// app reads the caller's SPIFFE ID from it. Envoy's rules
// (ConnectionManagerUtility::mutateXfccRequestHeader), per
// forward_client_cert_details:
//
//   - ALWAYS_FORWARD_ONLY: the header goes on as the client sent it.
//   - SANITIZE (the default), or any mode on a connection without a client
//     certificate (plaintext, or TLS without one): the header is removed,
//     so a client cannot claim an identity it has no certificate for.
//   - FORWARD_ONLY: sent on unchanged (mTLS only).
//   - APPEND_FORWARD: this connection's element is appended to what the
//     client sent ("," between elements); SANITIZE_SET: it replaces it.
//
// The element is "By=<local URI SAN>;Hash=<sha256 of the client's
// certificate, hex>" and then, as set_current_client_cert_details asks and
// in Envoy's order, Cert="<PEM, URL-encoded>", Chain="<PEMs, URL-encoded>",
// Subject="<RFC 2253 subject>", URI=<each URI SAN> ("URI=" when none),
// DNS=<each DNS SAN>, joined by ";".

const xfccHeader = "X-Forwarded-Client-Cert"

// xfccDetail is one field set_current_client_cert_details asks for.
type xfccDetail uint8

const (
	xfccCert xfccDetail = iota
	xfccChain
	xfccSubject
	xfccURI
	xfccDNS
)

// xfccConfig is the compiled forward_client_cert_details and
// set_current_client_cert_details of a connection manager.
type xfccConfig struct {
	mode    hcmv3.HttpConnectionManager_ForwardClientCertDetails
	details []xfccDetail // in Envoy's order: Cert, Chain, Subject, URI, DNS
}

func parseXFCC(h *hcmv3.HttpConnectionManager) (xfccConfig, error) {
	c := xfccConfig{mode: h.GetForwardClientCertDetails()}
	switch c.mode {
	case hcmv3.HttpConnectionManager_SANITIZE, hcmv3.HttpConnectionManager_FORWARD_ONLY,
		hcmv3.HttpConnectionManager_APPEND_FORWARD, hcmv3.HttpConnectionManager_SANITIZE_SET,
		hcmv3.HttpConnectionManager_ALWAYS_FORWARD_ONLY:
	default:
		return c, fieldf("forward_client_cert_details", "unknown value %d", int32(c.mode))
	}
	if h.GetForwardClientCertMatcher() != nil {
		return c, fieldf("forward_client_cert_matcher", "not supported; use forward_client_cert_details")
	}
	d := h.GetSetCurrentClientCertDetails()
	if d == nil {
		return c, nil
	}
	if d.GetIssuer() {
		return c, fieldf("set_current_client_cert_details.issuer", "not supported")
	}
	if d.GetFormat() != hcmv3.HttpConnectionManager_TEXT {
		return c, fieldf("set_current_client_cert_details.format", "%s not supported; only TEXT", d.GetFormat())
	}
	if d.GetCert() {
		c.details = append(c.details, xfccCert)
	}
	if d.GetChain() {
		c.details = append(c.details, xfccChain)
	}
	if d.GetSubject().GetValue() {
		c.details = append(c.details, xfccSubject)
	}
	if d.GetUri() {
		c.details = append(c.details, xfccURI)
	}
	if d.GetDns() {
		c.details = append(c.details, xfccDNS)
	}
	return c, nil
}

// xfccCache holds a connection's XFCC element: the same for each of its
// requests, so it is built once, by the first request that needs it.
type xfccCache struct {
	once sync.Once
	elem string
}

// mutateXFCC applies the connection manager's XFCC rule to a request's
// headers. A request that keeps or drops the header allocates nothing.
func (s *stream) mutateXFCC(h http.Header) {
	x := &s.cfg.xfcc
	if x.mode == hcmv3.HttpConnectionManager_ALWAYS_FORWARD_ONLY {
		return
	}
	tlsState := s.h.info.TLS
	if x.mode == hcmv3.HttpConnectionManager_SANITIZE || tlsState == nil || len(tlsState.PeerCertificates) == 0 {
		delete(h, xfccHeader)
		return
	}
	if x.mode == hcmv3.HttpConnectionManager_FORWARD_ONLY {
		return
	}
	c := &s.h.xfcc
	c.once.Do(func() { c.elem = x.element(s.h.info.LocalURISAN, tlsState.PeerCertificates) })
	if x.mode == hcmv3.HttpConnectionManager_SANITIZE_SET {
		h[xfccHeader] = []string{c.elem}
		return
	}
	// APPEND_FORWARD. Envoy keeps one XFCC header, its instances joined
	// by ",", and appends this hop's element.
	prev := strings.Join(h[xfccHeader], ",")
	if prev == "" {
		h[xfccHeader] = []string{c.elem}
		return
	}
	h[xfccHeader] = []string{prev + "," + c.elem}
}

// element formats this connection's XFCC element: local is the proxy's
// own URI SAN (By=), chain the client's certificates, leaf first.
func (x *xfccConfig) element(local string, chain []*x509.Certificate) string {
	leaf := chain[0]
	var b strings.Builder
	sep := func() {
		if b.Len() > 0 {
			b.WriteByte(';')
		}
	}
	if local != "" {
		b.WriteString("By=")
		b.WriteString(local)
	}
	sum := sha256.Sum256(leaf.Raw)
	sep()
	b.WriteString("Hash=")
	b.WriteString(hex.EncodeToString(sum[:]))
	for _, d := range x.details {
		switch d {
		case xfccCert:
			sep()
			b.WriteString(`Cert="`)
			b.WriteString(urlEncode(pemOf(leaf)))
			b.WriteByte('"')
		case xfccChain:
			sep()
			b.WriteString(`Chain="`)
			for _, c := range chain {
				b.WriteString(urlEncode(pemOf(c)))
			}
			b.WriteByte('"')
		case xfccSubject:
			// The key is there even when the subject is empty (Istio's
			// workload certificates have none).
			sep()
			b.WriteString(`Subject="`)
			b.WriteString(leaf.Subject.String())
			b.WriteByte('"')
		case xfccURI:
			if len(leaf.URIs) == 0 {
				sep()
				b.WriteString("URI=")
			}
			for _, u := range leaf.URIs {
				sep()
				b.WriteString("URI=")
				b.WriteString(u.String())
			}
		case xfccDNS:
			for _, n := range leaf.DNSNames {
				sep()
				b.WriteString("DNS=")
				b.WriteString(n)
			}
		}
	}
	return b.String()
}

func pemOf(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}

// urlEncode is Envoy's PercentEncoding::urlEncode: every byte but ALPHA,
// DIGIT, '*', '-', '.' and '_' becomes %XX (upper-case hex; space is %20,
// not '+'), so PEM's newlines, '+', '/' and '=' cannot be read as XFCC's
// own separators.
func urlEncode(s string) string {
	const hexUpper = "0123456789ABCDEF"
	var b strings.Builder
	b.Grow(len(s) + len(s)/4)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '*' || c == '-' || c == '.' || c == '_' {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexUpper[c>>4])
		b.WriteByte(hexUpper[c&0xf])
	}
	return b.String()
}

// Istio's peer metadata headers: a sidecar Envoy's istio.metadata_exchange
// HTTP filter adds them to requests (outbound) and responses (inbound) to
// tell the other sidecar who it is, and removes them on the way in.
// meshtun does not run that exchange, so it removes them both ways
// itself: they must not reach the application, nor a client outside the
// mesh.
const (
	peerMetadataHeader   = "X-Envoy-Peer-Metadata"
	peerMetadataIDHeader = "X-Envoy-Peer-Metadata-Id"
)

// stripPeerMetadata removes Istio's peer metadata headers from h.
func stripPeerMetadata(h http.Header) {
	delete(h, peerMetadataHeader)
	delete(h, peerMetadataIDHeader)
}
