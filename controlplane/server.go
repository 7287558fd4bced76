package controlplane

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/rs/zerolog"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"
)

// Server serves every connected sidecar its configuration over ADS (delta
// and state of the world), generated from the registry and the mesh
// profile in force. A change of either is pushed to every node as a new
// snapshot version; nodes of one class (IP families and namespace) share
// one snapshot.
// order.go says in which order a change reaches the nodes.
type Server struct {
	log   zerolog.Logger
	cache cachev3.SnapshotCache

	mu      sync.Mutex // serializes configuration changes and node arrivals
	reg     *Registry
	profile *Profile
	version uint64
	seq     sequence                        // make-before-break state (order.go)
	classes map[nodeClass]*cachev3.Snapshot // of the current version
	changes classChanges                    // when each class's listeners and routes last changed
	nodes   map[string]*nodeEntry           // by node id
	streams map[streamKey]string            // stream -> node id
	// identified are the open streams that came over the TLS port with a
	// token: their nodes have a workload identity.
	identified  map[streamKey]bool
	trustDomain string // of the SPIFFE IDs generated (the CA's)
	// nonces maps a delta stream's cluster, listener and route response
	// nonces to versions: a delta ACK carries only the nonce.
	nonces   map[int64]map[string]string
	advance  chan struct{} // a node moved on, or a step timed out
	stepWait time.Duration // maxStepWait; shorter in tests

	registryRejected atomic.Uint64
	profileRejected  atomic.Uint64
	lastRejection    atomic.Pointer[string]
}

type nodeEntry struct {
	node     nodeInfo
	streams  int
	acks     uint64
	nacks    uint64
	lastNack string
	// clusters, listeners and routes are the highest versions of each the
	// node ACKed (applied).
	clusters, listeners, routes uint64
}

type streamKey struct {
	delta bool
	id    int64
}

// NewServer returns a server for reg and profile (version 1).
func NewServer(reg *Registry, profile *Profile, log zerolog.Logger) *Server {
	s := &Server{
		log:         log,
		cache:       cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil),
		reg:         reg,
		profile:     profile,
		nodes:       map[string]*nodeEntry{},
		changes:     classChanges{},
		streams:     map[streamKey]string{},
		identified:  map[streamKey]bool{},
		trustDomain: defaultTrustDomain,
		nonces:      map[int64]map[string]string{},
		advance:     make(chan struct{}, 1),
		stepWait:    maxStepWait,
	}
	s.mu.Lock()
	s.rebuild()
	s.mu.Unlock()
	return s
}

// grpcPort is one more gRPC server carrying ADS: the TLS port, with its
// options (credentials, token check) and the CA service registered.
type grpcPort struct {
	lis      net.Listener
	opts     []grpc.ServerOption
	register func(*grpc.Server)
}

// Serve runs the ADS gRPC service on lis, and on each of more, until ctx
// is done or one of them fails. All share one ADS server and one cache: a
// node is the same node on either port.
func (s *Server) serve(ctx context.Context, lis net.Listener, more ...grpcPort) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ads := serverv3.NewServer(ctx, s.cache, s.callbacks())
	ports := append([]grpcPort{{lis: lis}}, more...)
	errc := make(chan error, len(ports))
	for _, p := range ports {
		gs := grpc.NewServer(p.opts...)
		discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, ads)
		if p.register != nil {
			p.register(gs)
		}
		stop := context.AfterFunc(ctx, gs.Stop)
		defer stop()
		go func() {
			err := gs.Serve(p.lis)
			cancel()
			errc <- err
		}()
	}
	done := make(chan struct{})
	go func() { defer close(done); s.sequencer(ctx) }()
	var err error
	for range ports {
		e := <-errc
		if e != nil && !errors.Is(e, grpc.ErrServerStopped) && err == nil {
			err = e
		}
	}
	<-done
	return err
}

