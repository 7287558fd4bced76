package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/upstream"
)

func TestMaxConnectionsOverflow(t *testing.T) {
	s := startServer(t, "127.0.0.1", 0, false)
	pb := xdstest.Cluster("cb", xdstest.WithEndpoints(hostsOf(s)...))
	pb.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{
		{Priority: corev3.RoutingPriority_DEFAULT, MaxConnections: wrapperspb.UInt32(2)},
	}}
	c := newTestCluster(t, pb)
	if th := c.Thresholds(PriorityDefault); th.MaxConnections != 2 || th.MaxPendingRequests != 1024 || th.MaxRetries != 3 {
		t.Fatalf("default thresholds %+v", th)
	}
	if th := c.Thresholds(PriorityHigh); th.MaxConnections != 1024 {
		t.Fatalf("high thresholds %+v", th)
	}
	u1 := mustConnect(t, c)
	u2 := mustConnect(t, c)
	if v := stat(t, c, "circuit_breakers.default.cx_open"); v != 1 {
		t.Errorf("cx_open = %d with the breaker full", v)
	}
	_, err := c.Connect(context.Background(), netip.AddrPort{}, nil)
	if !errors.Is(err, ErrOverflow) {
		t.Fatalf("third connect: %v, want ErrOverflow", err)
	}
	if v := stat(t, c, "upstream_cx_overflow"); v != 1 {
		t.Fatalf("upstream_cx_overflow = %d", v)
	}
	if v := stat(t, c, "upstream_cx_total"); v != 2 {
		t.Errorf("an overflowed connect must not count as a connection: upstream_cx_total = %d", v)
	}
	u1.Close()
	u1.Close() // idempotent: must not free a second slot
	u3 := mustConnect(t, c)
	if _, err := c.Connect(context.Background(), netip.AddrPort{}, nil); !errors.Is(err, ErrOverflow) {
		t.Fatalf("double Close freed two slots: %v", err)
	}
	u2.Close()
	u3.Close()
	if v := stat(t, c, "upstream_cx_active"); v != 0 {
		t.Errorf("upstream_cx_active = %d", v)
	}
	if v := c.Hosts()[0].ActiveConnections(); v != 0 {
		t.Errorf("host cx_active = %d", v)
	}
}

func TestConnectFailureThenExclude(t *testing.T) {
	dead := closedPort(t)
	live := startServer(t, "127.0.0.1", 0, false)
	c := newTestCluster(t, xdstest.Cluster("fail", xdstest.WithEndpoints(xdstest.Endpoint{Addr: dead}, hostsOf(live)[0])))
	// Rotation starts at a random host: within two tries one hits the dead port.
	var failed *Host
	for i := 0; i < 2 && failed == nil; i++ {
		u, err := c.Connect(context.Background(), netip.AddrPort{}, nil)
		if err == nil {
			u.Close()
			continue
		}
		var ce *ConnectError
		if !errors.As(err, &ce) || ce.Host.Address() != dead || ce.Timeout {
			t.Fatalf("error %v: want a non-timeout *ConnectError for %s", err, dead)
		}
		if !bytes.Contains([]byte(err.Error()), []byte(dead.String())) {
			t.Errorf("error %q does not name the host", err)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("error %v does not wrap ECONNREFUSED", err)
		}
		failed = ce.Host
	}
	if failed == nil {
		t.Fatal("no connect reached the closed port")
	}
	if v := stat(t, c, "upstream_cx_connect_fail"); v != 1 {
		t.Errorf("upstream_cx_connect_fail = %d", v)
	}
	if v := hostStat(failed, "cx_connect_fail"); v != 1 {
		t.Errorf("host cx_connect_fail = %d", v)
	}
	if v := stat(t, c, "upstream_cx_connect_timeout"); v != 0 {
		t.Errorf("upstream_cx_connect_timeout = %d", v)
	}
	// tcp_proxy's retry: exclude the failed host; the next attempts go elsewhere.
	for i := 0; i < 4; i++ {
		u, err := c.Connect(context.Background(), netip.AddrPort{}, func(h *Host) bool { return h == failed })
		if err != nil {
			t.Fatalf("retry %d: %v", i, err)
		}
		if u.Host().Address() != live.addr {
			t.Fatalf("retry went to %s", u.Host().Address())
		}
		u.Close()
	}
	if v := stat(t, c, "upstream_cx_active"); v != 0 {
		t.Errorf("upstream_cx_active = %d after a failure", v)
	}
	total, destroy := stat(t, c, "upstream_cx_total"), stat(t, c, "upstream_cx_destroy")
	if total != destroy {
		t.Errorf("upstream_cx_total %d != upstream_cx_destroy %d with nothing active", total, destroy)
	}
}

