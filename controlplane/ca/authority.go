package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Istio's file names for a CA's material: the state folder uses the same
// ones, so a generated root can be handed to istiod as "cacerts" and back.
const (
	CACertFile    = "ca-cert.pem"    // the signing certificate
	CAKeyFile     = "ca-key.pem"     // its key
	RootCertFile  = "root-cert.pem"  // the root, last in every response
	CertChainFile = "cert-chain.pem" // signing certificate up to the root (optional)
)

// Istio's workload TTL bounds (DEFAULT_WORKLOAD_CERT_TTL,
// MAX_WORKLOAD_CERT_TTL) and clock-skew back-dating (ClockSkewGracePeriod):
// https://github.com/istio/istio/blob/master/pilot/pkg/bootstrap/istio_ca.go
// https://github.com/istio/istio/blob/master/security/pkg/pki/util/generate_cert.go
const (
	DefaultWorkloadTTL = 24 * time.Hour
	MaxWorkloadTTL     = 90 * 24 * time.Hour
	clockSkewGrace     = 2 * time.Minute
	selfSignedTTL      = 10 * 365 * 24 * time.Hour // istiod's CITADEL_SELF_SIGNED_CA_CERT_TTL
)

// Authority signs workload and serving certificates with one CA key.
type Authority struct {
	cert  *x509.Certificate // signs
	key   crypto.Signer
	root  *x509.Certificate
	chain []*x509.Certificate // between cert's issuer and the root, cert included unless it is the root
	now   func() time.Time
}

// LoadOrCreate returns the CA kept in dir: loaded if dir holds ca-key.pem,
// else a new self-signed ECDSA P-256 root written there (key 0600), so a
// restart keeps issuing under the same root and issued certificates stay
// valid.
func LoadOrCreate(dir, trustDomain string) (*Authority, error) {
	if _, err := os.Stat(filepath.Join(dir, CAKeyFile)); err == nil {
		return LoadFiles(dir)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{Organization: []string{trustDomain}, CommonName: "meshtun root CA"},
		NotBefore:             now.Add(-clockSkewGrace),
		NotAfter:              now.Add(selfSignedTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := writeFileAtomic(filepath.Join(dir, CAKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	for _, f := range []string{CACertFile, RootCertFile} {
		if err := writeFileAtomic(filepath.Join(dir, f), certPEM, 0o644); err != nil {
			return nil, fmt.Errorf("CA: %w", err)
		}
	}
	return LoadFiles(dir)
}

// LoadFiles reads a CA from istiod's "cacerts" files in dir: ca-cert.pem
// and ca-key.pem sign, root-cert.pem is the trust anchor, cert-chain.pem
// (optional) the chain from ca-cert.pem to the root. The signing
// certificate must chain to the root and match the key.
func LoadFiles(dir string) (*Authority, error) {
	read := func(name string) ([]byte, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("CA: %w", err)
		}
		return b, nil
	}
	certPEM, err := read(CACertFile)
	if err != nil {
		return nil, err
	}
	keyPEM, err := read(CAKeyFile)
	if err != nil {
		return nil, err
	}
	rootPEM, err := read(RootCertFile)
	if err != nil {
		return nil, err
	}
	path := func(name string) string { return filepath.Join(dir, name) }
	certs, err := parseCerts(path(CACertFile), certPEM)
	if err != nil {
		return nil, err
	}
	roots, err := parseCerts(path(RootCertFile), rootPEM)
	if err != nil {
		return nil, err
	}
	a := &Authority{cert: certs[0], root: roots[0], now: time.Now}
	if a.key, err = parseKey(path(CAKeyFile), keyPEM); err != nil {
		return nil, err
	}
	if !publicKeyEqual(a.key.Public(), a.cert.PublicKey) {
		return nil, fmt.Errorf("CA %s: the key does not match the certificate %s", path(CAKeyFile), path(CACertFile))
	}
	if !a.cert.IsCA || a.cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("CA %s: not a CA certificate (basic constraints CA and key usage certSign needed)", path(CACertFile))
	}
	var inter []*x509.Certificate
	if b, err := os.ReadFile(path(CertChainFile)); err == nil {
		cs, err := parseCerts(path(CertChainFile), b)
		if err != nil {
			return nil, err
		}
		inter = cs
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("CA: %w", err)
	}
	if !a.cert.Equal(a.root) {
		a.chain = append(a.chain, a.cert)
	}
	for _, c := range inter { // cert-chain.pem may repeat ca-cert.pem and the root
		if !c.Equal(a.cert) && !c.Equal(a.root) {
			a.chain = append(a.chain, c)
		}
	}
	rootPool := x509.NewCertPool()
	rootPool.AddCert(a.root)
	interPool := x509.NewCertPool()
	for _, c := range a.chain {
		interPool.AddCert(c)
	}
	if _, err := a.cert.Verify(x509.VerifyOptions{Roots: rootPool, Intermediates: interPool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("CA %s does not chain to %s: %v", path(CACertFile), path(RootCertFile), err)
	}
	return a, nil
}

// RootPEM is the root certificate, what clients must trust (Istio's
// istio-ca-root-cert ConfigMap, root-cert.pem).
func (a *Authority) RootPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.root.Raw})
}

