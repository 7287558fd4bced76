package secrets

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"io/fs"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshtun/meshtun/agent/sds"
	"github.com/meshtun/meshtun/internal/leakcheck"
	"github.com/meshtun/meshtun/internal/xdstest"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

const spiffeID = "spiffe://cluster.local/ns/default/sa/app"

// identity is a leaf for spiffeID and its self-signed root, as istiod issues.
func identity(t *testing.T) (sds.Identity, *x509.Certificate) {
	t.Helper()
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{Organization: []string{"cluster.local"}},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(240 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(rootDER)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(spiffeID)
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	leafTmpl := &x509.Certificate{SerialNumber: serial, URIs: []*url.URL{u},
		NotBefore: now.Add(-2 * time.Minute), NotAfter: now.Add(36 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, root, leafKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(leafDER)
	keyDER, _ := x509.MarshalPKCS8PrivateKey(leafKey)
	rootPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rootDER})
	return sds.Identity{
		ChainPEM: append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}), rootPEM...),
		KeyPEM:   pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		RootsPEM: rootPEM,
	}, leaf
}

func sdsConfig(name, cluster string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{
		ApiConfigSource: &corev3.ApiConfigSource{ApiType: corev3.ApiConfigSource_GRPC, GrpcServices: []*corev3.GrpcService{{
			TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: cluster}}}}}}}}
}

func tlsSocket(t *testing.T, m proto.Message) *corev3.TransportSocket {
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: a}}
}

// TestFindIstioClusters: istiod's own clusters (the fixture, as received)
// reference default and ROOTCA over sds-grpc in transport_socket_matches.
func TestFindIstioClusters(t *testing.T) {
	const file = "../../../shared/istio/permissive-allow-any/clusters.pb"
	b, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s missing: CI must check out shared/ beside the repository", file)
		}
		t.Skipf("%s not present", file)
	}
	var dr discoveryv3.DiscoveryResponse
	if err := proto.Unmarshal(b, &dr); err != nil {
		t.Fatal(err)
	}
	var clusters []*clusterv3.Cluster
	for _, a := range dr.GetResources() {
		c := &clusterv3.Cluster{}
		if err := proto.Unmarshal(a.GetValue(), c); err != nil {
			t.Fatal(err)
		}
		clusters = append(clusters, c)
	}
	refs, err := Find(clusters, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := Source{Cluster: "sds-grpc"}
	if len(refs.Names) != 2 || refs.Names["default"] != want || refs.Names["ROOTCA"] != want {
		t.Errorf("names = %v, want default and ROOTCA over sds-grpc", refs.Names)
	}
	if len(refs.Pairs) != 1 || refs.Pairs[0] != (Pair{"default", "ROOTCA"}) {
		t.Errorf("pairs = %v, want [{default ROOTCA}]", refs.Pairs)
	}
}

