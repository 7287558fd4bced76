package tlsctx

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"slices"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/meshtun/meshtun/mesh/secrets"
)

// Downstream is a compiled DownstreamTlsContext: the server side of a
// filter chain's connections, shared by all of them.
type Downstream struct {
	base *tls.Config
	// byALPN[i] selects alpn[i]; noALPN selects nothing. Built once, so
	// GetConfigForClient only picks a pointer.
	alpn   []string
	byALPN []*tls.Config
	noALPN *tls.Config
	certs  certSource
	stats  *Stats
}

// ParseDownstream compiles ts: envoy.transport_sockets.tls with a
// DownstreamTlsContext, or raw_buffer (nil, nil). Errors name the field
// under field. Secrets are read from store at each handshake; st receives
// the listener's ssl.* counters (nil: a private block).
func ParseDownstream(field string, ts *corev3.TransportSocket, store *secrets.Store, st *Stats) (*Downstream, error) {
	if ts == nil || isRaw(ts) {
		return nil, nil
	}
	var dc tlsv3.DownstreamTlsContext
	if err := unpack(field, ts, downType, &dc); err != nil {
		return nil, err
	}
	field += ".typed_config"
	switch t := dc.GetSessionTicketKeysType().(type) {
	case nil:
	case *tlsv3.DownstreamTlsContext_DisableStatelessSessionResumption:
	default:
		return nil, fmt.Errorf("%s: %T: configured session ticket keys are not supported (meshtun rotates its own)", field, t)
	}
	switch {
	case dc.GetSessionTimeout() != nil:
		return nil, fmt.Errorf("%s.session_timeout: not supported", field)
	case dc.GetOcspStaplePolicy() != tlsv3.DownstreamTlsContext_LENIENT_STAPLING:
		return nil, fmt.Errorf("%s.ocsp_staple_policy: %v not supported (no OCSP stapling)", field, dc.GetOcspStaplePolicy())
	}
	c, err := parseCommon(field, dc.GetCommonTlsContext(), store, true)
	if err != nil {
		return nil, err
	}
	if c.certs.empty() {
		return nil, fmt.Errorf("%s.common_tls_context: a server needs tls_certificates or tls_certificate_sds_secret_configs", field)
	}
	if st == nil {
		st = &Stats{}
	}
	require := dc.GetRequireClientCertificate().GetValue()
	requireSNI := dc.GetRequireSni().GetValue()
	d := &Downstream{alpn: c.alpn, certs: c.certs, stats: st}
	base := &tls.Config{
		SessionTicketsDisabled: dc.GetDisableStatelessSessionResumption(),
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return d.certs.pick(func(cert *tls.Certificate) bool { return hello.SupportsCertificate(cert) == nil })
		},
		// The client's certificate is requested whenever it could be
		// checked and its absence judged here, where it is counted.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				if require {
					st.failVerifyNoCert.Add(1)
					return &reasonError{reason: "verify: the client sent no certificate (require_client_certificate)"}
				}
				return nil
			}
			if c.val == nil {
				return nil
			}
			v, err := c.val.current()
			if err != nil {
				return err
			}
			return v.verify(st, cs.PeerCertificates)
		},
	}
	if require || c.val != nil {
		base.ClientAuth = tls.RequestClientCert
	}
	c.params.apply(base)
	// Envoy (BoringSSL) picks ALPN in the server's order and, with no
	// overlap, goes on without ALPN; Go would abort, so each possible
	// choice gets its own config and the hello picks one.
	for _, p := range d.alpn {
		cfg := base.Clone()
		cfg.NextProtos = []string{p}
		d.byALPN = append(d.byALPN, cfg)
	}
	d.noALPN = base.Clone()
	base.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		if requireSNI && hello.ServerName == "" {
			return nil, &reasonError{reason: "the client sent no SNI (require_sni)"}
		}
		for i, p := range d.alpn {
			if slices.Contains(hello.SupportedProtos, p) {
				return d.byALPN[i], nil
			}
		}
		return d.noALPN, nil
	}
	d.base = base
	return d, nil
}

// Handshake runs the server handshake on raw, whose first bytes may have
// been peeked (pass the conn that replays them), bounded by ctx. ALPN is
// the server's preference among alpn_protocols (never istio-peer-exchange)
// and none when nothing overlaps, which is not a failure. On failure raw
// is closed and the error is a *HandshakeError.
func (d *Downstream) Handshake(ctx context.Context, raw net.Conn) (*tls.Conn, error) {
	c := tls.Server(raw, d.base)
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, failed(d.stats, err)
	}
	cs := c.ConnectionState()
	d.stats.handshakeDone(&cs)
	if len(cs.PeerCertificates) == 0 {
		d.stats.noCertificate.Add(1)
	} else if local, err := d.certs.pick(func(*tls.Certificate) bool { return false }); err == nil && local != nil {
		rememberLocal(cs.PeerCertificates, local)
	}
	return c, nil
}
