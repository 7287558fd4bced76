package xdsclient

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"

	"github.com/meshtun/meshtun/internal/xdstest"
)

const testNodeID = "sidecar~10.1.0.7~app-7d9f.default~default.svc.cluster.local"

// modes runs f for state of the world and for delta.
func modes(t *testing.T, f func(t *testing.T, delta bool)) {
	t.Run("sotw", func(t *testing.T) { t.Parallel(); f(t, false) })
	t.Run("delta", func(t *testing.T) { t.Parallel(); f(t, true) })
}

// req is what the control plane received, as its callbacks saw it.
type req struct {
	seq         int64 // order among all requests and responses of the server
	stream      int64
	typeURL     string
	version     string // SotW version_info
	nonce       string
	names       []string // SotW resource_names
	subscribe   []string // delta
	unsubscribe []string // delta
	initial     map[string]string
	errCode     int32
	errMsg      string
	hasError    bool
}

// resp is a response the control plane sent.
type resp struct {
	seq     int64
	stream  int64
	typeURL string
	version string // version_info or system_version_info
	nonce   string
}

// xdsServer is go-control-plane's real ADS server on a loopback listener, recording
// what the client sends through the server callbacks. A gRPC interceptor counts the
// nodes on the wire: the SotW server fills the node into every request before its
// callback runs, so only the raw stream shows whether the client repeated it.
type xdsServer struct {
	cache cachev3.SnapshotCache
	addr  string
	gs    *grpc.Server
	stop  context.CancelFunc

	mu        sync.Mutex
	reqs      []req
	resps     []resp
	wireNodes map[int64][]bool // per wire stream: node present, per request
	streamSeq atomic.Int64
	seq       int64
}

func startXDS(t *testing.T, addr string, c cachev3.SnapshotCache) *xdsServer {
	t.Helper()
	var lis net.Listener
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; { // the old listener may still be closing
		if lis, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &xdsServer{cache: c, addr: lis.Addr().String(), stop: cancel, wireNodes: map[int64][]bool{}}
	cb := serverv3.CallbackFuncs{
		StreamRequestFunc: func(id int64, r *discoveryv3.DiscoveryRequest) error {
			s.record(req{stream: id, typeURL: r.GetTypeUrl(), version: r.GetVersionInfo(), nonce: r.GetResponseNonce(),
				names: r.GetResourceNames(), errCode: r.GetErrorDetail().GetCode(), errMsg: r.GetErrorDetail().GetMessage(),
				hasError: r.GetErrorDetail() != nil})
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discoveryv3.DiscoveryRequest, r *discoveryv3.DiscoveryResponse) {
			s.recordResp(resp{stream: id, typeURL: r.GetTypeUrl(), version: r.GetVersionInfo(), nonce: r.GetNonce()})
		},
		StreamDeltaRequestFunc: func(id int64, r *discoveryv3.DeltaDiscoveryRequest) error {
			s.record(req{stream: id, typeURL: r.GetTypeUrl(), nonce: r.GetResponseNonce(),
				subscribe: r.GetResourceNamesSubscribe(), unsubscribe: r.GetResourceNamesUnsubscribe(),
				initial: r.GetInitialResourceVersions(), errCode: r.GetErrorDetail().GetCode(),
				errMsg: r.GetErrorDetail().GetMessage(), hasError: r.GetErrorDetail() != nil})
			return nil
		},
		StreamDeltaResponseFunc: func(id int64, _ *discoveryv3.DeltaDiscoveryRequest, r *discoveryv3.DeltaDiscoveryResponse) {
			s.recordResp(resp{stream: id, typeURL: r.GetTypeUrl(), version: r.GetSystemVersionInfo(), nonce: r.GetNonce()})
		},
	}
	s.gs = grpc.NewServer(grpc.StreamInterceptor(s.countNodes))
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(s.gs, serverv3.NewServer(ctx, c, cb))
	go func() { _ = s.gs.Serve(lis) }()
	t.Cleanup(s.shutdown)
	return s
}

func (s *xdsServer) shutdown() {
	s.stop()
	s.gs.Stop()
}

func (s *xdsServer) record(r req) {
	s.mu.Lock()
	s.seq++
	r.seq = s.seq
	s.reqs = append(s.reqs, r)
	s.mu.Unlock()
}

func (s *xdsServer) recordResp(r resp) {
	s.mu.Lock()
	s.seq++
	r.seq = s.seq
	s.resps = append(s.resps, r)
	s.mu.Unlock()
}

func (s *xdsServer) requests() []req {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]req(nil), s.reqs...)
}

func (s *xdsServer) responses() []resp {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]resp(nil), s.resps...)
}

type nodeCounter struct {
	grpc.ServerStream
	s  *xdsServer
	id int64
}

func (n *nodeCounter) RecvMsg(m any) error {
	if err := n.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	var node *corev3.Node
	switch r := m.(type) {
	case *discoveryv3.DiscoveryRequest:
		node = r.GetNode()
	case *discoveryv3.DeltaDiscoveryRequest:
		node = r.GetNode()
	}
	n.s.mu.Lock()
	n.s.wireNodes[n.id] = append(n.s.wireNodes[n.id], node.GetId() == testNodeID)
	n.s.mu.Unlock()
	return nil
}

func (s *xdsServer) countNodes(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	return h(srv, &nodeCounter{ServerStream: ss, s: s, id: s.streamSeq.Add(1)})
}

