package controlplane

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/controlplane/ca"
)

// CADirName is the state directory's sub-folder holding the CA's root and
// key (Istio's cacerts file names) and the token signing key, kept across
// restarts so issued certificates and tokens stay valid.
const CADirName = "ca"

// secureConfig is what Run needs for the TLS port (istiod's 15012): the
// CA service, and its serving certificate.
type secureConfig struct {
	ca    *ca.Server
	opts  []grpc.ServerOption
	roots string // the root file agents must trust
}

// newSecure loads (or creates) the CA and issues the serving certificate
// for istiod's names, o.ServingNames and the secure address's own IP.
func newSecure(o Options) (*secureConfig, error) {
	dir := filepath.Join(o.StateDir, CADirName)
	var auth *ca.Authority
	var err error
	if o.CACertsDir != "" {
		auth, err = ca.LoadFiles(o.CACertsDir)
	} else {
		auth, err = ca.LoadOrCreate(dir, o.TrustDomain)
	}
	if err != nil {
		return nil, err
	}
	tokens, err := ca.LoadTokens(dir)
	if err != nil {
		return nil, err
	}
	dns := append([]string(nil), ca.DNSNames...)
	var ips []net.IP
	for _, n := range o.ServingNames {
		if ip := net.ParseIP(n); ip != nil {
			ips = append(ips, ip)
		} else if n != "" {
			dns = append(dns, n)
		}
	}
	if host, _, err := net.SplitHostPort(o.SecureAddress); err == nil {
		if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
			ips = append(ips, ip)
		}
	}
	cert, err := auth.ServingCertificate(dns, ips)
	if err != nil {
		return nil, fmt.Errorf("serving certificate: %w", err)
	}
	srv := &ca.Server{CA: auth, Tokens: tokens, TrustDomain: o.TrustDomain, Log: o.Log}
	roots := filepath.Join(dir, ca.RootCertFile)
	if o.CACertsDir != "" {
		roots = filepath.Join(o.CACertsDir, ca.RootCertFile)
	}
	return &secureConfig{ca: srv, roots: roots, opts: []grpc.ServerOption{
		grpc.Creds(ca.ServerCredentials(cert, auth)),
		grpc.StreamInterceptor(adsAuth(srv)),
	}}, nil
}

// adsAuth guards ADS on the TLS port as istiod does (XDS_AUTH and
// PILOT_ENABLE_XDS_IDENTITY_CHECK, https://github.com/istio/istio/blob/master/pilot/pkg/xds/auth.go):
// the stream needs a valid bearer token, and the node it then names must
// be in the token's namespace (node id and metadata NAMESPACE) and, if the
// metadata says, run as its service account; otherwise PermissionDenied.
func adsAuth(srv *ca.Server) grpc.StreamServerInterceptor {
	return func(s any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		id, err := srv.Authenticate(ss.Context())
		if err != nil {
			return err
		}
		// The node comes in the first request: read it here, where a
		// refusal still ends the stream with its status (the ADS server
		// would take a receive error for the client going away), and hand
		// it on to the server unchanged.
		var first interface {
			proto.Message
			GetNode() *corev3.Node
		}
		switch {
		case strings.HasSuffix(info.FullMethod, "/StreamAggregatedResources"):
			first = &discoveryv3.DiscoveryRequest{}
		case strings.HasSuffix(info.FullMethod, "/DeltaAggregatedResources"):
			first = &discoveryv3.DeltaDiscoveryRequest{}
		default:
			return status.Errorf(codes.Unimplemented, "%s is not served on the secure port", info.FullMethod)
		}
		if err := ss.RecvMsg(first); err != nil {
			return err
		}
		if n := first.GetNode(); n != nil {
			if err := checkNodeIdentity(n, id); err != nil {
				srv.Log.Warn().Err(err).Msg("ADS stream refused")
				return err
			}
		}
		return handler(s, &replayStream{ServerStream: ss, first: first, ctx: context.WithValue(ss.Context(), identityKey{}, id)})
	}
}

// identityKey carries the authenticated caller (ca.Identity) of an ADS
// stream on the TLS port in the stream's context, where the server's
// stream-open callback finds it: such a node has a workload identity.
type identityKey struct{}

// streamIdentity is the identity the TLS port authenticated the stream
// of ctx with, if it came that way.
func streamIdentity(ctx context.Context) (ca.Identity, bool) {
	id, ok := ctx.Value(identityKey{}).(ca.Identity)
	return id, ok
}

// replayStream gives the server the first request the interceptor read,
// and the caller's identity in its context.
type replayStream struct {
	grpc.ServerStream
	first proto.Message
	ctx   context.Context
}

func (r *replayStream) Context() context.Context { return r.ctx }

func (r *replayStream) RecvMsg(m any) error {
	if r.first != nil {
		pm, ok := m.(proto.Message)
		if !ok {
			return status.Errorf(codes.Internal, "unexpected message type %T", m)
		}
		proto.Merge(pm, r.first)
		r.first = nil
		return nil
	}
	return r.ServerStream.RecvMsg(m)
}

func checkNodeIdentity(n *corev3.Node, id ca.Identity) error {
	deny := func(format string, a ...any) error {
		return status.Errorf(codes.PermissionDenied, "authorization failed: node %q: "+format, append([]any{n.GetId()}, a...)...)
	}
	if node, err := parseNode(n); err == nil && node.Namespace != id.Namespace {
		return deny("namespace %q is not the token's %q", node.Namespace, id.Namespace)
	}
	md := n.GetMetadata().GetFields()
	if ns := md["NAMESPACE"].GetStringValue(); ns != "" && ns != id.Namespace {
		return deny("metadata NAMESPACE %q is not the token's namespace %q", ns, id.Namespace)
	}
	if sa := md["SERVICE_ACCOUNT"].GetStringValue(); sa != "" && sa != id.ServiceAccount {
		return deny("metadata SERVICE_ACCOUNT %q is not the token's service account %q", sa, id.ServiceAccount)
	}
	return nil
}

// MintToken returns a bearer token for namespace/serviceAccount signed
// with the control plane's key in stateDir (created if missing), for
// `meshtun controlplane token`.
func MintToken(stateDir, namespace, serviceAccount string, ttl time.Duration) (string, error) {
	tk, err := ca.LoadTokens(filepath.Join(stateDir, CADirName))
	if err != nil {
		return "", err
	}
	return tk.Mint(ca.Identity{Namespace: strings.TrimSpace(namespace), ServiceAccount: strings.TrimSpace(serviceAccount)}, ttl)
}