// Callbacks learn each stream's node from its first request, give a new
// node its snapshot, track what each node ACKed and NACKed, and forget a
// node when its last stream closes.
func (s *Server) callbacks() serverv3.Callbacks {
	opened := func(k streamKey, ctx context.Context) error {
		if _, ok := streamIdentity(ctx); ok {
			s.mu.Lock()
			s.identified[k] = true
			s.mu.Unlock()
		}
		return nil
	}
	return serverv3.CallbackFuncs{
		StreamOpenFunc: func(ctx context.Context, id int64, _ string) error {
			return opened(streamKey{false, id}, ctx)
		},
		DeltaStreamOpenFunc: func(ctx context.Context, id int64, _ string) error {
			return opened(streamKey{true, id}, ctx)
		},
		StreamRequestFunc: func(id int64, r *discoveryv3.DiscoveryRequest) error {
			return s.onRequest(streamKey{false, id}, r.GetNode(), r.GetTypeUrl(), r.GetResponseNonce(), r.GetVersionInfo(), r.GetErrorDetail())
		},
		StreamDeltaRequestFunc: func(id int64, r *discoveryv3.DeltaDiscoveryRequest) error {
			return s.onRequest(streamKey{true, id}, r.GetNode(), r.GetTypeUrl(), r.GetResponseNonce(), "", r.GetErrorDetail())
		},
		StreamDeltaResponseFunc: func(id int64, _ *discoveryv3.DeltaDiscoveryRequest, r *discoveryv3.DeltaDiscoveryResponse) {
			switch r.GetTypeUrl() {
			case resource.ClusterType, resource.ListenerType, resource.RouteType:
			default:
				return
			}
			s.mu.Lock()
			defer s.mu.Unlock()
			m := s.nonces[id]
			if m == nil || len(m) > 32 { // nonces a misbehaving client never ACKed
				m = map[string]string{}
				s.nonces[id] = m
			}
			m[r.GetNonce()] = r.GetSystemVersionInfo()
		},
		StreamClosedFunc:      func(id int64, _ *corev3.Node) { s.onClosed(streamKey{false, id}) },
		DeltaStreamClosedFunc: func(id int64, _ *corev3.Node) { s.onClosed(streamKey{true, id}) },
	}
}

// onRequest handles every request of every stream; version is the SotW
// version_info ("" in delta, where the nonce names the response).
func (s *Server) onRequest(k streamKey, n *corev3.Node, typeURL, nonce, version string, nack *status.Status) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	id, known := s.streams[k]
	if !known {
		if n == nil {
			return grpcstatus.Error(codes.InvalidArgument, "the first request of a stream must carry the node")
		}
		node, err := parseNode(n)
		if err != nil {
			s.log.Warn().Err(err).Msg("node rejected")
			return grpcstatus.Error(codes.InvalidArgument, err.Error())
		}
		node.Identity = s.identified[k]
		id = node.ID
		s.streams[k] = id
		e := s.nodes[id]
		if e == nil {
			e = &nodeEntry{node: node}
			s.nodes[id] = e
			s.setSnapshot(id, node.class(s.reg))
			s.log.Info().Str("node", id).Interface("ips", node.IPs).Bool("delta", k.delta).Bool("identity", node.Identity).Msg("node connected")
		} else if e.node.class(s.reg) != node.class(s.reg) {
			e.node = node
			s.setSnapshot(id, node.class(s.reg))
		}
		e.streams++
	}
	e := s.nodes[id]
	if nonce == "" {
		return nil
	}
	if k.delta {
		version = s.nonces[k.id][nonce]
		delete(s.nonces[k.id], nonce)
	}
	if nack != nil {
		e.nacks++
		e.lastNack = nack.GetMessage()
		s.log.Warn().Str("node", id).Str("type", typeURL).Str("version", version).Str("error", nack.GetMessage()).
			Msg("configuration rejected by the proxy (NACK)")
		return nil
	}
	e.acks++
	v, err := strconv.ParseUint(version, 10, 64)
	if err != nil {
		return nil
	}
	switch typeURL {
	case resource.ClusterType:
		e.clusters = max(e.clusters, v)
	case resource.ListenerType:
		e.listeners = max(e.listeners, v)
	case resource.RouteType:
		e.routes = max(e.routes, v)
	default:
		return nil
	}
	if s.seq.pending() {
		s.wake()
	}
	return nil
}

func (s *Server) onClosed(k streamKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.identified, k)
	id, ok := s.streams[k]
	if !ok {
		return
	}
	delete(s.streams, k)
	if k.delta {
		delete(s.nonces, k.id)
	}
	if e := s.nodes[id]; e != nil {
		e.streams--
		if e.streams <= 0 {
			delete(s.nodes, id)
			s.cache.ClearSnapshot(id)
			s.log.Info().Str("node", id).Msg("node disconnected")
			if s.seq.pending() {
				s.wake()
			}
		}
	}
}

// wake makes the sequencer look at the nodes again.
func (s *Server) wake() {
	select {
	case s.advance <- struct{}{}:
	default:
	}
}

// setSnapshot gives node id the current snapshot of its class. Called
// with s.mu held; the cache's sends to stream watches never block (one
// buffered response per type), so no stream waits on s.mu meanwhile.
func (s *Server) setSnapshot(id string, c nodeClass) {
	snap := s.classes[c]
	if snap == nil {
		snap = s.snapshot(c)
		s.classes[c] = snap
		s.changes.note(c, s.version, snap)
	}
	if err := s.cache.SetSnapshot(context.Background(), id, snap); err != nil {
		s.log.Error().Err(err).Str("node", id).Msg("set snapshot")
	}
}

func (s *Server) versionString() string { return strconv.FormatUint(s.version, 10) }

