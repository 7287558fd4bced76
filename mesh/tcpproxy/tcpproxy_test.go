package tcpproxy

import (
	"strings"
	"testing"
	"time"

	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

var known = func(n string) bool { return n == "a" || n == "b" || n == "PassthroughCluster" }

func single(prefix, cl string) *tcpproxyv3.TcpProxy {
	return &tcpproxyv3.TcpProxy{StatPrefix: prefix, ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cl}}
}

func weighted(ws ...*tcpproxyv3.TcpProxy_WeightedCluster_ClusterWeight) *tcpproxyv3.TcpProxy {
	return &tcpproxyv3.TcpProxy{StatPrefix: "s", ClusterSpecifier: &tcpproxyv3.TcpProxy_WeightedClusters{
		WeightedClusters: &tcpproxyv3.TcpProxy_WeightedCluster{Clusters: ws}}}
}

func TestParse(t *testing.T) {
	pb := single("PassthroughCluster", "PassthroughCluster")
	pb.IdleTimeout, pb.MaxConnectAttempts = durationpb.New(5*time.Minute), wrapperspb.UInt32(3)
	var asked []string
	block := &Stats{Prefix: "tcp.PassthroughCluster."}
	tp, err := Parse(pb, known, func(p string) *Stats { asked = append(asked, p); return block })
	if err != nil {
		t.Fatal(err)
	}
	if tp.Cluster != "PassthroughCluster" || tp.IdleTimeout != 5*time.Minute || tp.MaxConnectAttempts != 3 || tp.StatPrefix != "PassthroughCluster" {
		t.Fatalf("tcp_proxy parsed as %+v", tp)
	}
	if tp.Stats != block || len(asked) != 1 || asked[0] != "tcp.PassthroughCluster." {
		t.Fatalf("stats %p from lookups %q, want the store's tcp.PassthroughCluster. block", tp.Stats, asked)
	}

	d, err := Parse(single("x", "a"), known, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d.MaxConnectAttempts != 1 || d.IdleTimeout != time.Hour {
		t.Fatalf("defaults %+v, want Envoy's 1 attempt and 1 h idle timeout", d)
	}
	if d.Stats == nil || d.Stats.Prefix != "tcp.x." {
		t.Fatalf("without a store: stats %+v, want a block of its own named tcp.x.", d.Stats)
	}
	off := single("x", "a")
	off.IdleTimeout = durationpb.New(0)
	if z, err := Parse(off, known, nil); err != nil || z.IdleTimeout != 0 {
		t.Fatalf("idle_timeout 0: %+v %v, want disabled (0), as Envoy", z, err)
	}
}

func TestParseErrors(t *testing.T) {
	onDemand := single("s", "a")
	onDemand.OnDemand = &tcpproxyv3.TcpProxy_OnDemand{}
	for _, tc := range []struct {
		name string
		pb   *tcpproxyv3.TcpProxy
		want string
	}{
		{"unknown cluster", single("s", "nope"), `cluster: "nope" is not a known cluster`},
		{"empty stat_prefix", single("", "a"), "StatPrefix"},
		{"unknown weighted cluster", weighted(&tcpproxyv3.TcpProxy_WeightedCluster_ClusterWeight{Name: "a", Weight: 1}, &tcpproxyv3.TcpProxy_WeightedCluster_ClusterWeight{Name: "nope", Weight: 1}),
			`weighted_clusters.clusters[1].name: "nope" is not a known cluster`},
		{"zero weights", weighted(&tcpproxyv3.TcpProxy_WeightedCluster_ClusterWeight{Name: "a"}, &tcpproxyv3.TcpProxy_WeightedCluster_ClusterWeight{Name: "b"}),
			"Weight: value must be greater than or equal to 1"},
		{"no cluster", &tcpproxyv3.TcpProxy{StatPrefix: "s"}, "ClusterSpecifier"},
		{"on_demand", onDemand, "on_demand and tunneling_config are not supported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			called := false
			_, err := Parse(tc.pb, known, func(p string) *Stats { called = true; return &Stats{Prefix: p} })
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
			if called {
				t.Fatal("an invalid config looked up a stats block (it would keep the name alive in the store)")
			}
		})
	}
}

func TestWeightedClusterPick(t *testing.T) {
	tp, err := Parse(weighted(
		&tcpproxyv3.TcpProxy_WeightedCluster_ClusterWeight{Name: "a", Weight: 75},
		&tcpproxyv3.TcpProxy_WeightedCluster_ClusterWeight{Name: "b", Weight: 25}), known, nil)
	if err != nil {
		t.Fatal(err)
	}
	// r sweeps [0, 2^32) in equal steps: exactly 75% must land on "a".
	counts := map[string]int{}
	for i := uint32(0); i < 4096; i++ {
		counts[tp.pickCluster(i<<20)]++
	}
	if counts["a"] != 3072 || counts["b"] != 1024 {
		t.Fatalf("split %v, want 3072/1024", counts)
	}
}
