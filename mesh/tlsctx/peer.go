package tlsctx

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"runtime"
	"sync"
	"weak"
)

// Peer is the verified identity of the other side of a *tls.Conn, in the
// forms Envoy's access log, XFCC and RBAC use.
type Peer struct {
	URISANs, DNSSANs []string
	Subject          string
	Serial           string // lowercase hex, as Envoy prints it
	Hash             string // hex SHA-256 of the leaf's DER
	Cert             *x509.Certificate
}

// PeerOf is the peer of cs; false when the peer sent no certificate.
func PeerOf(cs tls.ConnectionState) (Peer, bool) {
	if len(cs.PeerCertificates) == 0 {
		return Peer{}, false
	}
	c := cs.PeerCertificates[0]
	p := Peer{DNSSANs: c.DNSNames, Subject: c.Subject.String(), Cert: c}
	for _, u := range c.URIs {
		p.URISANs = append(p.URISANs, u.String())
	}
	if c.SerialNumber != nil {
		p.Serial = c.SerialNumber.Text(16)
	}
	h := sha256.Sum256(c.Raw)
	p.Hash = hex.EncodeToString(h[:])
	return p, true
}

// LocalURISAN is the first URI SAN of the certificate this side presented
// on a connection a Downstream accepted with a client certificate (XFCC's
// By=), "" otherwise. crypto/tls does not report the local certificate,
// so Handshake remembers it against the connection's peer-certificate
// slice, which crypto/tls allocates per server connection; the entry goes
// with the connection's certificates.
func LocalURISAN(cs tls.ConnectionState) string {
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	if v, ok := localSANs.Load(weak.Make(&cs.PeerCertificates[0])); ok {
		return v.(string)
	}
	return ""
}

var localSANs sync.Map // weak.Pointer[*x509.Certificate] → string

func rememberLocal(peer []*x509.Certificate, local *tls.Certificate) {
	leaf := local.Leaf
	if leaf == nil || len(leaf.URIs) == 0 {
		return
	}
	key := weak.Make(&peer[0])
	if _, loaded := localSANs.LoadOrStore(key, leaf.URIs[0].String()); !loaded {
		runtime.AddCleanup(&peer[0], func(k weak.Pointer[*x509.Certificate]) { localSANs.Delete(k) }, key)
	}
}
