package mesh

import (
	"io"
	"net"
	"net/netip"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/netstack"
)

// BenchmarkServeFlowTCP is one short tcp_proxy flow through a listener,
// from the chain match to the upstream closing: a loopback client and
// echo upstream, one byte each way. Most of its time and allocations are
// the kernel sockets; what it guards is the proxy's own share (chain
// match, connect, splice) across refactors, old and new run alternately.
func BenchmarkServeFlowTCP(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	xdstest.ServeConns(b, ln, func(c net.Conn) { io.Copy(c, c) })
	echo := netip.MustParseAddrPort(ln.Addr().String())

	l := xdstest.TCPListener(b, "l", "0.0.0.0", 9000, "echo", false)
	s, err := Build("1", []*listenerv3.Listener{l}, []*clusterv3.Cluster{xdstest.StaticCluster("echo", echo)}, nil, buildOpts())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Retire(nil)
	d := &Dispatcher{}
	d.Swap(s)
	front, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer front.Close()
	fid := netstack.FlowID{Src: netip.MustParseAddrPort("10.0.0.2:40000"), Dst: netip.MustParseAddrPort("10.96.0.1:9000")}
	buf := make([]byte, 1)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		client, err := net.Dial("tcp", front.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		down, err := front.Accept()
		if err != nil {
			b.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			var e accesslog.Entry
			serveFlow(s, s.Listener("l"), &accepted{conn: down, fid: fid}, &e, d)
			close(done)
		}()
		client.Write([]byte{1})
		if _, err := io.ReadFull(client, buf); err != nil {
			b.Fatal(err)
		}
		client.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, client)
		client.Close()
		<-done
	}
}