// push makes the next version and sets it for every node. Called with
// s.mu held.
func (s *Server) push(why string) {
	start := time.Now()
	s.version++
	s.classes = map[nodeClass]*cachev3.Snapshot{}
	for _, id := range sortedKeys(s.nodes) {
		s.setSnapshot(id, s.nodes[id].node.class(s.reg))
	}
	for c := range s.changes {
		if s.classes[c] == nil {
			delete(s.changes, c) // no node of c left: it starts afresh
		}
	}
	s.log.Info().Str("version", s.versionString()).Str("reason", why).Int("nodes", len(s.nodes)).Int("hosts", len(s.reg.hosts)).
		Str("outbound_traffic_policy", string(s.profile.Spec.OutboundTrafficPolicy.Mode)).
		Str("peer_authentication", string(s.profile.Spec.peerAuth())).
		Dur("took", time.Since(start)).Msg("configuration pushed")
}

// SetRegistry puts reg in force and pushes it; it returns the new version.
func (s *Server) setRegistry(reg *Registry) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reg = reg
	s.rebuild()
	return s.versionString()
}

// setTrustDomain makes td the trust domain of the SPIFFE IDs generated
// (the CA's). Called before serving: the configuration is generated
// afresh, as if loaded with it.
func (s *Server) setTrustDomain(td string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if td == "" || td == s.trustDomain {
		return
	}
	s.trustDomain = td
	s.seq = sequence{}
	s.rebuild()
}

// SetProfile puts p in force and pushes it; it returns the new version.
func (s *Server) setProfile(p *Profile) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.profile = p
	s.rebuild()
	return s.versionString()
}

// Profile is the profile in force.
func (s *Server) Profile() *Profile {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.profile
}

// Version is the configuration version last pushed.
func (s *Server) currentVersion() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.versionString()
}

// RejectRegistry records a registry change that was refused: counted,
// logged by the caller, the previous registry still in force.
func (s *Server) rejectRegistry(err error) {
	s.registryRejected.Add(1)
	msg := err.Error()
	s.lastRejection.Store(&msg)
}

// RejectProfile records a profile that was refused.
func (s *Server) rejectProfile(err error) {
	s.profileRejected.Add(1)
	msg := err.Error()
	s.lastRejection.Store(&msg)
}

// serverStatus is the control plane's state, for its HTTP API.
type serverStatus struct {
	Version               string       `json:"version"`
	Profile               string       `json:"profile"`
	OutboundTrafficPolicy OutboundMode `json:"outboundTrafficPolicy"`
	PeerAuthentication    PeerAuthMode `json:"peerAuthentication"`
	Hosts                 int          `json:"hosts"`
	// Pending is the step of a change still under way (order.go), if any.
	Pending          string       `json:"pending,omitempty"`
	RegistryRejected uint64       `json:"registryRejected"`
	ProfileRejected  uint64       `json:"profileRejected"`
	LastRejection    string       `json:"lastRejection,omitempty"`
	Nodes            []nodeStatus `json:"nodes"`
}

// nodeStatus is one connected node.
type nodeStatus struct {
	ID  string       `json:"id"`
	IPs []netip.Addr `json:"ips"`
	// Identity: the node came over the TLS port with a token, and gets
	// Istio's TLS shapes.
	Identity  bool   `json:"identity"`
	Streams   int    `json:"streams"`
	Clusters  uint64 `json:"clustersVersion"`  // last ACKed
	Listeners uint64 `json:"listenersVersion"` // last ACKed
	Routes    uint64 `json:"routesVersion"`    // last ACKed
	ACKs      uint64 `json:"acks"`
	NACKs     uint64 `json:"nacks"`
	LastNACK  string `json:"lastNack,omitempty"`
}

// status reports the state.
func (s *Server) status() serverStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := serverStatus{
		Version:               s.versionString(),
		Profile:               s.profile.Metadata.Name,
		OutboundTrafficPolicy: s.profile.Spec.OutboundTrafficPolicy.Mode,
		PeerAuthentication:    s.profile.Spec.peerAuth(),
		Hosts:                 len(s.reg.hosts),
		Pending:               s.seq.describe(),
		RegistryRejected:      s.registryRejected.Load(),
		ProfileRejected:       s.profileRejected.Load(),
		Nodes:                 []nodeStatus{},
	}
	if p := s.lastRejection.Load(); p != nil {
		st.LastRejection = *p
	}
	for _, id := range sortedKeys(s.nodes) {
		e := s.nodes[id]
		st.Nodes = append(st.Nodes, nodeStatus{ID: id, IPs: e.node.IPs, Identity: e.node.Identity, Streams: e.streams, Clusters: e.clusters,
			Listeners: e.listeners, Routes: e.routes, ACKs: e.acks, NACKs: e.nacks, LastNACK: e.lastNack})
	}
	return st
}