// nodesOnWire returns, per stream, whether each request carried the node.
func (s *xdsServer) nodesOnWire() map[int64][]bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[int64][]bool{}
	for id, v := range s.wireNodes {
		out[id] = append([]bool(nil), v...)
	}
	return out
}

func (s *xdsServer) set(t *testing.T, snap *cachev3.Snapshot) {
	t.Helper()
	if err := s.cache.SetSnapshot(context.Background(), testNodeID, snap); err != nil {
		t.Fatalf("SetSnapshot: %v", err)
	}
}

// ack returns the client's ACK of a response of typeURL with version v: a request
// without error_detail carrying that response's nonce (and, in SotW, v).
func (s *xdsServer) ack(typeURL, v string, delta bool) (req, bool) {
	for _, rp := range s.responses() {
		if rp.typeURL != typeURL || rp.version != v {
			continue
		}
		for _, rq := range s.requests() {
			if rq.stream == rp.stream && rq.typeURL == typeURL && rq.nonce == rp.nonce && !rq.hasError &&
				(delta || rq.version == v) {
				return rq, true
			}
		}
	}
	return req{}, false
}

func (s *xdsServer) acked(typeURL, v string, delta bool) bool {
	_, ok := s.ack(typeURL, v, delta)
	return ok
}

// nack returns the first NACK of typeURL the server saw.
func (s *xdsServer) nack(typeURL string) (req, bool) {
	for _, rq := range s.requests() {
		if rq.typeURL == typeURL && rq.hasError {
			return rq, true
		}
	}
	return req{}, false
}

func newCache() cachev3.SnapshotCache { return cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil) }

func snapshot(t *testing.T, version string, rs ...types.Resource) *cachev3.Snapshot {
	t.Helper()
	m := map[resource.Type][]types.Resource{}
	for _, r := range rs {
		var typ string
		switch r.(type) {
		case *clusterv3.Cluster:
			typ = resource.ClusterType
		case *endpointv3.ClusterLoadAssignment:
			typ = resource.EndpointType
		case *listenerv3.Listener:
			typ = resource.ListenerType
		case *routev3.RouteConfiguration:
			typ = resource.RouteType
		default:
			t.Fatalf("unexpected resource %T", r)
		}
		m[typ] = append(m[typ], r)
	}
	s, err := cachev3.NewSnapshot(version, m)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// recorder is an Applier that keeps every call, checks each one for consistency and
// rejects what reject says to.
type recorder struct {
	t      *testing.T
	mu     sync.Mutex
	calls  []*Resources
	ok     []*Resources // the calls that returned nil
	reject func(*Resources) error
}

func (r *recorder) Apply(_ context.Context, res *Resources) error {
	for name, c := range res.Clusters {
		refs, _ := clusterRefs(c)
		for _, n := range refs {
			if res.Endpoints[n] == nil {
				r.t.Errorf("Apply got EDS cluster %q without its assignment %q", name, n)
			}
		}
	}
	for name, l := range res.Listeners {
		refs, _ := listenerRefs(l)
		for _, n := range refs {
			if res.Routes[n] == nil {
				r.t.Errorf("Apply got listener %q without its route configuration %q", name, n)
			}
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, res)
	if r.reject != nil {
		if err := r.reject(res); err != nil {
			return err
		}
	}
	r.ok = append(r.ok, res)
	return nil
}

// lastAccepted returns the Resources of the last call that returned nil.
func (r *recorder) lastAccepted() *Resources {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.ok) == 0 {
		return nil
	}
	return r.ok[len(r.ok)-1]
}

// waitAccepted waits for an Apply call that satisfies pred and returned nil.
func (r *recorder) waitAccepted(t *testing.T, d time.Duration, what string, pred func(*Resources) bool) *Resources {
	t.Helper()
	var got *Resources
	xdstest.Eventually(t, d, what, func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, res := range r.ok {
			if pred(res) {
				got = res
				return true
			}
		}
		return false
	})
	return got
}

func (r *recorder) all() []*Resources {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*Resources(nil), r.calls...)
}

// waitApply waits for an Apply call that satisfies pred and returns it.
func (r *recorder) waitApply(t *testing.T, d time.Duration, what string, pred func(*Resources) bool) *Resources {
	t.Helper()
	var got *Resources
	xdstest.Eventually(t, d, what, func() bool {
		for _, res := range r.all() {
			if pred(res) {
				got = res
				return true
			}
		}
		return false
	})
	return got
}

// startClient runs a client against addr until the test ends.
func startClient(t *testing.T, addr string, delta bool, ift time.Duration, a Applier) *Client {
	t.Helper()
	c := New(Config{
		Server:              addr,
		Delta:               delta,
		Node:                &corev3.Node{Id: testNodeID, Cluster: "app.default"},
		InitialFetchTimeout: ift,
		BackoffBase:         20 * time.Millisecond,
		BackoffMax:          200 * time.Millisecond,
		Log:                 zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
	}, a)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Run returned %v, want context.Canceled", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return c
}

func lbEndpoints(a *endpointv3.ClusterLoadAssignment) int {
	n := 0
	for _, l := range a.GetEndpoints() {
		n += len(l.GetLbEndpoints())
	}
	return n
}

func describe(r *Resources) string {
	if r == nil {
		return "<nil>"
	}
	return fmt.Sprintf("clusters=%d endpoints=%d listeners=%d routes=%d versions=%v",
		len(r.Clusters), len(r.Endpoints), len(r.Listeners), len(r.Routes), r.Versions)
}
