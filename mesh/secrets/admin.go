package secrets

import (
	"crypto/x509"
	"encoding/hex"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// redacted is what Envoy's config dump shows instead of private key bytes
// (MessageUtil::redact on fields marked sensitive).
var redacted = []byte("[redacted]")

// Certificates is /certs (envoy.admin.v3.Certificates): one entry per
// distinct (certificate, validation context) pair the configuration
// references, as Envoy lists its TLS contexts, with the secrets in force:
// ca_cert lists the trusted CAs, cert_chain the leaf (Envoy shows the leaf
// only), each with path "<inline>" (SDS data is inline).
func (s *Store) Certificates(now time.Time) *adminv3.Certificates {
	st := s.cur.Load()
	out := &adminv3.Certificates{}
	for _, p := range st.refs.Pairs {
		c := &adminv3.Certificate{}
		if sec := st.active[p.Validation]; sec != nil && sec.Msg.GetValidationContext() != nil {
			for _, x := range sec.Certs {
				c.CaCert = append(c.CaCert, details(x, now))
			}
		}
		if sec := st.active[p.Cert]; sec != nil && sec.Msg.GetTlsCertificate() != nil {
			c.CertChain = append(c.CertChain, details(sec.Certs[0], now))
		}
		if len(c.CaCert) > 0 || len(c.CertChain) > 0 {
			out.Certificates = append(out.Certificates, c)
		}
	}
	return out
}

// details is Envoy's CertificateDetails: serial as lowercase hex of its
// bytes, SANs (URI and DNS), whole days left (0 once expired).
func details(x *x509.Certificate, now time.Time) *adminv3.CertificateDetails {
	d := &adminv3.CertificateDetails{
		Path:           "<inline>",
		SerialNumber:   hex.EncodeToString(x.SerialNumber.Bytes()),
		ValidFrom:      timestamppb.New(x.NotBefore),
		ExpirationTime: timestamppb.New(x.NotAfter),
	}
	if left := x.NotAfter.Sub(now); left > 0 {
		d.DaysUntilExpiration = uint64(left / (24 * time.Hour))
	}
	for _, u := range x.URIs {
		d.SubjectAltNames = append(d.SubjectAltNames, &adminv3.SubjectAlternateName{Name: &adminv3.SubjectAlternateName_Uri{Uri: u.String()}})
	}
	for _, n := range x.DNSNames {
		d.SubjectAltNames = append(d.SubjectAltNames, &adminv3.SubjectAlternateName{Name: &adminv3.SubjectAlternateName_Dns{Dns: n}})
	}
	return d
}

// ConfigDump is the SecretsConfigDump of /config_dump: the secrets in force
// with their version and time, private keys redacted as Envoy does, and the
// referenced secrets not received yet as warming (name only).
func (s *Store) ConfigDump(keep func(name string) bool) *adminv3.SecretsConfigDump {
	d := &adminv3.SecretsConfigDump{}
	for _, sec := range s.Active() {
		if !keep(sec.Name) {
			continue
		}
		m := proto.Clone(sec.Msg).(*tlsv3.Secret)
		if tc := m.GetTlsCertificate(); tc != nil && tc.GetPrivateKey() != nil {
			tc.PrivateKey = &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: redacted}}
		}
		a, err := anypb.New(m)
		if err != nil {
			continue // a Secret always marshals
		}
		d.DynamicActiveSecrets = append(d.DynamicActiveSecrets, &adminv3.SecretsConfigDump_DynamicSecret{
			Name: sec.Name, VersionInfo: sec.Version, LastUpdated: timestamppb.New(sec.LastUpdated), Secret: a})
	}
	for _, n := range s.Warming() {
		if keep(n) {
			d.DynamicWarmingSecrets = append(d.DynamicWarmingSecrets, &adminv3.SecretsConfigDump_DynamicSecret{Name: n})
		}
	}
	return d
}
