package xdstest

import (
	"context"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
)

// Server is go-control-plane's real ADS server (SotW and delta) on a
// loopback port, serving one snapshot per node ID, and recording every
// NACK it receives.
type Server struct {
	Addr  string
	Cache cachev3.SnapshotCache

	version atomic.Int64
	streams atomic.Int64
	mu      sync.Mutex
	nacks   []NACK
	acks    map[string]int // by type URL
	// subs are the resource names each type is subscribed to, as the
	// last SotW request listed them or the delta requests added and
	// removed them.
	subs map[string]map[string]bool
}

// NACK is a rejection the server received.
type NACK struct {
	TypeURL string
	Message string
}

// NewServer starts the server; it stops when the test ends.
func NewServer(t testing.TB) *Server {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serve(t, lis, lis.Addr().String())
}

// NewUnixServer starts the server on a Unix socket at path, as pilot-agent's
// xDS proxy serves Envoy on ./etc/istio/proxy/XDS; Addr is "unix:"+path.
// It stops (and the socket is removed) when the test ends.
func NewUnixServer(t testing.TB, path string) *Server {
	t.Helper()
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	return serve(t, lis, "unix:"+path)
}

func serve(t testing.TB, lis net.Listener, addr string) *Server {
	s := &Server{Addr: addr, Cache: cachev3.NewSnapshotCache(false, cachev3.IDHash{}, nil), acks: map[string]int{},
		subs: map[string]map[string]bool{}}
	subscribe := func(typeURL string, replace bool, add, remove []string) {
		s.mu.Lock()
		defer s.mu.Unlock()
		set := s.subs[typeURL]
		if replace || set == nil {
			set = map[string]bool{}
			s.subs[typeURL] = set
		}
		for _, n := range add {
			set[n] = true
		}
		for _, n := range remove {
			delete(set, n)
		}
	}
	record := func(typeURL, nonce string, detail interface{ GetMessage() string }, hasErr bool) {
		s.mu.Lock()
		defer s.mu.Unlock()
		switch {
		case hasErr:
			s.nacks = append(s.nacks, NACK{TypeURL: typeURL, Message: detail.GetMessage()})
		case nonce != "":
			s.acks[typeURL]++
		}
	}
	cb := serverv3.CallbackFuncs{
		StreamOpenFunc: func(context.Context, int64, string) error {
			s.streams.Add(1)
			return nil
		},
		DeltaStreamOpenFunc: func(context.Context, int64, string) error {
			s.streams.Add(1)
			return nil
		},
		StreamRequestFunc: func(_ int64, r *discoveryv3.DiscoveryRequest) error {
			record(r.GetTypeUrl(), r.GetResponseNonce(), r.GetErrorDetail(), r.GetErrorDetail() != nil)
			subscribe(r.GetTypeUrl(), true, r.GetResourceNames(), nil)
			return nil
		},
		StreamDeltaRequestFunc: func(_ int64, r *discoveryv3.DeltaDiscoveryRequest) error {
			record(r.GetTypeUrl(), r.GetResponseNonce(), r.GetErrorDetail(), r.GetErrorDetail() != nil)
			subscribe(r.GetTypeUrl(), false, r.GetResourceNamesSubscribe(), r.GetResourceNamesUnsubscribe())
			return nil
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	gs := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, serverv3.NewServer(ctx, s.Cache, cb))
	done := make(chan struct{})
	go func() { defer close(done); _ = gs.Serve(lis) }()
	t.Cleanup(func() {
		cancel()
		gs.Stop()
		<-done
	})
	return s
}

// Set serves the given resources to node under a new version. res is keyed
// by type URL (resource.ClusterType, …).
func (s *Server) Set(t testing.TB, node string, res map[string][]types.Resource) {
	t.Helper()
	v := strconv.FormatInt(s.version.Add(1), 10)
	snap, err := cachev3.NewSnapshot(v, map[resource.Type][]types.Resource(res))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Cache.SetSnapshot(context.Background(), node, snap); err != nil {
		t.Fatal(err)
	}
}

// NACKs returns the rejections received so far.
func (s *Server) NACKs() []NACK {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]NACK(nil), s.nacks...)
}

// ACKs returns how many ACKs of typeURL were received.
func (s *Server) ACKs(typeURL string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.acks[typeURL]
}

// Subscribed returns the names typeURL is subscribed to, sorted: the
// last state-of-the-world request's resource_names, or what the delta
// requests subscribed and did not unsubscribe ("*" for a wildcard).
func (s *Server) Subscribed(typeURL string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Sorted(maps.Keys(s.subs[typeURL]))
}

// Streams returns how many ADS streams (SotW or delta) were opened: a
// client that restarts its stream opens one more.
func (s *Server) Streams() int64 { return s.streams.Load() }
