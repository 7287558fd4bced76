// Package testpki issues certificates for tests the way Istio's CA does
// for workloads: a self-signed root, and leaves carrying a SPIFFE URI SAN
// (spiffe://<trust domain>/ns/<ns>/sa/<sa>), ECDSA P-256, usable for both
// client and server authentication. It also wraps them as the SDS
// secrets istiod's TLS contexts reference ("default", "ROOTCA").
package testpki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// CA is a root certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	PEM  []byte // the root certificate, PEM
}

// serial numbers certificates uniquely within a test binary.
var serial atomic.Int64

// NewCA makes a self-signed root named cn, valid for a day.
func NewCA(t testing.TB, cn string) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial.Add(1)),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"meshtun test"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// Leaf is an issued certificate with its key.
type Leaf struct {
	Cert     *x509.Certificate
	CertPEM  []byte // leaf then the issuing root, as istiod's CA returns the chain
	KeyPEM   []byte
	TLS      tls.Certificate // for crypto/tls peers in tests
	Identity string          // the SPIFFE ID, "" when none
}

// LeafOptions say what a leaf carries besides its key.
type LeafOptions struct {
	SPIFFE   string // URI SAN, e.g. spiffe://cluster.local/ns/default/sa/client
	DNS      []string
	Subject  pkix.Name     // Istio's workload certificates have an empty one
	NotAfter time.Time     // zero: a day from now
	Validity time.Duration // with NotAfter zero and Validity set: now+Validity (negative: expired)
}

// SPIFFE is Istio's workload identity: spiffe://cluster.local/ns/<ns>/sa/<sa>.
func SPIFFE(ns, sa string) string { return "spiffe://cluster.local/ns/" + ns + "/sa/" + sa }

// Issue signs a leaf with o's contents.
func (ca *CA) Issue(t testing.TB, o LeafOptions) *Leaf {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	notAfter := o.NotAfter
	if notAfter.IsZero() {
		d := o.Validity
		if d == 0 {
			d = 24 * time.Hour
		}
		notAfter = time.Now().Add(d)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1)),
		Subject:      o.Subject,
		NotBefore:    time.Now().Add(-2 * time.Hour),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     o.DNS,
	}
	if o.SPIFFE != "" {
		u, err := url.Parse(o.SPIFFE)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	l := &Leaf{
		Cert:     cert,
		CertPEM:  append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), ca.PEM...),
		KeyPEM:   pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		Identity: o.SPIFFE,
	}
	l.TLS, err = tls.X509KeyPair(l.CertPEM, l.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// Pool is a cert pool holding the CAs' roots.
func Pool(cas ...*CA) *x509.CertPool {
	p := x509.NewCertPool()
	for _, ca := range cas {
		p.AddCert(ca.Cert)
	}
	return p
}

// CertSecret is the SDS secret name holding l (Istio's "default").
func CertSecret(name string, l *Leaf) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: l.CertPEM}},
		PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: l.KeyPEM}},
	}}}
}

// RootSecret is the SDS secret name trusting the CAs' roots (Istio's
// "ROOTCA").
func RootSecret(name string, cas ...*CA) *tlsv3.Secret {
	var b []byte
	for _, ca := range cas {
		b = append(b, ca.PEM...)
	}
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: b}},
	}}}
}
