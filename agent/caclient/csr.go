package caclient

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
)

// KeyType is the workload key's algorithm.
type KeyType int

const (
	// RSA is pilot-agent's default (WORKLOAD_RSA_KEY_SIZE, 2048 bits).
	RSA KeyType = iota
	// ECDSA is P-256, chosen with ECC_SIGNATURE_ALGORITHM=ECDSA.
	ECDSA
)

func (k KeyType) String() string {
	if k == ECDSA {
		return "ECDSA"
	}
	return "RSA"
}

// newKeyAndCSR makes a key and a CSR for spiffeID as Istio's
// GenCSR does (https://github.com/istio/istio/blob/master/security/pkg/pki/util/generate_csr.go):
// an empty subject and one subjectAltName extension holding the URI,
// critical because the subject is empty. Keys are PEM in PKCS#1 (RSA) or
// SEC 1 (EC), pilot-agent's default (PKCS8_KEY=false).
func newKeyAndCSR(kt KeyType, rsaBits int, spiffeID string) (keyPEM, csrPEM []byte, err error) {
	var key crypto.Signer
	var block *pem.Block
	switch kt {
	case ECDSA:
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			return nil, nil, err
		}
		key, block = k, &pem.Block{Type: "EC PRIVATE KEY", Bytes: der}
	default:
		if rsaBits < 2048 {
			rsaBits = 2048 // Istio's MinimumRsaKeySize
		}
		k, err := rsa.GenerateKey(rand.Reader, rsaBits)
		if err != nil {
			return nil, nil, err
		}
		key, block = k, &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)}
	}
	san, err := asn1.Marshal([]asn1.RawValue{{Tag: 6, Class: asn1.ClassContextSpecific, Bytes: []byte(spiffeID)}})
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: san}},
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("csr: %v", err)
	}
	return pem.EncodeToMemory(block), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

func tlsKeyPair(chainPEM, keyPEM []byte) (tls.Certificate, error) {
	return tls.X509KeyPair(chainPEM, keyPEM)
}