func TestConnectTimeoutFakeDialer(t *testing.T) {
	pb := xdstest.Cluster("to", xdstest.WithEndpoints(xdstest.Endpoint{Addr: netip.MustParseAddrPort("127.0.0.1:9")}))
	pb.ConnectTimeout = durationpb.New(50 * time.Millisecond)
	c := newTestCluster(t, pb)
	var deadline time.Duration
	c.dial = func(ctx context.Context, dst netip.AddrPort, src netip.Addr) (*net.TCPConn, error) {
		d, _ := ctx.Deadline()
		deadline = time.Until(d)
		<-ctx.Done()
		return nil, ctx.Err()
	}
	start := time.Now()
	_, err := c.Connect(context.Background(), netip.AddrPort{}, nil)
	var ce *ConnectError
	if !errors.As(err, &ce) || !ce.Timeout {
		t.Fatalf("err = %v, want a timeout *ConnectError", err)
	}
	if el := time.Since(start); el > time.Second || deadline > 50*time.Millisecond {
		t.Errorf("connect_timeout not applied: took %v, dial deadline %v", el, deadline)
	}
	if v := stat(t, c, "upstream_cx_connect_timeout"); v != 1 {
		t.Errorf("upstream_cx_connect_timeout = %d", v)
	}
	if v := stat(t, c, "upstream_cx_connect_fail"); v != 1 {
		t.Errorf("upstream_cx_connect_fail = %d (Envoy counts a timeout as a failure too)", v)
	}
	// A caller that gives up is not an upstream failure.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Connect(ctx, netip.AddrPort{}, nil); err == nil {
		t.Fatal("connect with a cancelled context succeeded")
	}
	if v := stat(t, c, "upstream_cx_connect_fail"); v != 1 {
		t.Errorf("cancelled connect counted as failure: %d", v)
	}
}

func TestOriginalDst(t *testing.T) {
	s := startServer(t, "127.0.0.1", 0, false)
	pb := &clusterv3.Cluster{
		Name:                 "PassthroughCluster",
		AltStatName:          "PassthroughCluster;",
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		LbPolicy:             clusterv3.Cluster_CLUSTER_PROVIDED,
		ConnectTimeout:       durationpb.New(time.Second),
	}
	c := newTestCluster(t, pb)
	if c.ObservabilityName() != "PassthroughCluster;" {
		t.Errorf("ObservabilityName = %q", c.ObservabilityName())
	}
	for i := 0; i < 3; i++ {
		u, err := c.Connect(context.Background(), s.addr, nil)
		if err != nil {
			t.Fatal(err)
		}
		if u.Host().Address() != s.addr || u.RemoteAddr().(*net.TCPAddr).AddrPort() != s.addr {
			t.Fatalf("dialed %s, want %s", u.RemoteAddr(), s.addr)
		}
		u.Close()
	}
	xdstest.Eventually(t, 5*time.Second, "accepts", func() bool { return s.accepts.Load() == 3 })
	hosts := c.Hosts()
	if len(hosts) != 1 || hostStat(hosts[0], "cx_total") != 3 {
		t.Fatalf("hosts %v", hosts)
	}
	if v := stat(t, c, "membership_total"); v != 1 {
		t.Errorf("membership_total = %d", v)
	}
	if _, err := c.Connect(context.Background(), netip.AddrPort{}, nil); !errors.Is(err, ErrNoHealthyUpstream) {
		t.Errorf("no original destination: %v", err)
	}

	pb.LbPolicy = clusterv3.Cluster_ROUND_ROBIN
	_, err := New(pb, Options{Dialer: &upstream.Dialer{}})
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("lb_policy: LB policy ROUND_ROBIN is not valid for Cluster type ORIGINAL_DST")) {
		t.Fatalf("ORIGINAL_DST + ROUND_ROBIN: %v", err)
	}
}

