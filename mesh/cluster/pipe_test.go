package cluster

import (
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/mesh/upstream"
)

// pipeCluster is a cluster of typ with one pipe endpoint at path, shaped as
// the sds-grpc and xds-grpc clusters of Istio's bootstrap.
func pipeCluster(name string, typ clusterv3.Cluster_DiscoveryType, path string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: path}}}}}}},
		}}},
	}
}

// TestPipeHost: a STATIC cluster's pipe endpoint is a host named by its
// path that Connect dials as a Unix socket, with the same accounting as a
// TCP host (bytes, cx_active, cx_destroy); half-close and Reset work on it.
func TestPipeHost(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sds.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()

	c := newTestCluster(t, pipeCluster("sds-grpc", clusterv3.Cluster_STATIC, path))
	hs := c.Hosts()
	if len(hs) != 1 || hs[0].Pipe() != path || hs[0].String() != path || hs[0].Address().IsValid() {
		t.Fatalf("hosts = %v, want one pipe host %q", hs, path)
	}
	u := mustConnect(t, c)
	if u.TCPConn() != nil {
		t.Error("TCPConn of a pipe host is not nil")
	}
	if _, err := u.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if err := u.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	got, err := io.ReadAll(u)
	if err != nil || string(got) != "ping" {
		t.Fatalf("echo = %q, %v", got, err)
	}
	if v := stat(t, c, "upstream_cx_active"); v != 1 {
		t.Errorf("upstream_cx_active = %d, want 1", v)
	}
	u.Reset()
	if v := stat(t, c, "upstream_cx_active"); v != 0 {
		t.Errorf("upstream_cx_active = %d after Reset", v)
	}
	if v := stat(t, c, "upstream_cx_rx_bytes_total"); v != 4 {
		t.Errorf("upstream_cx_rx_bytes_total = %d, want 4", v)
	}

	// A socket nobody listens on: a connect failure naming the path.
	gone := newTestCluster(t, pipeCluster("xds-grpc", clusterv3.Cluster_STATIC, filepath.Join(t.TempDir(), "XDS")))
	if _, err := gone.ConnectHost(t.Context(), gone.Hosts()[0]); err == nil || !strings.Contains(err.Error(), "/XDS") {
		t.Errorf("connect to a missing socket: %v, want an error naming its path", err)
	}
	if v := stat(t, gone, "upstream_cx_connect_fail"); v != 1 {
		t.Errorf("upstream_cx_connect_fail = %d, want 1", v)
	}
}

// TestPipeRejected: pipe endpoints only in STATIC clusters (as Envoy:
// STRICT_DNS resolves names, EDS hosts are IPs), and never an empty path.
func TestPipeRejected(t *testing.T) {
	for _, tc := range []struct {
		pb   *clusterv3.Cluster
		want string
	}{
		{pipeCluster("dns", clusterv3.Cluster_STRICT_DNS, "/x"), "pipe addresses are not supported in STRICT_DNS clusters"},
		{pipeCluster("eds", clusterv3.Cluster_EDS, "/x"), "only supported in STATIC clusters"},
	} {
		if tc.pb.GetType() == clusterv3.Cluster_EDS {
			tc.pb.EdsClusterConfig = &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
				ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}}
		}
		_, err := New(tc.pb, Options{Dialer: &upstream.Dialer{}, Log: zerolog.Nop()})
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.pb.GetName()) {
			t.Errorf("%s: New = %v, want an error containing %q", tc.pb.GetName(), err, tc.want)
		}
	}
	cla := pipeCluster("eds", clusterv3.Cluster_EDS, "/x").GetLoadAssignment()
	if _, err := ParseEndpoints(cla); err == nil || !strings.Contains(err.Error(), "only STATIC clusters") {
		t.Errorf("EDS assignment with a pipe: %v", err)
	}
}
