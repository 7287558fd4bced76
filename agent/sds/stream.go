package sds

import (
	"context"
	"errors"
	"io"
	"sort"
	"strconv"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/rs/zerolog"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// served are the names a wildcard subscription stands for.
var served = []string{WorkloadCert, RootCA}

// subscription is one stream's view: what it asked for and which version of
// each name it was last sent. A name is sent again only when the store's
// version differs from the one sent, so a NACKed version is not resent in a
// loop: the next push is the next Update.
type subscription struct {
	names map[string]bool
	sent  map[string]string
	seq   uint64 // nonces are this stream's response count
}

func newSubscription() *subscription {
	return &subscription{names: map[string]bool{}, sent: map[string]string{}}
}

// set replaces the subscribed names (SotW semantics), returning the added
// and removed ones so the server's counts follow.
func (sub *subscription) set(names []string) (added, removed []string) {
	if len(names) == 0 {
		names = []string{"*"} // SotW: no names is a wildcard request
	}
	want := map[string]bool{}
	for _, n := range expand(names) {
		want[n] = true
	}
	for n := range want {
		if !sub.names[n] {
			added = append(added, n)
		}
	}
	for n := range sub.names {
		if !want[n] {
			removed = append(removed, n)
			delete(sub.sent, n)
		}
	}
	sub.names = want
	return added, removed
}

// expand turns the wildcard "*" into the served names.
func expand(names []string) []string {
	var out []string
	for _, n := range names {
		if n == "*" {
			out = append(out, served...)
		} else {
			out = append(out, n)
		}
	}
	return out
}

// due lists, sorted, the subscribed names whose current secret this stream
// has not been sent. Names without a secret are not due: the stream waits.
func (sub *subscription) due(sn *snapshot) []string {
	var out []string
	for n := range sub.names {
		if e, ok := sn.secrets[n]; ok && sub.sent[n] != e.version {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

func (sub *subscription) nextNonce() string {
	sub.seq++
	return strconv.FormatUint(sub.seq, 10)
}

// recvLoop forwards a stream's requests until Recv fails or the handler is
// gone; the handler owns the stream, so the loop never outlives it.
func recvLoop[T any](ctx context.Context, recv func() (T, error), reqs chan<- T, errc chan<- error) {
	for {
		r, err := recv()
		if err != nil {
			errc <- err
			return
		}
		select {
		case reqs <- r:
		case <-ctx.Done():
			return
		}
	}
}

func checkType(typeURL string) error {
	if typeURL != "" && typeURL != SecretTypeURL {
		return status.Errorf(codes.InvalidArgument, "SDS serves only %s, request has type_url %q", SecretTypeURL, typeURL)
	}
	return nil
}

func nodeID(n *corev3.Node) string {
	if n == nil {
		return ""
	}
	return n.GetId()
}

// streamEnd maps why a stream loop stopped to the handler's return value.
func (s *Server) streamEnd(err error) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// serve runs one SDS stream, in either mode: it pushes what the
// subscription is due (push sends it; the versions sent are recorded
// here), and hands each request to handle, until the client, the server
// or the stream ends it. The two modes differ only in the shape of their
// responses and in how a request changes the subscription.
func serve[Req interface{ GetTypeUrl() string }](s *Server, ctx context.Context, recv func() (Req, error), sub *subscription,
	push func(sn *snapshot, due []string) error, handle func(Req) error) error {
	reqs := make(chan Req)
	errc := make(chan error, 1)
	go recvLoop(ctx, recv, reqs, errc)
	defer func() { s.unsubscribe(keys(sub.names)) }()
	for {
		sn := s.snap.Load()
		if due := sub.due(sn); len(due) > 0 {
			if err := push(sn, due); err != nil {
				return err
			}
			for _, n := range due {
				sub.sent[n] = sn.secrets[n].version
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			return status.Error(codes.Unavailable, "SDS server closing")
		case err := <-errc:
			return s.streamEnd(err)
		case <-sn.changed:
		case req := <-reqs:
			if err := checkType(req.GetTypeUrl()); err != nil {
				return err
			}
			if err := handle(req); err != nil {
				return err
			}
		}
	}
}

// StreamSecrets serves a state-of-the-world stream: each response carries
// the subscribed secrets that changed since the stream was last sent them,
// version_info the store's version, and a fresh nonce.
func (s *Server) StreamSecrets(stream secretv3.SecretDiscoveryService_StreamSecretsServer) error {
	log := s.log.With().Uint64("sds_stream", s.streamSeq.Add(1)).Str("mode", "sotw").Logger()
	sub := newSubscription()
	lastNonce := ""
	first := true
	push := func(sn *snapshot, due []string) error {
		resp := &discoveryv3.DiscoveryResponse{VersionInfo: sn.versionS, TypeUrl: SecretTypeURL, Nonce: sub.nextNonce()}
		for _, n := range due {
			resp.Resources = append(resp.Resources, sn.secrets[n].any)
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
		lastNonce = resp.Nonce
		log.Debug().Strs("secrets", due).Str("version", resp.VersionInfo).Str("nonce", resp.Nonce).Msg("SDS push")
		return nil
	}
	handle := func(req *discoveryv3.DiscoveryRequest) error {
		if first {
			first = false
			log = log.With().Str("node", nodeID(req.GetNode())).Logger()
		} else if req.GetResponseNonce() != lastNonce {
			// A request answering an older response: the client has
			// newer data in flight to it and will answer that.
			return nil
		}
		if req.GetResponseNonce() != "" {
			logAck(log, req.GetResponseNonce(), req.GetVersionInfo(), req.GetResourceNames(), req.GetErrorDetail())
		}
		added, removed := sub.set(req.GetResourceNames())
		s.subscribe(added)
		s.unsubscribe(removed)
		return nil
	}
	return serve(s, stream.Context(), stream.Recv, sub, push, handle)
}

// DeltaSecrets serves an incremental stream: each response carries only
// the subscribed secrets whose version changed, each with its own version.
// The two names never disappear once issued (a rotation replaces them), so
// no response has removed_resources; a name the agent has no secret for yet
// is not "removed" either, it is waited for.
func (s *Server) DeltaSecrets(stream secretv3.SecretDiscoveryService_DeltaSecretsServer) error {
	log := s.log.With().Uint64("sds_stream", s.streamSeq.Add(1)).Str("mode", "delta").Logger()
	sub := newSubscription()
	first := true
	push := func(sn *snapshot, due []string) error {
		resp := &discoveryv3.DeltaDiscoveryResponse{SystemVersionInfo: sn.versionS, TypeUrl: SecretTypeURL, Nonce: sub.nextNonce()}
		for _, n := range due {
			e := sn.secrets[n]
			resp.Resources = append(resp.Resources, &discoveryv3.Resource{Name: n, Version: e.version, Resource: e.any})
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
		log.Debug().Strs("secrets", due).Str("version", resp.SystemVersionInfo).Str("nonce", resp.Nonce).Msg("SDS push")
		return nil
	}
	handle := func(req *discoveryv3.DeltaDiscoveryRequest) error {
		subscribe := req.GetResourceNamesSubscribe()
		if first {
			first = false
			log = log.With().Str("node", nodeID(req.GetNode())).Logger()
			// A reconnecting client says what it has; only newer
			// versions are sent.
			for n, v := range req.GetInitialResourceVersions() {
				sub.sent[n] = v
			}
			if len(subscribe) == 0 {
				subscribe = []string{"*"} // legacy wildcard
			}
		}
		if req.GetResponseNonce() != "" {
			logAck(log, req.GetResponseNonce(), "", nil, req.GetErrorDetail())
		}
		// Later requests change the subscription only by the names
		// they list; an ACK lists none.
		var added, removed []string
		for _, n := range expand(subscribe) {
			if !sub.names[n] {
				sub.names[n] = true
				added = append(added, n)
			}
		}
		for _, n := range expand(req.GetResourceNamesUnsubscribe()) {
			if sub.names[n] {
				delete(sub.names, n)
				delete(sub.sent, n)
				removed = append(removed, n)
			}
		}
		s.subscribe(added)
		s.unsubscribe(removed)
		return nil
	}
	return serve(s, stream.Context(), stream.Recv, sub, push, handle)
}

// logAck records the client's verdict on a response. A NACK is logged with
// the client's reason at warning level and not answered: the rejected
// secret stays as it is until the next Update.
func logAck(log zerolog.Logger, nonce, version string, names []string, detail *rpcstatus.Status) {
	if detail == nil {
		log.Debug().Str("nonce", nonce).Str("version", version).Msg("SDS ACK")
		return
	}
	log.Warn().Str("nonce", nonce).Str("version", version).Strs("secrets", names).
		Int32("error_code", detail.GetCode()).Str("error_detail", detail.GetMessage()).Msg("SDS NACK: the proxy rejected the secret")
}

// FetchSecrets answers a unary request with the named secrets that exist
// now (all of them when none is named); if none does, Unavailable, so the
// caller retries.
func (s *Server) FetchSecrets(_ context.Context, req *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	if err := checkType(req.GetTypeUrl()); err != nil {
		return nil, err
	}
	sn := s.snap.Load()
	resp := &discoveryv3.DiscoveryResponse{VersionInfo: sn.versionS, TypeUrl: SecretTypeURL, Nonce: sn.versionS}
	names := expand(req.GetResourceNames())
	for _, n := range names {
		if e, ok := sn.secrets[n]; ok {
			resp.Resources = append(resp.Resources, e.any)
		}
	}
	if len(resp.Resources) == 0 {
		return nil, status.Errorf(codes.Unavailable, "no secret yet for %q", names)
	}
	return resp, nil
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
