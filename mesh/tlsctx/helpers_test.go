package tlsctx

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/meshtun/meshtun/internal/leakcheck"
	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/mesh/secrets"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

const (
	clientID = "spiffe://cluster.local/ns/default/sa/client"
	serverID = "spiffe://cluster.local/ns/default/sa/server"
)

// newStore is a store referencing default and ROOTCA, holding secs.
func newStore(t testing.TB, secs ...*tlsv3.Secret) *secrets.Store {
	t.Helper()
	s := secrets.NewStore()
	src := secrets.Source{Cluster: "sds-grpc"}
	s.SetRefs(&secrets.Refs{Names: map[string]secrets.Source{"default": src, "ROOTCA": src}})
	for _, sec := range secs {
		put(t, s, sec)
	}
	return s
}

func put(t testing.TB, s *secrets.Store, sec *tlsv3.Secret) {
	t.Helper()
	if err := s.Put(time.Now().Format(time.RFC3339Nano), sec, time.Now()); err != nil {
		t.Fatal(err)
	}
}

// side is one workload: its CA, leaf and store (default + ROOTCA).
type side struct {
	ca    *testpki.CA
	leaf  *testpki.Leaf
	store *secrets.Store
}

func newSide(t testing.TB, ca *testpki.CA, id string) *side {
	l := ca.Leaf(t, id, testpki.LeafOpts{})
	return &side{ca: ca, leaf: l, store: newStore(t, l.Secret("default"), ca.RootSecret("ROOTCA"))}
}

func mustUp(t testing.TB, store *secrets.Store, ctx *tlsv3.UpstreamTlsContext, st *Stats) *Upstream {
	t.Helper()
	u, err := ParseUpstream("test.transport_socket", testpki.Socket(ctx), store, st)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func mustDown(t testing.TB, store *secrets.Store, ctx *tlsv3.DownstreamTlsContext, st *Stats) *Downstream {
	t.Helper()
	d, err := ParseDownstream("test.transport_socket", testpki.Socket(ctx), store, st)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// istioUp is istiod's tlsMode-istio UpstreamTlsContext for sans.
func istioUp(sni string, sans ...string) *tlsv3.UpstreamTlsContext {
	var uc tlsv3.UpstreamTlsContext
	if err := testpki.UpstreamSocket(sni, sans...).GetTypedConfig().UnmarshalTo(&uc); err != nil {
		panic(err)
	}
	return &uc
}

// istioDown is istiod's inbound mTLS DownstreamTlsContext.
func istioDown(alpn ...string) *tlsv3.DownstreamTlsContext {
	var dc tlsv3.DownstreamTlsContext
	if err := testpki.DownstreamSocket(alpn...).GetTypedConfig().UnmarshalTo(&dc); err != nil {
		panic(err)
	}
	return &dc
}

// loopback is a connected TCP pair.
func loopback(t testing.TB) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type acc struct {
		c   net.Conn
		err error
	}
	ch := make(chan acc, 1)
	go func() { c, err := ln.Accept(); ch <- acc{c, err} }()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a := <-ch
	if a.err != nil {
		t.Fatal(a.err)
	}
	return client, a.c
}

// result is both ends of one handshake; after a successful one each side
// has sent the other a byte, so TLS 1.3 session tickets have arrived.
type result struct {
	client    *tls.Conn
	clientErr error
	server    *tls.Conn
	serverErr error
}

func (r result) close() {
	if r.client != nil {
		r.client.Close()
	}
	if r.server != nil {
		r.server.Close()
	}
}

func handshake(t testing.TB, u *Upstream, appProto string, d *Downstream) result {
	t.Helper()
	c, s := loopback(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan struct{})
	var r result
	go func() {
		defer close(done)
		r.server, r.serverErr = d.Handshake(ctx, s)
		if r.serverErr == nil {
			r.serverErr = exchange(r.server, 's')
		}
	}()
	cc, err := u.Secure(ctx, c, appProto)
	r.clientErr = err
	if err == nil {
		r.client = cc.(*tls.Conn)
		r.clientErr = exchange(r.client, 'c')
	}
	<-done
	t.Cleanup(r.close)
	return r
}

// exchange writes b and reads the peer's byte.
func exchange(c *tls.Conn, b byte) error {
	if _, err := c.Write([]byte{b}); err != nil {
		return err
	}
	var got [1]byte
	_, err := io.ReadFull(c, got[:])
	return err
}

// reason is err's HandshakeError reason, failing if it is not one.
func reason(t testing.TB, err error) string {
	t.Helper()
	var he *HandshakeError
	if !errors.As(err, &he) {
		t.Fatalf("error %v (%T) is not a *HandshakeError", err, err)
	}
	return he.Reason
}

// stat is the counter name of st (0 if not listed).
func stat(st *Stats, name string) uint64 {
	for _, s := range st.List() {
		if s.Name == name {
			return s.Value
		}
	}
	return 0
}

func wantStats(t testing.TB, who string, st *Stats, want map[string]uint64) {
	t.Helper()
	for name, v := range want {
		if got := stat(st, name); got != v {
			var all []string
			for _, s := range st.List() {
				if s.Value > 0 {
					all = append(all, s.Name)
				}
			}
			t.Errorf("%s: %s = %d, want %d (non-zero: %s)", who, name, got, v, strings.Join(all, " "))
		}
	}
}
