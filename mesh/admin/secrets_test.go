package admin

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/secrets"
)

// TestCertsAndSecretsDump: /certs is Envoy's Certificates JSON of the
// referenced secrets; /config_dump ends with the SecretsConfigDump (as
// Envoy orders it), the key redacted, a missing secret warming, and
// ?resource=dynamic_active_secrets selects the secrets alone.
func TestCertsAndSecretsDump(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://cluster.local/ns/default/sa/app")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(0x1234), URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(50 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	st := secrets.NewStore()
	st.SetRefs(&secrets.Refs{Names: map[string]secrets.Source{"default": {Cluster: "sds-grpc"}, "ROOTCA": {Cluster: "sds-grpc"}},
		Pairs: []secrets.Pair{{Cert: "default", Validation: "ROOTCA"}}})
	if err := st.Put("2026-12-07T10:00:00Z/1", &tlsv3.Secret{Name: "default", Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}},
		PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})}},
	}}}, time.Now()); err != nil {
		t.Fatal(err)
	}
	d := &mesh.Dispatcher{}
	d.Swap(build(t, nil))
	ts := httptest.NewServer((&Server{D: d, Start: time.Now(), Secrets: st}).Handler())
	t.Cleanup(ts.Close)

	var certs adminv3.Certificates
	if err := protojson.Unmarshal([]byte(bodyOfTS(t, ts, "/certs")), &certs); err != nil {
		t.Fatal(err)
	}
	if cs := certs.GetCertificates(); len(cs) != 1 || len(cs[0].GetCertChain()) != 1 || len(cs[0].GetCaCert()) != 0 ||
		cs[0].GetCertChain()[0].GetSerialNumber() != "1234" || cs[0].GetCertChain()[0].GetDaysUntilExpiration() != 2 ||
		cs[0].GetCertChain()[0].GetSubjectAltNames()[0].GetUri() != u.String() {
		t.Errorf("/certs = %v", cs)
	}

	var cd adminv3.ConfigDump
	if err := protojson.Unmarshal([]byte(bodyOfTS(t, ts, "/config_dump")), &cd); err != nil {
		t.Fatal(err)
	}
	last := cd.GetConfigs()[len(cd.GetConfigs())-1]
	var sd adminv3.SecretsConfigDump
	if err := last.UnmarshalTo(&sd); err != nil {
		t.Fatalf("last section %s: %v", last.GetTypeUrl(), err)
	}
	if len(sd.GetDynamicActiveSecrets()) != 1 || len(sd.GetDynamicWarmingSecrets()) != 1 || sd.GetDynamicWarmingSecrets()[0].GetName() != "ROOTCA" {
		t.Fatalf("secrets dump = %v", &sd)
	}
	var sec tlsv3.Secret
	if err := sd.GetDynamicActiveSecrets()[0].GetSecret().UnmarshalTo(&sec); err != nil {
		t.Fatal(err)
	}
	if k := string(sec.GetTlsCertificate().GetPrivateKey().GetInlineBytes()); k != "[redacted]" {
		t.Errorf("dumped key = %q, want [redacted]", k)
	}
	var only adminv3.ConfigDump
	if err := protojson.Unmarshal([]byte(bodyOfTS(t, ts, "/config_dump?resource=dynamic_active_secrets")), &only); err != nil {
		t.Fatal(err)
	}
	if len(only.GetConfigs()) != 1 || only.GetConfigs()[0].GetTypeUrl() != "type.googleapis.com/envoy.admin.v3.SecretsConfigDump.DynamicSecret" {
		t.Errorf("resource=dynamic_active_secrets = %v", only.GetConfigs())
	}
}