// TestFindListenersAndErrors: a DownstreamTlsContext's references count;
// a reference meshtun cannot follow is an error naming resource and field.
func TestFindListenersAndErrors(t *testing.T) {
	dtc := &tlsv3.DownstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsConfig("default", "sds-grpc")},
		ValidationContextType:          &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{ValidationContextSdsSecretConfig: sdsConfig("ROOTCA", "sds-grpc")},
	}}
	l := &listenerv3.Listener{Name: "virtualInbound", FilterChains: []*listenerv3.FilterChain{{Name: "mtls", TransportSocket: tlsSocket(t, dtc)}}}
	refs, err := Find(nil, []*listenerv3.Listener{l})
	if err != nil || len(refs.Names) != 2 || len(refs.Pairs) != 1 || refs.Pairs[0] != (Pair{"default", "ROOTCA"}) {
		t.Fatalf("Find = %+v, %v", refs, err)
	}

	noSource := &tlsv3.UpstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{{Name: "default"}}}}
	rest := proto.Clone(noSource).(*tlsv3.UpstreamTlsContext)
	rest.CommonTlsContext.TlsCertificateSdsSecretConfigs[0] = sdsConfig("default", "sds-grpc")
	rest.CommonTlsContext.TlsCertificateSdsSecretConfigs[0].SdsConfig.GetApiConfigSource().ApiType = corev3.ApiConfigSource_REST
	other := &tlsv3.UpstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsConfig("default", "elsewhere")}}}
	ok := &tlsv3.UpstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsConfig("default", "sds-grpc")}}}
	for _, tc := range []struct {
		clusters []*clusterv3.Cluster
		want     string
	}{
		{[]*clusterv3.Cluster{{Name: "a", TransportSocket: tlsSocket(t, noSource)}},
			`cluster "a": transport_socket.common_tls_context.tls_certificate_sds_secret_configs[0] (default).sds_config: missing`},
		{[]*clusterv3.Cluster{{Name: "b", TransportSocketMatches: []*clusterv3.Cluster_TransportSocketMatch{{Name: "m", TransportSocket: tlsSocket(t, rest)}}}},
			`cluster "b": transport_socket_matches[0] (m).transport_socket.common_tls_context.tls_certificate_sds_secret_configs[0] (default).sds_config.api_config_source.api_type: REST not supported`},
		{[]*clusterv3.Cluster{{Name: "c", TransportSocket: tlsSocket(t, ok)}, {Name: "d", TransportSocket: tlsSocket(t, other)}},
			`cluster "d": transport_socket.common_tls_context.tls_certificate_sds_secret_configs[0] (default).sds_config: the secret has another source`},
	} {
		if _, err := Find(tc.clusters, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Find = %v, want %q", err, tc.want)
		}
	}
}

func secretsOf(t *testing.T, id sds.Identity) (cert, root *tlsv3.Secret) {
	cert = &tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: id.ChainPEM}},
		PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: id.KeyPEM}}}}}
	root = &tlsv3.Secret{Name: "ROOTCA", Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: id.RootsPEM}}}}}
	return cert, root
}

func istioRefs() *Refs {
	return &Refs{Names: map[string]Source{"default": {Cluster: "sds-grpc"}, "ROOTCA": {Cluster: "sds-grpc"}},
		Pairs: []Pair{{"default", "ROOTCA"}}}
}

