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

// Upstream is a compiled UpstreamTlsContext: the client side of a
// cluster's connections. It is immutable but for its session cache and
// is shared by every connection of the cluster.
type Upstream struct {
	// cfgs are the client configurations by application protocol
	// (appTCP...), built once so a handshake allocates no config.
	cfgs  [appCount]*tls.Config
	stats *Stats
}

const (
	appTCP = iota
	appHTTP11
	appH2
	appHTTP10
	appCount
)

// ParseUpstream compiles ts: envoy.transport_sockets.tls with an
// UpstreamTlsContext, or raw_buffer (nil, nil: plaintext). field names
// the socket in errors ("transport_socket_matches[0]
// (tlsMode-istio).transport_socket"). The certificate and validation
// secrets are read from store at each handshake; st receives the
// cluster's ssl.* counters (nil: a private block).
func ParseUpstream(field string, ts *corev3.TransportSocket, store *secrets.Store, st *Stats) (*Upstream, error) {
	if ts == nil || isRaw(ts) {
		return nil, nil
	}
	var uc tlsv3.UpstreamTlsContext
	if err := unpack(field, ts, upstreamType, &uc); err != nil {
		return nil, err
	}
	field += ".typed_config"
	switch {
	case uc.GetAutoHostSni():
		return nil, fmt.Errorf("%s.auto_host_sni: not supported", field)
	case uc.GetAutoSniSanValidation():
		return nil, fmt.Errorf("%s.auto_sni_san_validation: not supported", field)
	}
	c, err := parseCommon(field, uc.GetCommonTlsContext(), store, false)
	if err != nil {
		return nil, err
	}
	if st == nil {
		st = &Stats{}
	}
	u := &Upstream{stats: st}
	base := &tls.Config{
		ServerName: uc.GetSni(),
		// Mesh certificates carry no DNS name for the SNI; the chain and
		// SANs are checked in VerifyConnection, which also runs on
		// resumed sessions (VerifyPeerCertificate does not).
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				st.failVerifyNoCert.Add(1)
				return &reasonError{reason: "verify: the server sent no certificate"}
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
	c.params.apply(base)
	if !c.certs.empty() {
		base.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return c.certs.pick(func(cert *tls.Certificate) bool { return cri.SupportsCertificate(cert) == nil })
		}
	}
	// Envoy keeps max_session_keys sessions per context, 1 by default;
	// 0 disables resumption.
	keys := uint32(1)
	if m := uc.GetMaxSessionKeys(); m != nil {
		keys = m.GetValue()
	}
	if keys > 0 {
		base.ClientSessionCache = tls.NewLRUClientSessionCache(int(keys))
	}
	if uc.GetAllowRenegotiation() {
		base.Renegotiation = tls.RenegotiateFreelyAsClient
	}
	for app := range u.cfgs {
		cfg := base.Clone()
		cfg.NextProtos = offer(c.alpn, app)
		u.cfgs[app] = cfg
	}
	return u, nil
}

// offer is the ALPN list a connection for app offers. As Istio's istio.alpn
// filter does, an HTTP pool over a context that offers "istio" asks for
// istio-<proto>, istio, <proto>, so a real Envoy peer picks its HTTP
// chain; with no alpn_protocols an HTTP pool offers its own protocol
// (Envoy's ALPN fallback); otherwise the context's list stands.
func offer(alpn []string, app int) []string {
	proto := [appCount]string{appHTTP11: "http/1.1", appH2: "h2", appHTTP10: "http/1.0"}[app]
	switch {
	case app == appTCP:
		return alpn
	case slices.Contains(alpn, "istio"):
		return []string{"istio-" + proto, "istio", proto}
	case len(alpn) == 0:
		return []string{proto}
	}
	return alpn
}

// Secure runs the client handshake on raw (connected), bounded by ctx.
// appProto is "" for TCP, "http/1.1" or "h2" (or "http/1.0") when an HTTP
// pool dials; the ALPN offered follows it (see offer); istio-peer-exchange
// is never offered. The result is a *tls.Conn. On failure raw is closed and
// the error is a *HandshakeError.
func (u *Upstream) Secure(ctx context.Context, raw net.Conn, appProto string) (net.Conn, error) {
	var cfg *tls.Config
	switch appProto {
	case "":
		cfg = u.cfgs[appTCP]
	case "http/1.1":
		cfg = u.cfgs[appHTTP11]
	case "h2":
		cfg = u.cfgs[appH2]
	case "http/1.0":
		cfg = u.cfgs[appHTTP10]
	default:
		raw.Close()
		return nil, failed(u.stats, &reasonError{reason: fmt.Sprintf("application protocol %q unknown", appProto)})
	}
	c := tls.Client(raw, cfg)
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, failed(u.stats, err)
	}
	cs := c.ConnectionState()
	u.stats.handshakeDone(&cs)
	return c, nil
}