func TestOriginalDstCleanup(t *testing.T) {
	pb := &clusterv3.Cluster{
		Name:                 "od",
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		LbPolicy:             clusterv3.Cluster_CLUSTER_PROVIDED,
		CleanupInterval:      durationpb.New(20 * time.Millisecond),
	}
	c := newTestCluster(t, pb)
	a := netip.MustParseAddrPort("127.0.0.1:1")
	b := netip.MustParseAddrPort("127.0.0.1:2")
	c.pick(a, nil)
	// Two sweeps without use remove a; b keeps being used.
	for i := 0; i < 3; i++ {
		time.Sleep(25 * time.Millisecond)
		c.pick(b, nil)
	}
	hosts := c.Hosts()
	if len(hosts) != 1 || hosts[0].Address() != b {
		t.Fatalf("after cleanup hosts = %v, want only %s", hosts, b)
	}
}

func TestUpstreamBindSource(t *testing.T) {
	s := startServer(t, "127.0.0.1", 0, false)
	pb := &clusterv3.Cluster{
		Name:                 "InboundPassthroughCluster",
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		LbPolicy:             clusterv3.Cluster_CLUSTER_PROVIDED,
		UpstreamBindConfig: &corev3.BindConfig{SourceAddress: &corev3.SocketAddress{
			Address: "127.0.0.6", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 0},
		}},
	}
	c := newTestCluster(t, pb)
	u, err := c.Connect(context.Background(), s.addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	xdstest.Eventually(t, 5*time.Second, "accept", func() bool { return s.accepts.Load() == 1 })
	s.mu.Lock()
	remote := s.remotes[0]
	s.mu.Unlock()
	if remote.Addr() != netip.MustParseAddr("127.0.0.6") {
		t.Fatalf("server saw the connection from %s, want 127.0.0.6", remote)
	}
}

func TestByteCounters(t *testing.T) {
	s := startServer(t, "127.0.0.1", 0, true)
	c := newTestCluster(t, xdstest.Cluster("bytes", xdstest.WithEndpoints(hostsOf(s)...)))
	u := mustConnect(t, c)
	payload := make([]byte, 1<<20+123)
	rand.Read(payload)
	go func() {
		u.Write(payload)
		u.CloseWrite()
	}()
	got, err := io.ReadAll(u)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo mismatch: %d bytes", len(got))
	}
	u.Close()
	if v := stat(t, c, "upstream_cx_tx_bytes_total"); v != uint64(len(payload)) {
		t.Errorf("upstream_cx_tx_bytes_total = %d, want %d", v, len(payload))
	}
	if v := stat(t, c, "upstream_cx_rx_bytes_total"); v != uint64(len(payload)) {
		t.Errorf("upstream_cx_rx_bytes_total = %d, want %d", v, len(payload))
	}
	if v := stat(t, c, "upstream_cx_destroy"); v != 1 {
		t.Errorf("upstream_cx_destroy = %d", v)
	}
}

func TestResetSendsRST(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := newTestCluster(t, xdstest.Cluster("rst", xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: ln.Addr().(*net.TCPAddr).AddrPort()})))
	u := mustConnect(t, c)
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	u.Reset()
	sc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = sc.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("server read after Reset: %v, want ECONNRESET", err)
	}
	if v := stat(t, c, "upstream_cx_active"); v != 0 {
		t.Errorf("upstream_cx_active = %d after Reset", v)
	}
}

func TestBlackHoleCluster(t *testing.T) {
	pb := xdstest.Cluster("BlackHoleCluster")
	pb.AltStatName = "BlackHoleCluster;"
	c := newTestCluster(t, pb)
	c.dial = func(context.Context, netip.AddrPort, netip.Addr) (*net.TCPConn, error) {
		t.Fatal("BlackHoleCluster dialed")
		return nil, nil
	}
	_, err := c.Connect(context.Background(), netip.MustParseAddrPort("10.0.0.1:80"), nil)
	if !errors.Is(err, ErrNoHealthyUpstream) {
		t.Fatalf("err = %v", err)
	}
	if v := stat(t, c, "upstream_cx_none_healthy"); v != 1 {
		t.Errorf("upstream_cx_none_healthy = %d", v)
	}
	if v := stat(t, c, "upstream_cx_total"); v != 0 {
		t.Errorf("upstream_cx_total = %d", v)
	}
}