// TestStoreAndAdmin: the store keeps referenced secrets only, rejects an
// invalid one naming it (the previous stays), lists the missing ones as
// warming; /certs and the secrets dump are Envoy's shapes, the key
// redacted in the dump and intact in the store.
func TestStoreAndAdmin(t *testing.T) {
	id, leaf := identity(t)
	cert, root := secretsOf(t, id)
	s := NewStore()
	s.SetRefs(istioRefs())
	if w := s.Warming(); strings.Join(w, ",") != "ROOTCA,default" {
		t.Errorf("warming = %v", w)
	}
	at := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	if err := s.Put("v1", cert, at); err != nil {
		t.Fatal(err)
	}
	if err := s.Put("v1", &tlsv3.Secret{Name: "unused", Type: root.Type}, at); err != nil || s.Get("unused") != nil {
		t.Errorf("an unreferenced secret: %v, stored %v", err, s.Get("unused") != nil)
	}
	bad := proto.Clone(root).(*tlsv3.Secret)
	bad.GetValidationContext().TrustedCa = &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: "/etc/ca.pem"}}
	if err := s.Put("v2", bad, at); err == nil || !strings.Contains(err.Error(), `secret "ROOTCA": validation_context.trusted_ca: only inline`) {
		t.Errorf("file data source: %v", err)
	}
	if err := s.Put("v1", root, at); err != nil {
		t.Fatal(err)
	}
	if w := s.Warming(); len(w) != 0 {
		t.Errorf("warming = %v after both arrived", w)
	}

	now := leaf.NotBefore.Add(2 * time.Minute)
	cs := s.Certificates(now).GetCertificates()
	if len(cs) != 1 || len(cs[0].GetCertChain()) != 1 || len(cs[0].GetCaCert()) != 1 {
		t.Fatalf("/certs = %v", cs)
	}
	d := cs[0].GetCertChain()[0]
	if d.GetPath() != "<inline>" || d.GetSerialNumber() != hex.EncodeToString(leaf.SerialNumber.Bytes()) ||
		len(d.GetSubjectAltNames()) != 1 || d.GetSubjectAltNames()[0].GetUri() != spiffeID ||
		d.GetDaysUntilExpiration() != 1 || !d.GetValidFrom().AsTime().Equal(leaf.NotBefore) || !d.GetExpirationTime().AsTime().Equal(leaf.NotAfter) {
		t.Errorf("cert_chain[0] = %v", d)
	}
	if ca := cs[0].GetCaCert()[0]; ca.GetSerialNumber() != "07" || ca.GetPath() != "<inline>" {
		t.Errorf("ca_cert[0] = %v", ca)
	}

	dump := s.ConfigDump(func(string) bool { return true })
	if len(dump.GetDynamicActiveSecrets()) != 2 || len(dump.GetDynamicWarmingSecrets()) != 0 {
		t.Fatalf("dump = %v", dump)
	}
	ds := dump.GetDynamicActiveSecrets()[1] // sorted: ROOTCA, default
	sec := &tlsv3.Secret{}
	if err := ds.GetSecret().UnmarshalTo(sec); err != nil {
		t.Fatal(err)
	}
	if ds.GetName() != "default" || ds.GetVersionInfo() != "v1" || !ds.GetLastUpdated().AsTime().Equal(at) ||
		string(sec.GetTlsCertificate().GetPrivateKey().GetInlineBytes()) != "[redacted]" ||
		string(sec.GetTlsCertificate().GetCertificateChain().GetInlineBytes()) != string(id.ChainPEM) {
		t.Errorf("dumped default = %v %v", ds, sec)
	}
	if string(s.Get("default").Msg.GetTlsCertificate().GetPrivateKey().GetInlineBytes()) != string(id.KeyPEM) {
		t.Error("the dump redacted the key in the store")
	}

	// A configuration without ROOTCA drops it; a new reference is warming.
	s.SetRefs(&Refs{Names: map[string]Source{"default": {Cluster: "sds-grpc"}, "kubernetes://gw": {ADS: true}}})
	if s.Get("ROOTCA") != nil || s.Get("default") == nil {
		t.Error("SetRefs kept an unreferenced secret or dropped a referenced one")
	}
	if w := s.ConfigDump(func(n string) bool { return true }).GetDynamicWarmingSecrets(); len(w) != 1 || w[0].GetName() != "kubernetes://gw" {
		t.Errorf("warming dump = %v", w)
	}
}

// TestClientWithAgentSDS: the client subscribes to default and ROOTCA on
// meshtun's agent SDS server over its Unix socket, stores both, and
// follows a rotation pushed on the same stream.
func TestClientWithAgentSDS(t *testing.T) {
	path := filepath.Join(t.TempDir(), "socket")
	srv, err := sds.New(sds.Options{SocketPath: path, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	id, leaf := identity(t)
	if err := srv.Update(id); err != nil {
		t.Fatal(err)
	}
	store := NewStore()
	c := NewClient(ClientOptions{Store: store, Node: &corev3.Node{Id: "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local"},
		Target: func(cluster string) (string, error) {
			if cluster != "sds-grpc" {
				return "", errors.New("unexpected cluster " + cluster)
			}
			return "unix:" + path, nil
		}, Log: zerolog.Nop(), Retry: 50 * time.Millisecond})
	defer c.Close()
	c.Watch(istioRefs())
	xdstest.Eventually(t, 5*time.Second, "default and ROOTCA stored", func() bool {
		d := store.Get("default")
		return d != nil && store.Get("ROOTCA") != nil && d.Certs[0].SerialNumber.Cmp(leaf.SerialNumber) == 0
	})
	id2, leaf2 := identity(t)
	if err := srv.Update(id2); err != nil {
		t.Fatal(err)
	}
	xdstest.Eventually(t, 5*time.Second, "the rotated default stored", func() bool {
		d := store.Get("default")
		return d != nil && d.Certs[0].SerialNumber.Cmp(leaf2.SerialNumber) == 0
	})
}
