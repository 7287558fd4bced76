package mesh

import (
	"context"
	"errors"
	"net"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/mesh/tlsctx"
)

const upstreamTLSType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"

// hasUpstreamTLS reports whether pb has a TLS transport socket (its own
// or a match's): such a cluster gets a cluster.<name>.ssl.* block, as in
// Envoy, where the TLS socket factory creates the ssl scope.
func hasUpstreamTLS(pb *clusterv3.Cluster) bool {
	isTLS := func(ts *corev3.TransportSocket) bool {
		return ts.GetTypedConfig().GetTypeUrl() == upstreamTLSType
	}
	if isTLS(pb.GetTransportSocket()) {
		return true
	}
	for _, m := range pb.GetTransportSocketMatches() {
		if isTLS(m.GetTransportSocket()) {
			return true
		}
	}
	return false
}

// upstreamParser compiles a cluster's transport sockets with tlsctx: the
// secrets are looked up in store at each handshake (an SDS rotation
// reaches new connections, open ones keep theirs), and every TLS socket
// of the cluster counts into st, its ssl.* block.
func upstreamParser(store *secrets.Store, st *tlsctx.Stats) cluster.TransportParser {
	return func(field string, ts *corev3.TransportSocket) (cluster.Transport, error) {
		u, err := tlsctx.ParseUpstream(field, ts, store, st)
		if err != nil || u == nil {
			return nil, err // a nil *Upstream is raw_buffer: a nil Transport
		}
		return upstreamTLS{u}, nil
	}
}

// upstreamTLS is a tlsctx.Upstream whose failed handshakes say only
// their reason: the cluster reports the error's text as
// upstream_transport_failure_reason, which is HandshakeError.Reason.
type upstreamTLS struct{ u *tlsctx.Upstream }

func (t upstreamTLS) Secure(ctx context.Context, raw net.Conn, appProto string) (net.Conn, error) {
	c, err := t.u.Secure(ctx, raw, appProto)
	if err != nil {
		var he *tlsctx.HandshakeError
		if errors.As(err, &he) {
			return nil, &transportFailure{he}
		}
	}
	return c, err
}

// transportFailure is a HandshakeError whose text is its Reason.
type transportFailure struct{ he *tlsctx.HandshakeError }

func (f *transportFailure) Error() string { return f.he.Reason }
func (f *transportFailure) Unwrap() error { return f.he }
