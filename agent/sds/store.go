package sds

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strconv"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// The two secret names istiod's generated clusters and listeners reference
// through the bootstrap's sds-grpc cluster (Istio's WorkloadKeyCertResourceName
// and RootCertReqResourceName).
const (
	// WorkloadCert is the tls_certificate: the issued chain and its key.
	WorkloadCert = "default"
	// RootCA is the validation_context: the trust bundle peers are verified against.
	RootCA = "ROOTCA"
)

// SecretTypeURL is the type of every resource this server sends, and the
// type_url Envoy puts in its SDS requests.
const SecretTypeURL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

// Identity is what the CA client (or the file-mounted certificate watcher)
// feeds the server on every issue or rotation.
type Identity struct {
	// ChainPEM is the issued chain, leaf first and root last, concatenated:
	// Envoy gets it whole as certificate_chain (as pilot-agent serves it), so a
	// peer can build the path through any intermediates.
	ChainPEM []byte
	// KeyPEM is the private key of the leaf (PKCS#1, PKCS#8 or SEC 1 PEM).
	KeyPEM []byte
	// RootsPEM is the trust bundle served as ROOTCA: the last element of the
	// issued chain plus meshConfig.caCertificates (see TrustBundle). It is kept
	// apart from the chain because it changes on its own (a root rotation),
	// and ROOTCA is pushed only when it does.
	RootsPEM []byte
	// Expire is the leaf's NotAfter, for /certs and readiness; when zero,
	// Update takes it from the leaf.
	Expire time.Time
}

// TrustBundle builds Identity.RootsPEM the way pilot-agent does: the last
// certificate of the issued chain (Istio's CA has no root-fetch call; the
// root travels at the end of every chain) followed by the extra roots
// (meshConfig.caCertificates), each extra certificate once.
func TrustBundle(chainPEM []byte, extra ...[]byte) ([]byte, error) {
	chain, err := parseCerts(chainPEM)
	if err != nil {
		return nil, fmt.Errorf("certificate chain: %w", err)
	}
	if len(chain) == 0 {
		return nil, errors.New("certificate chain: no certificate")
	}
	var out bytes.Buffer
	seen := map[string]bool{}
	add := func(c *x509.Certificate) {
		if seen[string(c.Raw)] {
			return
		}
		seen[string(c.Raw)] = true
		_ = pem.Encode(&out, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	add(chain[len(chain)-1])
	for i, e := range extra {
		certs, err := parseCerts(e)
		if err != nil {
			return nil, fmt.Errorf("extra roots[%d]: %w", i, err)
		}
		for _, c := range certs {
			add(c)
		}
	}
	return out.Bytes(), nil
}

// parseCerts decodes every CERTIFICATE block of p; other blocks or trailing
// garbage are an error, so a truncated file is not served half.
func parseCerts(p []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := bytes.TrimSpace(p)
	for len(rest) > 0 {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return nil, errors.New("not PEM (or trailing data after the last block)")
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d is %q, want CERTIFICATE", len(certs), b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(certs), err)
		}
		certs = append(certs, c)
		rest = bytes.TrimSpace(rest)
	}
	return certs, nil
}

// entry is one named secret as sent: the encoded resource and the version
// it got when its content last changed.
type entry struct {
	version string
	any     *anypb.Any
	raw     []byte // the content the version stands for, to detect "unchanged"
}

// snapshot is the immutable state streams read without locks; Update
// publishes a new one and closes the old one's changed channel, which wakes
// every stream to compare versions.
type snapshot struct {
	gen      uint64
	id       Identity
	secrets  map[string]entry
	changed  chan struct{}
	versionS string // strconv of gen, the version_info of responses built from it
}

func emptySnapshot() *snapshot {
	return &snapshot{secrets: map[string]entry{}, changed: make(chan struct{}), versionS: "0"}
}

// validate checks id and returns its leaf NotAfter.
func (id Identity) validate() (time.Time, error) {
	if len(id.ChainPEM) == 0 {
		return time.Time{}, errors.New("identity: ChainPEM is empty")
	}
	if len(id.KeyPEM) == 0 {
		return time.Time{}, errors.New("identity: KeyPEM is empty")
	}
	chain, err := parseCerts(id.ChainPEM)
	if err != nil {
		return time.Time{}, fmt.Errorf("identity: ChainPEM: %w", err)
	}
	if _, err := tls.X509KeyPair(id.ChainPEM, id.KeyPEM); err != nil {
		return time.Time{}, fmt.Errorf("identity: KeyPEM does not go with the leaf of ChainPEM: %w", err)
	}
	roots, err := parseCerts(id.RootsPEM)
	if err != nil {
		return time.Time{}, fmt.Errorf("identity: RootsPEM: %w", err)
	}
	if len(roots) == 0 {
		return time.Time{}, errors.New("identity: RootsPEM is empty")
	}
	return chain[0].NotAfter, nil
}

// next returns the snapshot that follows prev with id's secrets; entries
// whose bytes did not change keep their version, so a rotation that keeps
// the root does not push ROOTCA.
func (prev *snapshot) next(id Identity) (*snapshot, error) {
	gen := prev.gen + 1
	v := strconv.FormatUint(gen, 10)
	s := &snapshot{gen: gen, id: id, secrets: make(map[string]entry, 2), changed: make(chan struct{}), versionS: v}
	build := func(name string, raw []byte, sec *tlsv3.Secret) error {
		if old, ok := prev.secrets[name]; ok && bytes.Equal(old.raw, raw) {
			s.secrets[name] = old
			return nil
		}
		a, err := anypb.New(sec)
		if err != nil {
			return fmt.Errorf("secret %q: %w", name, err)
		}
		s.secrets[name] = entry{version: v, any: a, raw: raw}
		return nil
	}
	chainKey := append(append(append([]byte(nil), id.ChainPEM...), 0), id.KeyPEM...)
	if err := build(WorkloadCert, chainKey, &tlsv3.Secret{
		Name: WorkloadCert,
		Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inline(id.ChainPEM),
			PrivateKey:       inline(id.KeyPEM),
		}},
	}); err != nil {
		return nil, err
	}
	if err := build(RootCA, id.RootsPEM, &tlsv3.Secret{
		Name: RootCA,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: inline(id.RootsPEM),
		}},
	}); err != nil {
		return nil, err
	}
	return s, nil
}

func inline(b []byte) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: append([]byte(nil), b...)}}
}