// Sign issues a workload certificate for the key in csrPEM with the one
// SAN spiffeID, valid ttl (0 or less: 24h; over 90 days: an error), and
// returns istiod's response chain: [leaf, intermediates…, root], one PEM
// certificate per element. The CSR's own names are ignored.
func (a *Authority) Sign(csrPEM []byte, spiffeID string, ttl time.Duration) ([]string, error) {
	if ttl <= 0 {
		ttl = DefaultWorkloadTTL
	}
	if ttl > MaxWorkloadTTL {
		return nil, fmt.Errorf("requested TTL %s is greater than the max allowed TTL %s", ttl, MaxWorkloadTTL)
	}
	block, _ := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, errors.New("csr: not a PEM CERTIFICATE REQUEST")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("csr: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("csr: signature: %v", err)
	}
	san, err := uriSAN(spiffeID)
	if err != nil {
		return nil, err
	}
	now := a.now()
	notAfter := now.Add(ttl)
	if notAfter.After(a.cert.NotAfter) {
		notAfter = a.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:    randomSerial(),
		NotBefore:       now.Add(-clockSkewGrace),
		NotAfter:        notAfter,
		KeyUsage:        x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		ExtraExtensions: []pkix.Extension{san},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, csr.PublicKey, a.key)
	if err != nil {
		return nil, fmt.Errorf("sign: %v", err)
	}
	out := []string{string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))}
	for _, c := range a.chain {
		out = append(out, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	return append(out, string(a.RootPEM())), nil
}

// ServingCertificate issues the TLS certificate of the control plane's
// secure port (istiod's DNS names, see server.go's DNSNames), valid a year,
// with the chain up to (not including) the root.
func (a *Authority) ServingCertificate(dnsNames []string, ips []net.IP) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	now := a.now()
	notAfter := now.Add(365 * 24 * time.Hour)
	if notAfter.After(a.cert.NotAfter) {
		notAfter = a.cert.NotAfter
	}
	cn := ""
	if len(dnsNames) > 0 {
		cn = dnsNames[0]
	}
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    now.Add(-clockSkewGrace),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dnsNames,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, key.Public(), a.key)
	if err != nil {
		return tls.Certificate{}, err
	}
	tc := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	for _, c := range a.chain {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	return tc, nil
}

// uriSAN is a critical subjectAltName extension holding one URI: critical
// because the subject is empty (RFC 5280 4.2.1.6), as Istio marks it.
func uriSAN(uri string) (pkix.Extension, error) {
	val, err := asn1.Marshal([]asn1.RawValue{{Tag: 6, Class: asn1.ClassContextSpecific, Bytes: []byte(uri)}})
	if err != nil {
		return pkix.Extension{}, err
	}
	return pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: val}, nil
}

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n.Add(n, big.NewInt(1))
}

func parseCerts(path string, b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", path, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no PEM CERTIFICATE", path)
	}
	return out, nil
}

func parseKey(path string, b []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM private key", path)
	}
	var k any
	var err error
	switch block.Type {
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%s: unsupported key type %T", path, k)
	}
	return s, nil
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	ea, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	if ok {
		return ea.Equal(b)
	}
	da, err1 := x509.MarshalPKIXPublicKey(a)
	db, err2 := x509.MarshalPKIXPublicKey(b)
	return err1 == nil && err2 == nil && bytes.Equal(da, db)
}

func newPool(a *Authority) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(a.root)
	return p
}
