// Package testpki is the test kit for anything that does TLS with mesh
// identities: a CA that issues SPIFFE leaves shaped as istiod issues them
// (ECDSA P-256, one URI SAN, both server and client EKU, NotBefore back-dated
// two minutes), the SDS secrets istio-agent serves for them (`default`,
// `ROOTCA`), and istiod-shaped TLS transport sockets that reference those
// secrets. One copy, so tlsctx, the cluster and listener code and the
// integration tests read the same.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// CA is a self-signed root that issues leaves.
type CA struct {
	Cert    *x509.Certificate
	Key     *ecdsa.PrivateKey
	CertPEM []byte
	Pool    *x509.CertPool
}

// NewCA returns a fresh root valid from an hour ago for ten days.
func NewCA(t testing.TB) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(t), Subject: pkix.Name{Organization: []string{"cluster.local"}, CommonName: "testpki root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(240 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{Cert: cert, Key: key, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), Pool: pool}
}

// LeafOpts shape a leaf; the zero value is istiod's shape.
type LeafOpts struct {
	NotBefore, NotAfter time.Time // zero: now-2m, now+24h
	DNS                 []string  // extra DNS SANs
	Email               []string
	IPs                 []string
	ExtraURIs           []string
	CommonName          string
	// Intermediate, if set, signs the leaf instead of the CA; it is then
	// part of the chain (leaf, intermediate, root).
	Intermediate *CA
}

// Leaf is an issued certificate with its key.
type Leaf struct {
	Cert     *x509.Certificate
	TLS      tls.Certificate // chain leaf first, Leaf set
	CertPEM  []byte          // the leaf alone
	ChainPEM []byte          // leaf, intermediates, root: as istio-agent serves `default`
	KeyPEM   []byte          // PKCS#8
}

// Leaf issues a certificate for spiffeID ("" for none) signed by ca.
func (ca *CA) Leaf(t testing.TB, spiffeID string, o LeafOpts) *Leaf {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if o.NotBefore.IsZero() {
		o.NotBefore = now.Add(-2 * time.Minute)
	}
	if o.NotAfter.IsZero() {
		o.NotAfter = now.Add(24 * time.Hour)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(t), Subject: pkix.Name{CommonName: o.CommonName},
		NotBefore: o.NotBefore, NotAfter: o.NotAfter, DNSNames: o.DNS, EmailAddresses: o.Email,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, s := range append([]string{spiffeID}, o.ExtraURIs...) {
		if s == "" {
			continue
		}
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, u)
	}
	for _, s := range o.IPs {
		tmpl.IPAddresses = append(tmpl.IPAddresses, parseIP(t, s))
	}
	signer, signerKey := ca.Cert, ca.Key
	if o.Intermediate != nil {
		signer, signerKey = o.Intermediate.Cert, o.Intermediate.Key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, key.Public(), signerKey)
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
	l := &Leaf{Cert: cert, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})}
	l.ChainPEM = append([]byte{}, l.CertPEM...)
	l.TLS = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}
	if o.Intermediate != nil {
		l.ChainPEM = append(l.ChainPEM, o.Intermediate.CertPEM...)
		l.TLS.Certificate = append(l.TLS.Certificate, o.Intermediate.Cert.Raw)
	}
	l.ChainPEM = append(l.ChainPEM, ca.CertPEM...)
	return l
}

// Intermediate returns a CA signed by ca (its CertPEM is the intermediate
// alone; its Pool holds only it).
func (ca *CA) Intermediate(t testing.TB) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(t), Subject: pkix.Name{CommonName: "testpki intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(240 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{Cert: cert, Key: key, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), Pool: pool}
}

// RootSecret is the SDS validation-context secret istio-agent serves as
// ROOTCA for this CA.
func (ca *CA) RootSecret(name string) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: ca.CertPEM}}}}}
}

// Secret is the SDS tls_certificate secret istio-agent serves as default
// for this leaf.
func (l *Leaf) Secret(name string) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: l.ChainPEM}},
		PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: l.KeyPEM}},
	}}}
}

// SDS is istiod's reference to a secret served by the agent over sds-grpc
// (pm.ConstructSdsSecretConfig).
func SDS(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: &corev3.ConfigSource{
		ResourceApiVersion:  corev3.ApiVersion_V3,
		InitialFetchTimeout: durationpb.New(0),
		ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: &corev3.ApiConfigSource{
			ApiType: corev3.ApiConfigSource_GRPC, TransportApiVersion: corev3.ApiVersion_V3, SetNodeOnFirstMessageOnly: true,
			GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
				EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: "sds-grpc"}}}},
		}}}}
}

// IstioCommon is istiod's CommonTlsContext: TLS 1.2–1.3, certificate
// `default`, validation ROOTCA merged with sans, the given ALPN.
func IstioCommon(alpn []string, sans ...*matcherv3.StringMatcher) *tlsv3.CommonTlsContext {
	return &tlsv3.CommonTlsContext{
		TlsParams: &tlsv3.TlsParameters{
			TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2, TlsMaximumProtocolVersion: tlsv3.TlsParameters_TLSv1_3},
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{SDS("default")},
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
			DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchSubjectAltNames: sans},
			ValidationContextSdsSecretConfig: SDS("ROOTCA"),
		}},
		AlpnProtocols: alpn,
	}
}

// Exact is a StringMatcher{exact}.
func Exact(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}}
}

// Prefix is a StringMatcher{prefix}.
func Prefix(s string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: s}}
}

// UpstreamSocket is istiod's tlsMode-istio transport socket: SNI sni,
// ALPN [istio-peer-exchange istio], server SAN exactly one of sans.
func UpstreamSocket(sni string, sans ...string) *corev3.TransportSocket {
	var ms []*matcherv3.StringMatcher
	for _, s := range sans {
		ms = append(ms, Exact(s))
	}
	return Socket(&tlsv3.UpstreamTlsContext{Sni: sni, CommonTlsContext: IstioCommon([]string{"istio-peer-exchange", "istio"}, ms...)})
}

// DownstreamSocket is istiod's inbound mTLS transport socket: client
// certificate required, SAN prefix spiffe://cluster.local/, the given ALPN
// (istiod: [istio-peer-exchange h2 http/1.1] for TCP, [h2 http/1.1] for HTTP).
func DownstreamSocket(alpn ...string) *corev3.TransportSocket {
	return Socket(&tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext:         IstioCommon(alpn, Prefix("spiffe://cluster.local/")),
	})
}

// Socket wraps a TLS context as the envoy.transport_sockets.tls socket.
func Socket(ctx proto.Message) *corev3.TransportSocket {
	a, err := anypb.New(ctx)
	if err != nil {
		panic(err) // only a message that cannot marshal: a mistake in the test
	}
	return &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: a}}
}

func serial(t testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func parseIP(t testing.TB, s string) net.IP {
	ip := net.ParseIP(s)
	if ip == nil {
		t.Fatalf("testpki: bad IP %q", s)
	}
	return ip
}
