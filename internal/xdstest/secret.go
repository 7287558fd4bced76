package xdstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/types/known/durationpb"
)

// This file builds SDS shapes for the tests of secret warming: the
// sds_config references istiod writes (over the sds-grpc cluster, or
// `ads: {}` for kubernetes:// credentials), a TLS socket naming them, and
// the secrets themselves. xdstest's Server serves secrets like any other
// type: Set them under SecretType (resource.SecretType).

// SecretOverCluster references secret name over SDS on the gRPC cluster
// (istiod: "sds-grpc") with the given initial_fetch_timeout (istiod: 0,
// wait forever; a negative one leaves it unset, Envoy's 15 s).
func SecretOverCluster(name, cluster string, timeout time.Duration) *tlsv3.SdsSecretConfig {
	cs := &corev3.ConfigSource{ResourceApiVersion: corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: &corev3.ApiConfigSource{
			ApiType: corev3.ApiConfigSource_GRPC, TransportApiVersion: corev3.ApiVersion_V3,
			GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
				EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: cluster}}}}}}}
	if timeout >= 0 {
		cs.InitialFetchTimeout = durationpb.New(timeout)
	}
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: cs}
}

// SecretOverADS references secret name delivered on the ADS stream, as
// istiod names a gateway's credentialName ("kubernetes://name").
func SecretOverADS(name string, timeout time.Duration) *tlsv3.SdsSecretConfig {
	cs := &corev3.ConfigSource{ResourceApiVersion: corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}
	if timeout >= 0 {
		cs.InitialFetchTimeout = durationpb.New(timeout)
	}
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: cs}
}

// UpstreamTLSNaming is an envoy.transport_sockets.tls socket whose
// UpstreamTlsContext takes its certificate (cert, may be nil) and its
// validation context (ca, may be nil) from SDS.
func UpstreamTLSNaming(t testing.TB, cert, ca *tlsv3.SdsSecretConfig) *corev3.TransportSocket {
	common := &tlsv3.CommonTlsContext{}
	if cert != nil {
		common.TlsCertificateSdsSecretConfigs = []*tlsv3.SdsSecretConfig{cert}
	}
	if ca != nil {
		common.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{ValidationContextSdsSecretConfig: ca}
	}
	return &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{
		TypedConfig: MustAny(t, &tlsv3.UpstreamTlsContext{CommonTlsContext: common})}}
}

// DownstreamTLSNaming is the DownstreamTlsContext counterpart of
// UpstreamTLSNaming, for a listener's filter chain.
func DownstreamTLSNaming(t testing.TB, cert, ca *tlsv3.SdsSecretConfig) *corev3.TransportSocket {
	common := &tlsv3.CommonTlsContext{}
	if cert != nil {
		common.TlsCertificateSdsSecretConfigs = []*tlsv3.SdsSecretConfig{cert}
	}
	if ca != nil {
		common.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{ValidationContextSdsSecretConfig: ca}
	}
	return &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{
		TypedConfig: MustAny(t, &tlsv3.DownstreamTlsContext{CommonTlsContext: common})}}
}

// SelfSigned is a fresh ECDSA P-256 certificate for spiffeID (and the DNS
// names, for a TLS server) that signs itself, and its key, in PEM: enough
// for a secret the store parses, or a server its own root verifies.
func SelfSigned(t testing.TB, spiffeID string, dns ...string) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(spiffeID)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{Organization: []string{"xdstest"}}, URIs: []*url.URL{u}, DNSNames: dns,
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
}

// CertSecret is a tls_certificate secret with the given PEM chain and key.
func CertSecret(name string, chainPEM, keyPEM []byte) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: chainPEM}},
		PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: keyPEM}}}}}
}

// CASecret is a validation_context secret trusting the PEM certificates.
func CASecret(name string, caPEM []byte) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: caPEM}}}}}
}
