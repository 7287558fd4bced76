package tcpproxy

import (
	"context"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
)

// clusterMap is the configuration a flow sees: clusters by name.
type clusterMap map[string]*cluster.Cluster

func (m clusterMap) Cluster(name string) *cluster.Cluster { return m[name] }

func newCluster(t *testing.T, pb *clusterv3.Cluster) *cluster.Cluster {
	t.Helper()
	c, err := cluster.New(pb, cluster.Options{Dialer: &upstream.Dialer{}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func clusterStat(c *cluster.Cluster, name string) uint64 {
	for _, s := range c.Stats() {
		if s.Name == name {
			return s.Value
		}
	}
	return 0
}

// echoServer echoes every connection until its peer half-closes.
func echoServer(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	xdstest.ServeConns(t, ln, func(c net.Conn) { io.Copy(c, c) })
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// refusing is a loopback address nothing listens on.
func refusing(t *testing.T) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return ap
}

func config(t *testing.T, cl string, attempts uint32) *Config {
	t.Helper()
	pb := single("s", cl)
	pb.MaxConnectAttempts = wrapperspb.UInt32(attempts)
	tp, err := Parse(pb, func(string) bool { return true }, nil)
	if err != nil {
		t.Fatal(err)
	}
	return tp
}

// Each attempt after a failed connect goes to a host not tried before:
// with a refusing and a listening host under RANDOM balancing, two
// attempts always reach the listening one (without the exclusion, one
// flow in four would try the refusing host twice and fail).
func TestConnectAttemptsExcludeTriedHosts(t *testing.T) {
	good, bad := echoServer(t), refusing(t)
	pb := xdstest.StaticCluster("c", bad, good)
	pb.LbPolicy = clusterv3.Cluster_RANDOM
	c := newCluster(t, pb)
	tp := config(t, "c", 2)
	for i := 0; i < 40; i++ {
		var e accesslog.Entry
		up, flags, err := tp.Connect(clusterMap{"c": c}, netip.AddrPort{}, &e)
		if err != nil {
			t.Fatalf("flow %d: %s %v, want a connection to %v", i, flags, err, good)
		}
		if up.Host().Address() != good || e.UpstreamHost != good || e.UpstreamCluster != "c" || !e.UpstreamLocal.IsValid() {
			t.Fatalf("flow %d: upstream %v, entry %+v", i, up.Host().Address(), e)
		}
		up.Close()
	}
	if fails := clusterStat(c, "upstream_cx_connect_fail"); fails == 0 || fails > 40 {
		t.Fatalf("upstream_cx_connect_fail = %d, want the refusing host tried at most once per flow (and at least once in 40)", fails)
	}
}

// Each way a connect fails maps to its Envoy response flag.
func TestConnectFlags(t *testing.T) {
	good := echoServer(t)
	full := xdstest.StaticCluster("full", good)
	full.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{
		{Priority: corev3.RoutingPriority_DEFAULT, MaxConnections: wrapperspb.UInt32(1)}}}
	clusters := clusterMap{
		"full":    newCluster(t, full),
		"empty":   newCluster(t, xdstest.StaticCluster("empty")),
		"refused": newCluster(t, xdstest.StaticCluster("refused", refusing(t))),
	}
	held, _, err := config(t, "full", 1).Connect(clusters, netip.AddrPort{}, &accesslog.Entry{})
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()

	for _, tc := range []struct{ cluster, flag, err string }{
		{"missing", "NC", "cluster not found"},
		{"full", "UO", "circuit breaker max_connections"},
		{"empty", "UH", "no healthy upstream"},
		{"refused", "UF", "refused"},
	} {
		tp := config(t, tc.cluster, 3)
		var e accesslog.Entry
		up, flag, err := tp.Connect(clusters, netip.AddrPort{}, &e)
		if up != nil || flag != tc.flag || err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%s: %v %q %v, want flag %s and an error containing %q", tc.cluster, up, flag, err, tc.flag, tc.err)
		}
		if e.UpstreamCluster != tc.cluster {
			t.Errorf("%s: entry names cluster %q", tc.cluster, e.UpstreamCluster)
		}
		if got, want := tp.Stats.DownstreamCxNoRoute.Load(), map[bool]uint64{true: 1}[tc.flag == "NC"]; got != want {
			t.Errorf("%s: downstream_cx_no_route = %d, want %d", tc.cluster, got, want)
		}
	}
	// max_connect_attempts 3: with every host tried, the exclusion yields
	// and the one host is tried again.
	if fails := clusterStat(clusters["refused"], "upstream_cx_connect_fail"); fails != 3 {
		t.Errorf("refused: %d connect failures, want 3 (max_connect_attempts)", fails)
	}
}

// serve runs Serve for a loopback downstream and an upstream connected
// to an echo server; it returns the client end and Serve's entry.
func serve(t *testing.T, tp *Config, closed context.Context) (client net.Conn, done <-chan accesslog.Entry) {
	t.Helper()
	c := newCluster(t, xdstest.StaticCluster("c", echoServer(t)))
	var e accesslog.Entry
	up, _, err := tp.Connect(clusterMap{"c": c}, netip.AddrPort{}, &e)
	if err != nil {
		t.Fatal(err)
	}
	client, down := pair(t)
	ch := make(chan accesslog.Entry, 1)
	go func() {
		tp.Serve(closed, down, up, &e)
		ch <- e
	}()
	return client, ch
}

func entry(t *testing.T, ch <-chan accesslog.Entry) accesslog.Entry {
	t.Helper()
	select {
	case e := <-ch:
		return e
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	return accesslog.Entry{}
}

func TestServeCountsBytes(t *testing.T) {
	tp := config(t, "c", 1)
	client, done := serve(t, tp, context.Background())
	msg := strings.Repeat("x", 1000)
	io.WriteString(client, msg)
	client.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(client)
	if err != nil || string(got) != msg {
		t.Fatalf("echo: %d bytes, %v", len(got), err)
	}
	e := entry(t, done)
	if e.BytesReceived != 1000 || e.BytesSent != 1000 || e.ResponseFlags != "-" || e.Details != "" {
		t.Fatalf("entry %+v, want 1000 bytes each way, no flag, no details", e)
	}
	st := tp.Stats
	if st.DownstreamCxTotal.Load() != 1 || st.DownstreamRxBytes.Load() != 1000 || st.DownstreamTxBytes.Load() != 1000 {
		t.Fatalf("tcp.s. counters: total %d rx %d tx %d", st.DownstreamCxTotal.Load(), st.DownstreamRxBytes.Load(), st.DownstreamTxBytes.Load())
	}
}

// A flow still open when its listener's drain ends is closed, and its log
// entry says why.
func TestServeClosedByListenerDrain(t *testing.T) {
	tp := config(t, "c", 1)
	closed, closeListener := context.WithCancel(context.Background())
	client, done := serve(t, tp, closed)
	io.WriteString(client, "ping")
	buf := make([]byte, 4)
	if _, err := io.ReadFull(client, buf); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-done:
		t.Fatalf("Serve returned before the drain: %+v", e)
	default:
	}
	closeListener()
	e := entry(t, done)
	if e.Details != "listener drained" || e.BytesReceived != 4 {
		t.Fatalf("entry %+v, want details \"listener drained\" and 4 bytes received", e)
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(buf); err == nil {
		t.Fatal("the client's connection is still open after the drain")
	}
}
