package ca

import (
	"context"
	"crypto/tls"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

// DefaultTrustDomain is Istio's (meshConfig.trustDomain).
const DefaultTrustDomain = "cluster.local"

// DNSNames are the serving certificate's names istiod's would carry for
// the default revision in istio-system (getDNSNames in
// https://github.com/istio/istio/blob/master/pilot/pkg/bootstrap/server.go),
// so an agent dialing istiod.istio-system.svc:15012 verifies it.
var DNSNames = []string{"istiod.istio-system.svc", "istiod-remote.istio-system.svc", "istio-pilot.istio-system.svc"}

// authFailure is istiod's message for every authentication failure; why it
// failed is logged, not told to the caller.
const authFailure = "request authenticate failure"

// Server is the IstioCertificateService.
type Server struct {
	pb.UnimplementedIstioCertificateServiceServer
	CA          *Authority
	Tokens      *Tokens
	TrustDomain string
	Log         zerolog.Logger
}

// Authenticate returns the identity of the bearer token in ctx's gRPC
// metadata, or Unauthenticated "request authenticate failure" as istiod
// answers. The control plane's ADS on the TLS port uses it too.
func (s *Server) Authenticate(ctx context.Context) (Identity, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	var reason string
	for _, v := range md.Get("authorization") {
		tok, ok := strings.CutPrefix(v, "Bearer ")
		if !ok {
			reason = "authorization header is not \"Bearer <token>\""
			continue
		}
		id, err := s.Tokens.Verify(strings.TrimSpace(tok))
		if err == nil {
			return id, nil
		}
		reason = err.Error()
	}
	if reason == "" {
		reason = "no authorization: Bearer <token> metadata"
	}
	ev := s.Log.Warn().Str("reason", reason)
	if p, ok := peer.FromContext(ctx); ok {
		ev = ev.Stringer("peer", p.Addr)
	}
	ev.Msg("caller not authenticated")
	return Identity{}, status.Error(codes.Unauthenticated, authFailure)
}

// CreateCertificate signs the request's CSR for the caller's identity.
func (s *Server) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	id, err := s.Authenticate(ctx)
	if err != nil {
		return nil, err
	}
	td := s.TrustDomain
	if td == "" {
		td = DefaultTrustDomain
	}
	san := id.SPIFFE(td)
	chain, err := s.CA.Sign([]byte(req.GetCsr()), san, time.Duration(req.GetValidityDuration())*time.Second)
	if err != nil {
		s.Log.Warn().Err(err).Str("identity", san).Msg("certificate request rejected")
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	s.Log.Info().Str("identity", san).Int64("ttl_seconds", req.GetValidityDuration()).Msg("certificate issued")
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

// Register adds the service to gs.
func (s *Server) Register(gs *grpc.Server) { pb.RegisterIstioCertificateServiceServer(gs, s) }

// ServerCredentials are the secure port's TLS: the serving certificate,
// TLS 1.2 at least, a client certificate verified if given (istiod's
// VerifyClientCertIfGiven; callers normally send none and a token).
func ServerCredentials(cert tls.Certificate, ca *Authority) credentials.TransportCredentials {
	pool := newPool(ca)
	return credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    pool,
	})
}
