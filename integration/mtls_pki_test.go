//go:build linux

package integration

import (
	"bytes"
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
	"os"
	"path/filepath"
	"testing"
	"time"
)

// meshCA is the control plane's CA read from its state folder, so a test
// can issue certificates the mesh trusts (a client from outside the mesh,
// an openssl server, an expired certificate) without going through an
// agent.
type meshCA struct {
	cert    *x509.Certificate
	key     crypto.Signer
	rootPEM []byte
	dir     string // holds root-cert.pem, for openssl -CAfile
}

func loadMeshCA(t *testing.T, cp *meshtunCP) *meshCA {
	t.Helper()
	dir := filepath.Join(filepath.Dir(cp.tokenFile), "ca")
	read := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatalf("control plane CA: %v", err)
		}
		return b
	}
	certBlk, _ := pem.Decode(read("ca-cert.pem"))
	keyBlk, _ := pem.Decode(read("ca-key.pem"))
	if certBlk == nil || keyBlk == nil {
		t.Fatalf("control plane CA in %s: no PEM", dir)
	}
	cert, err := x509.ParseCertificate(certBlk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	var key any
	if key, err = x509.ParsePKCS8PrivateKey(keyBlk.Bytes); err != nil {
		if key, err = x509.ParseECPrivateKey(keyBlk.Bytes); err != nil {
			if key, err = x509.ParsePKCS1PrivateKey(keyBlk.Bytes); err != nil {
				t.Fatalf("control plane CA key %s: %v", filepath.Join(dir, "ca-key.pem"), err)
			}
		}
	}
	return &meshCA{cert: cert, key: key.(crypto.Signer), rootPEM: read("root-cert.pem"), dir: dir}
}

// rootFile is the CA's root-cert.pem.
func (ca *meshCA) rootFile() string { return filepath.Join(ca.dir, "root-cert.pem") }

// issuedCert is a leaf with its key, as PEM files and as a tls.Certificate.
type issuedCert struct {
	leaf              *x509.Certificate
	certFile, keyFile string // PEM: the leaf (then an intermediate signer); the PKCS#8 key
	tls               tls.Certificate
}

// issue signs a workload-shaped leaf (ECDSA P-256, the one URI SAN id,
// serverAuth+clientAuth) valid from notBefore to notAfter, signed by the
// mesh CA.
func (ca *meshCA) issue(t *testing.T, id string, notBefore, notAfter time.Time) *issuedCert {
	t.Helper()
	return issueLeaf(t, ca.cert, ca.key, id, notBefore, notAfter)
}

func issueLeaf(t *testing.T, parent *x509.Certificate, parentKey crypto.Signer, id string, notBefore, notAfter time.Time) *issuedCert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(id)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	tmpl := &x509.Certificate{SerialNumber: serial, URIs: []*url.URL{u}, NotBefore: notBefore, NotAfter: notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if !bytes.Equal(parent.RawSubject, parent.RawIssuer) { // an intermediate: send it along
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: parent.Raw})...)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	dir := t.TempDir()
	ic := &issuedCert{leaf: leaf, certFile: filepath.Join(dir, "cert.pem"), keyFile: filepath.Join(dir, "key.pem")}
	if err := os.WriteFile(ic.certFile, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ic.keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if ic.tls, err = tls.X509KeyPair(certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	return ic
}

// foreignCA is a self-signed root nobody in the mesh trusts.
func foreignCA(t *testing.T) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{Organization: []string{"cluster.local"}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c, key
}
