package cluster

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/upstream"
)

// server is a loopback TCP listener that counts accepted connections and
// remembers their remote addresses. It discards (or echoes) what it reads
// and closes a connection once the client closed it.
type server struct {
	ln      *net.TCPListener
	addr    netip.AddrPort
	accepts atomic.Int64
	echo    bool

	mu      sync.Mutex
	remotes []netip.AddrPort
	conns   []net.Conn
}

func startServer(t testing.TB, ip string, port uint16, echo bool) *server {
	t.Helper()
	ln, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(ip), port)))
	if err != nil {
		t.Fatalf("listen %s:%d: %v", ip, port, err)
	}
	s := &server{ln: ln, addr: ln.Addr().(*net.TCPAddr).AddrPort(), echo: echo}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.accepts.Add(1)
			s.mu.Lock()
			s.remotes = append(s.remotes, c.RemoteAddr().(*net.TCPAddr).AddrPort())
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			go func() {
				if s.echo {
					_, _ = io.Copy(c, c)
				} else {
					_, _ = io.Copy(io.Discard, c)
				}
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
	})
	return s
}

// closedPort returns an address on which nothing listens.
func closedPort(t testing.TB) netip.AddrPort {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return a
}

func hostsOf(servers ...*server) []xdstest.Endpoint {
	eps := make([]xdstest.Endpoint, len(servers))
	for i, s := range servers {
		eps[i] = xdstest.Endpoint{Addr: s.addr}
	}
	return eps
}

func newTestCluster(t testing.TB, pb *clusterv3.Cluster, opts ...func(*Options)) *Cluster {
	t.Helper()
	o := Options{Dialer: &upstream.Dialer{}, Log: zerolog.Nop()}
	for _, f := range opts {
		f(&o)
	}
	c, err := New(pb, o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func stat(t testing.TB, c *Cluster, name string) uint64 {
	t.Helper()
	v, ok := c.Stat(name)
	if !ok {
		t.Fatalf("no stat %q", name)
	}
	return v
}

func hostStat(h *Host, name string) uint64 {
	for _, s := range h.Stats() {
		if s.Name == name {
			return s.Value
		}
	}
	panic("no host stat " + name)
}

func mustConnect(t testing.TB, c *Cluster) *UpstreamConn {
	t.Helper()
	u, err := c.Connect(context.Background(), netip.AddrPort{}, nil)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	return u
}

// fakeResolver answers from a mutable table and records the networks asked.
type fakeResolver struct {
	mu       sync.Mutex
	answers  map[string][]netip.Addr // key: network + " " + name
	fail     map[string]bool         // by name
	networks []string
	lookups  atomic.Int64
}

func (r *fakeResolver) set(network, name string, addrs ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.answers == nil {
		r.answers = map[string][]netip.Addr{}
	}
	var as []netip.Addr
	for _, a := range addrs {
		as = append(as, netip.MustParseAddr(a))
	}
	r.answers[network+" "+name] = as
}

func (r *fakeResolver) setFail(name string, fail bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail == nil {
		r.fail = map[string]bool{}
	}
	r.fail[name] = fail
}

func (r *fakeResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	r.lookups.Add(1)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.networks = append(r.networks, network)
	if r.fail[host] {
		return nil, errors.New("fake: SERVFAIL")
	}
	a, ok := r.answers[network+" "+host]
	if !ok || len(a) == 0 {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return a, nil
}
