package xdstest

import (
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

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	internalupstreamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/internal_upstream/v3"
	rawbufferv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
)

// SDSConfig is how istiod references the agent's secrets ("default",
// "ROOTCA"): over the bootstrap's sds-grpc cluster, never timing out.
func SDSConfig(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: &corev3.ConfigSource{
		ResourceApiVersion:  corev3.ApiVersion_V3,
		InitialFetchTimeout: durationpb.New(0),
		ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: &corev3.ApiConfigSource{
			ApiType:                   corev3.ApiConfigSource_GRPC,
			TransportApiVersion:       corev3.ApiVersion_V3,
			SetNodeOnFirstMessageOnly: true,
			GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
				EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: "sds-grpc"}}}},
		}},
	}}
}

// IstioUpstreamTLS is the UpstreamTlsContext istiod puts in an outbound
// cluster's tlsMode-istio match: TLS 1.2–1.3, the workload certificate
// "default" and the trust bundle "ROOTCA" over SDS, the server's SPIFFE
// IDs as exact match_subject_alt_names, ALPN istio-peer-exchange + istio,
// and sni.
func IstioUpstreamTLS(sni string, sans ...string) *tlsv3.UpstreamTlsContext {
	var ms []*matcherv3.StringMatcher
	for _, s := range sans {
		ms = append(ms, &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: s}})
	}
	return &tlsv3.UpstreamTlsContext{
		Sni: sni,
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsParams: &tlsv3.TlsParameters{
				TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2,
				TlsMaximumProtocolVersion: tlsv3.TlsParameters_TLSv1_3,
			},
			AlpnProtocols:                  []string{"istio-peer-exchange", "istio"},
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{SDSConfig("default")},
			ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
				CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
					DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchSubjectAltNames: ms},
					ValidationContextSdsSecretConfig: SDSConfig("ROOTCA"),
				},
			},
		},
	}
}

// TLSSocket is an envoy.transport_sockets.tls socket holding ctx.
func TLSSocket(ctx *tlsv3.UpstreamTlsContext) *corev3.TransportSocket {
	return &corev3.TransportSocket{Name: "envoy.transport_sockets.tls",
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: Pack(ctx)}}
}

// RawBufferSocket is the plaintext transport socket.
func RawBufferSocket() *corev3.TransportSocket {
	return &corev3.TransportSocket{Name: "envoy.transport_sockets.raw_buffer",
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: Pack(&rawbufferv3.RawBuffer{})}}
}

// IstioSocketMatches are istiod's two transport_socket_matches of an
// auto-mTLS cluster: tlsMode-istio (ctx) for endpoints labelled
// IstioTLS, tlsMode-disabled (raw_buffer, match {}) for the rest.
func IstioSocketMatches(ctx *tlsv3.UpstreamTlsContext) []*clusterv3.Cluster_TransportSocketMatch {
	return []*clusterv3.Cluster_TransportSocketMatch{
		{Name: "tlsMode-istio", Match: mustStruct(map[string]any{"tlsMode": "istio"}), TransportSocket: TLSSocket(ctx)},
		{Name: "tlsMode-disabled", Match: &structpb.Struct{}, TransportSocket: RawBufferSocket()},
	}
}

// HBONEMatch is the match istiod prepends when it sends HBONE (ambient):
// endpoints labelled tunnel=http go through Envoy's internal upstream
// socket to a waypoint/ztunnel tunnel, which meshtun cannot serve.
func HBONEMatch() *clusterv3.Cluster_TransportSocketMatch {
	return &clusterv3.Cluster_TransportSocketMatch{
		Name:  "hbone",
		Match: mustStruct(map[string]any{"tunnel": "http"}),
		TransportSocket: &corev3.TransportSocket{Name: "envoy.transport_sockets.internal_upstream",
			ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: Pack(&internalupstreamv3.InternalUpstreamTransport{
				TransportSocket: RawBufferSocket(),
			})}},
	}
}

// WithTransportSocket sets the cluster's transport_socket.
func WithTransportSocket(ts *corev3.TransportSocket) ClusterOption {
	return func(pb *clusterv3.Cluster) { pb.TransportSocket = ts }
}

// WithSocketMatches sets the cluster's transport_socket_matches.
func WithSocketMatches(ms ...*clusterv3.Cluster_TransportSocketMatch) ClusterOption {
	return func(pb *clusterv3.Cluster) { pb.TransportSocketMatches = ms }
}

func mustStruct(m map[string]any) *structpb.Struct {
	s, err := structpb.NewStruct(m)
	if err != nil {
		panic(err)
	}
	return s
}

// PKI is a test certificate authority: an ECDSA P-256 root that issues
// workload certificates shaped like istiod's (a URI SAN, client and
// server auth).
type PKI struct {
	Root    *x509.Certificate
	RootPEM []byte
	key     *ecdsa.PrivateKey
	serial  atomic.Int64
}

// NewPKI makes a root valid for a day.
func NewPKI(t testing.TB) *PKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"meshtun test"}, CommonName: "root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	root, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	p := &PKI{Root: root, RootPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), key: key}
	p.serial.Store(1)
	return p
}

// Pool is a pool holding the root.
func (p *PKI) Pool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.Root)
	return pool
}

// Leaf issues a certificate with URI SAN uri ("" for none) and the DNS
// names dns, valid for a day. ChainPEM and KeyPEM are its PEM forms, as
// an SDS tls_certificate carries them.
func (p *PKI) Leaf(t testing.TB, uri string, dns ...string) (cert tls.Certificate, chainPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(p.serial.Add(1)),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     dns,
	}
	if uri != "" {
		u, err := url.Parse(uri)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.Root, &key.PublicKey, p.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	chainPEM = append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), p.RootPEM...)
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	cert, err = tls.X509KeyPair(chainPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return cert, chainPEM, keyPEM
}