func TestRequestResources(t *testing.T) {
	pb := xdstest.Cluster("rq")
	pb.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{
		{Priority: corev3.RoutingPriority_DEFAULT, MaxRequests: wrapperspb.UInt32(1), MaxPendingRequests: wrapperspb.UInt32(1), MaxRetries: wrapperspb.UInt32(0)},
		{Priority: corev3.RoutingPriority_HIGH, MaxRequests: wrapperspb.UInt32(5), TrackRemaining: true},
	}}
	c := newTestCluster(t, pb)
	rel, ok := c.TryAcquireRequest()
	if !ok {
		t.Fatal("first request refused")
	}
	if _, ok := c.TryAcquireRequest(); ok {
		t.Fatal("second request admitted with max_requests 1")
	}
	if _, ok := c.TryAcquireRetry(); ok {
		t.Fatal("retry admitted with max_retries 0")
	}
	relP, ok := c.TryAcquirePending()
	if !ok {
		t.Fatal("pending refused")
	}
	if _, ok := c.TryAcquirePending(); ok {
		t.Fatal("second pending admitted")
	}
	if v := stat(t, c, "upstream_rq_pending_overflow"); v != 2 {
		t.Errorf("upstream_rq_pending_overflow = %d", v)
	}
	if v := stat(t, c, "upstream_rq_retry_overflow"); v != 1 {
		t.Errorf("upstream_rq_retry_overflow = %d", v)
	}
	if v := stat(t, c, "upstream_rq_active"); v != 1 {
		t.Errorf("upstream_rq_active = %d", v)
	}
	if v := stat(t, c, "circuit_breakers.default.rq_open"); v != 1 {
		t.Errorf("rq_open = %d", v)
	}
	rel()
	rel()
	relP()
	if _, ok := c.TryAcquireRequest(); !ok {
		t.Fatal("request refused after release")
	}
	if v := stat(t, c, "circuit_breakers.high.remaining_rq"); v != 5 {
		t.Errorf("high remaining_rq = %d", v)
	}
	hr, ok := c.Resources(PriorityHigh).TryAcquireRequest()
	if !ok {
		t.Fatal("high priority request refused")
	}
	hr()
	if v := stat(t, c, "upstream_rq_total"); v != 3 {
		t.Errorf("upstream_rq_total = %d", v)
	}
}

// TestAcquireRequestSlot: the closure-free request slot of the HTTP path
// counts and limits exactly as TryAcquireRequest does.
func TestAcquireRequestSlot(t *testing.T) {
	pb := xdstest.Cluster("rq")
	pb.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{
		{Priority: corev3.RoutingPriority_DEFAULT, MaxRequests: wrapperspb.UInt32(1)},
	}}
	c := newTestCluster(t, pb)
	if !c.AcquireRequest() {
		t.Fatal("first request refused")
	}
	if c.AcquireRequest() {
		t.Fatal("second request admitted with max_requests 1")
	}
	if _, ok := c.TryAcquireRequest(); ok {
		t.Fatal("TryAcquireRequest admitted past the slot AcquireRequest holds")
	}
	if v := stat(t, c, "upstream_rq_active"); v != 1 {
		t.Errorf("upstream_rq_active = %d, want 1", v)
	}
	if v := stat(t, c, "upstream_rq_pending_overflow"); v != 2 {
		t.Errorf("upstream_rq_pending_overflow = %d, want 2", v)
	}
	c.ReleaseRequest()
	if v := stat(t, c, "upstream_rq_active"); v != 0 {
		t.Errorf("upstream_rq_active after release = %d, want 0", v)
	}
	if !c.AcquireRequest() {
		t.Fatal("request refused after release")
	}
	c.ReleaseRequest()
	if v := stat(t, c, "upstream_rq_total"); v != 2 {
		t.Errorf("upstream_rq_total = %d, want 2", v)
	}
}
