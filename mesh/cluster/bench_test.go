package cluster

import (
	"io"
	"net"
	"net/netip"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
)

func benchCluster(b *testing.B, lb clusterv3.Cluster_LbPolicy, weights ...uint32) *Cluster {
	var eps []xdstest.Endpoint
	for i, w := range weights {
		eps = append(eps, xdstest.Endpoint{Addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(1000+i)), Weight: w})
	}
	return newTestCluster(b, xdstest.Cluster("bench", xdstest.WithLB(lb), xdstest.WithEndpoints(eps...)))
}

// BenchmarkPickRoundRobin is the per-connection host choice: one atomic
// pointer load, one atomic add, no lock, no allocation.
func BenchmarkPickRoundRobin(b *testing.B) {
	for _, bc := range []struct {
		name    string
		weights []uint32
	}{
		{"equal3", []uint32{1, 1, 1}},
		{"weighted16", []uint32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			c := benchCluster(b, clusterv3.Cluster_ROUND_ROBIN, bc.weights...)
			b.ReportAllocs()
			for b.Loop() {
				if c.pick(netip.AddrPort{}, nil) == nil {
					b.Fatal("no host")
				}
			}
		})
	}
	b.Run("equal3-parallel", func(b *testing.B) {
		c := benchCluster(b, clusterv3.Cluster_ROUND_ROBIN, 1, 1, 1)
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				c.pick(netip.AddrPort{}, nil)
			}
		})
	})
}

func BenchmarkPickLeastRequest(b *testing.B) {
	c := benchCluster(b, clusterv3.Cluster_LEAST_REQUEST, 1, 1, 1, 1, 1, 1, 1, 1)
	b.ReportAllocs()
	for b.Loop() {
		c.pick(netip.AddrPort{}, nil)
	}
}

// BenchmarkUpstreamConnReadWrite compares a 16 KiB write+read round trip
// through an echo server on a raw *net.TCPConn and on an UpstreamConn (one
// atomic add per Read and per Write). "counter-parallel" is the cost of
// the shared byte counter alone under contention from all Ps.
func BenchmarkUpstreamConnReadWrite(b *testing.B) {
	s := startServer(b, "127.0.0.1", 0, true)
	c := newTestCluster(b, xdstest.Cluster("bench", xdstest.WithEndpoints(hostsOf(s)...)))
	buf := make([]byte, 16<<10)
	run := func(b *testing.B, conn net.Conn) {
		b.SetBytes(int64(len(buf)))
		b.ReportAllocs()
		for b.Loop() {
			if _, err := conn.Write(buf); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(conn, buf); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("raw", func(b *testing.B) {
		u := mustConnect(b, c)
		defer u.Close()
		run(b, u.TCPConn())
	})
	b.Run("counted", func(b *testing.B) {
		u := mustConnect(b, c)
		defer u.Close()
		run(b, u)
	})
	b.Run("counter-parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				c.stats.rxBytes.Add(1)
			}
		})
	})
}

// BenchmarkEDSUpdateSocketMatches is an unchanged EDS update of 1,000
// endpoints on a cluster with istiod's transport socket matches: the
// transport choice is resolved once per distinct label set and an
// endpoint whose choice is unchanged costs no copy of its metadata.
func BenchmarkEDSUpdateSocketMatches(b *testing.B) {
	c := newTestCluster(b, xdstest.Cluster("eds", xdstest.WithEDS(),
		xdstest.WithSocketMatches(append([]*clusterv3.Cluster_TransportSocketMatch{xdstest.HBONEMatch()},
			xdstest.IstioSocketMatches(xdstest.RawBufferSocket())...)...)))
	eps := make([]xdstest.Endpoint, 1000)
	for i := range eps {
		eps[i] = xdstest.Endpoint{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 80)}
		if i%2 == 0 {
			eps[i].SocketMatch = xdstest.IstioTLS
		}
	}
	e, err := ParseEndpoints(xdstest.AssignmentOf("eds", eps...))
	if err != nil {
		b.Fatal(err)
	}
	s, _ := c.Stage(e)
	s.Commit()
	b.ReportAllocs()
	for b.Loop() {
		s, _ := c.Stage(e)
		s.Commit()
	}
}
