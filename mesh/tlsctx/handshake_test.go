package tlsctx

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/testpki"
)

// TestMutualTLSIstioShapes: istiod's outbound and inbound contexts talk to
// each other; both sides see the other's SPIFFE identity and count a
// handshake with its version, cipher and curve.
func TestMutualTLSIstioShapes(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	var ust, dst Stats
	u := mustUp(t, cl.store, istioUp("outbound_.80_._.server.default.svc.cluster.local", serverID), &ust)
	d := mustDown(t, sv.store, istioDown("h2", "http/1.1"), &dst)
	r := handshake(t, u, "", d)
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatalf("client: %v, server: %v", r.clientErr, r.serverErr)
	}
	scs, ccs := r.server.ConnectionState(), r.client.ConnectionState()
	if scs.ServerName != "outbound_.80_._.server.default.svc.cluster.local" {
		t.Errorf("SNI = %q", scs.ServerName)
	}
	if ccs.NegotiatedProtocol != "" {
		t.Errorf("TCP client offering istio got ALPN %q from an HTTP chain, want none", ccs.NegotiatedProtocol)
	}
	p, ok := PeerOf(scs)
	if !ok || !slices.Equal(p.URISANs, []string{clientID}) {
		t.Fatalf("server's peer = %+v, %v; want %s", p.URISANs, ok, clientID)
	}
	h := sha256.Sum256(cl.leaf.Cert.Raw)
	if p.Hash != hex.EncodeToString(h[:]) || p.Serial != cl.leaf.Cert.SerialNumber.Text(16) || p.Cert != scs.PeerCertificates[0] {
		t.Errorf("peer hash/serial = %s/%s, want the client leaf's", p.Hash, p.Serial)
	}
	if p, _ := PeerOf(ccs); !slices.Equal(p.URISANs, []string{serverID}) {
		t.Errorf("client's peer = %v, want %s", p.URISANs, serverID)
	}
	if got := LocalURISAN(scs); got != serverID {
		t.Errorf("LocalURISAN(server side) = %q, want %q", got, serverID)
	}
	if got := LocalURISAN(ccs); got != "" {
		t.Errorf("LocalURISAN(client side) = %q, want \"\" (only server connections are known)", got)
	}
	if _, ok := PeerOf(tls.ConnectionState{}); ok {
		t.Error("PeerOf(no certificate) reported a peer")
	}
	for who, st := range map[string]*Stats{"client": &ust, "server": &dst} {
		wantStats(t, who, st, map[string]uint64{"handshake": 1, "versions.TLSv1.3": 1, "connection_error": 0,
			"ciphers.TLS_AES_128_GCM_SHA256": 1, "no_certificate": 0})
		if curves := slices.DeleteFunc(st.List(), func(s Stat) bool { return !strings.HasPrefix(s.Name, "curves.") }); len(curves) != 1 {
			t.Errorf("%s: curves counters %v, want exactly one", who, curves)
		}
	}
}

// offered returns the ALPN list a Secure with appProto offers, seen by a
// plain crypto/tls server that accepts anything.
func offered(t *testing.T, alpn []string, appProto string) []string {
	t.Helper()
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	uc := istioUp("sni", serverID)
	uc.CommonTlsContext.AlpnProtocols = alpn
	u := mustUp(t, cl.store, uc, nil)
	c, s := loopback(t)
	defer c.Close()
	defer s.Close()
	got := make(chan []string, 1)
	srv := tls.Server(s, &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		got <- slices.Clone(h.SupportedProtos)
		return nil, errors.New("seen")
	}})
	go srv.Handshake()
	if _, err := u.Secure(context.Background(), c, appProto); err == nil {
		t.Fatal("handshake against the refusing server succeeded")
	}
	_ = sv
	return <-got
}

// TestUpstreamALPN: istio-peer-exchange is never offered; HTTP pools get
// istio.alpn's lists when the context offers istio, their own protocol
// when it offers nothing.
func TestUpstreamALPN(t *testing.T) {
	istiod := []string{"istio-peer-exchange", "istio"}
	for _, tc := range []struct {
		alpn     []string
		appProto string
		want     []string
	}{
		{istiod, "", []string{"istio"}},
		{istiod, "http/1.1", []string{"istio-http/1.1", "istio", "http/1.1"}},
		{istiod, "h2", []string{"istio-h2", "istio", "h2"}},
		{[]string{"istio-peer-exchange", "istio", "h2"}, "h2", []string{"istio-h2", "istio", "h2"}},
		{nil, "", nil},
		{nil, "h2", []string{"h2"}},
		{[]string{"h2", "http/1.1"}, "http/1.1", []string{"h2", "http/1.1"}},
		{[]string{"istio-peer-exchange"}, "", nil},
	} {
		if got := offered(t, tc.alpn, tc.appProto); !slices.Equal(got, tc.want) {
			t.Errorf("alpn %v, app %q: offered %q, want %q", tc.alpn, tc.appProto, got, tc.want)
		}
	}
}

// TestDownstreamALPN: the server picks in its own order, never
// istio-peer-exchange, and proceeds without ALPN when nothing overlaps.
func TestDownstreamALPN(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	for _, tc := range []struct {
		server, client []string
		want           string
	}{
		{[]string{"istio-peer-exchange", "h2", "http/1.1"}, []string{"istio-peer-exchange", "istio"}, ""},
		{[]string{"istio-peer-exchange", "h2", "http/1.1"}, []string{"istio-peer-exchange"}, ""},
		{[]string{"istio-peer-exchange", "h2", "http/1.1"}, []string{"istio-peer-exchange", "h2"}, "h2"},
		{[]string{"h2", "http/1.1"}, []string{"istio-http/1.1", "istio", "http/1.1"}, "http/1.1"},
		{[]string{"h2", "http/1.1"}, []string{"http/1.1", "h2"}, "h2"},
		{[]string{"h2", "http/1.1"}, []string{"istio"}, ""},
		{nil, []string{"h2"}, ""},
	} {
		d := mustDown(t, sv.store, istioDown(tc.server...), nil)
		c, s := loopback(t)
		type res struct {
			conn *tls.Conn
			err  error
		}
		ch := make(chan res, 1)
		go func() { tc, err := d.Handshake(context.Background(), s); ch <- res{tc, err} }()
		cli := tls.Client(c, &tls.Config{InsecureSkipVerify: true, NextProtos: tc.client,
			Certificates: []tls.Certificate{cl.leaf.TLS}})
		err := cli.Handshake()
		sr := <-ch
		if err != nil || sr.err != nil {
			t.Fatalf("server %v, client %v: client %v, server %v", tc.server, tc.client, err, sr.err)
		}
		if got := cli.ConnectionState().NegotiatedProtocol; got != tc.want {
			t.Errorf("server %v, client %v: ALPN %q, want %q", tc.server, tc.client, got, tc.want)
		}
		if got := sr.conn.ConnectionState().NegotiatedProtocol; got != tc.want {
			t.Errorf("server %v, client %v: server sees ALPN %q, want %q", tc.server, tc.client, got, tc.want)
		}
		cli.Close()
		sr.conn.Close()
	}
}

// TestHTTPPoolsOverIstioALPN: an HTTP pool's rewritten offer meets
// istiod's HTTP chain ALPN and gets its protocol.
func TestHTTPPoolsOverIstioALPN(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	u := mustUp(t, cl.store, istioUp("sni", serverID), nil)
	d := mustDown(t, sv.store, istioDown("h2", "http/1.1"), nil)
	for _, app := range []string{"h2", "http/1.1"} {
		r := handshake(t, u, app, d)
		if r.clientErr != nil || r.serverErr != nil {
			t.Fatalf("%s: client %v, server %v", app, r.clientErr, r.serverErr)
		}
		if got := r.client.ConnectionState().NegotiatedProtocol; got != app {
			t.Errorf("pool %s negotiated %q", app, got)
		}
	}
}

// TestVerifyFailures: each refusal has its reason and counter, on the side
// that refused, and connection_error on both.
func TestVerifyFailures(t *testing.T) {
	ca, other := testpki.NewCA(t), testpki.NewCA(t)
	cl := newSide(t, ca, clientID)
	for _, tc := range []struct {
		name       string
		serverLeaf *testpki.Leaf
		sans       []string
		reason     string
		counter    string
	}{
		{"san mismatch", ca.Leaf(t, "spiffe://cluster.local/ns/default/sa/impostor", testpki.LeafOpts{}), []string{serverID},
			"verify SAN: peer SANs (URI:spiffe://cluster.local/ns/default/sa/impostor)", "fail_verify_san"},
		{"untrusted root", other.Leaf(t, serverID, testpki.LeafOpts{}), []string{serverID},
			"verify chain: x509: certificate signed by unknown authority", "fail_verify_error"},
		{"expired", ca.Leaf(t, serverID, testpki.LeafOpts{NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)}),
			[]string{serverID}, "verify chain: x509: certificate has expired", "fail_verify_error"},
		{"not yet valid", ca.Leaf(t, serverID, testpki.LeafOpts{NotBefore: time.Now().Add(time.Hour)}),
			[]string{serverID}, "verify chain: x509: certificate has expired or is not yet valid", "fail_verify_error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ust, dst Stats
			u := mustUp(t, cl.store, istioUp("sni", tc.sans...), &ust)
			d := mustDown(t, newStore(t, tc.serverLeaf.Secret("default"), ca.RootSecret("ROOTCA")), istioDown(), &dst)
			r := handshake(t, u, "", d)
			if r.clientErr == nil {
				t.Fatal("handshake succeeded")
			}
			if got := reason(t, r.clientErr); !strings.HasPrefix(got, tc.reason) {
				t.Errorf("reason %q, want prefix %q", got, tc.reason)
			}
			wantStats(t, "client", &ust, map[string]uint64{tc.counter: 1, "connection_error": 1, "handshake": 0})
			if r.serverErr == nil {
				t.Error("server completed a handshake the client refused")
			}
			wantStats(t, "server", &dst, map[string]uint64{"connection_error": 1, "handshake": 0})
		})
	}
}

// TestClientCertificate: require_client_certificate refuses a client with
// no certificate (fail_verify_no_cert); without it the connection is
// accepted and counted as no_certificate; a client from another CA fails.
func TestClientCertificate(t *testing.T) {
	ca := testpki.NewCA(t)
	sv := newSide(t, ca, serverID)
	noCert := istioUp("sni", serverID)
	noCert.CommonTlsContext.TlsCertificateSdsSecretConfigs = nil
	rootsOnly := newStore(t, ca.RootSecret("ROOTCA"))

	var dst Stats
	tls12 := proto.Clone(noCert).(*tlsv3.UpstreamTlsContext)
	tls12.CommonTlsContext.TlsParams = nil // Envoy's client default: TLS 1.2 at most
	for _, uc := range []*tlsv3.UpstreamTlsContext{noCert, tls12} {
		dst = Stats{}
		r := handshake(t, mustUp(t, rootsOnly, uc, nil), "", mustDown(t, sv.store, istioDown(), &dst))
		if r.serverErr == nil {
			t.Fatal("server accepted a client without a certificate under require_client_certificate")
		}
		if got := reason(t, r.serverErr); !strings.Contains(got, "no certificate (require_client_certificate)") {
			t.Errorf("server reason %q", got)
		}
		wantStats(t, "server", &dst, map[string]uint64{"fail_verify_no_cert": 1, "connection_error": 1, "handshake": 0})
	}

	optional := istioDown()
	optional.RequireClientCertificate = wrapperspb.Bool(false)
	dst = Stats{}
	r := handshake(t, mustUp(t, rootsOnly, noCert, nil), "", mustDown(t, sv.store, optional, &dst))
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatalf("optional client certificate: client %v, server %v", r.clientErr, r.serverErr)
	}
	wantStats(t, "server", &dst, map[string]uint64{"no_certificate": 1, "handshake": 1})
	if LocalURISAN(r.server.ConnectionState()) != "" {
		t.Error("LocalURISAN set without a client certificate")
	}

	// A client certificate that is given is verified even when optional.
	other := testpki.NewCA(t)
	stranger := newStore(t, other.Leaf(t, clientID, testpki.LeafOpts{}).Secret("default"), ca.RootSecret("ROOTCA"))
	dst = Stats{}
	r = handshake(t, mustUp(t, stranger, istioUp("sni", serverID), nil), "", mustDown(t, sv.store, optional, &dst))
	if r.serverErr == nil {
		t.Fatal("server accepted a client certificate from an unknown CA")
	}
	wantStats(t, "server", &dst, map[string]uint64{"fail_verify_error": 1, "no_certificate": 0})

	// The inbound SAN matcher (prefix spiffe://cluster.local/) refuses
	// another trust domain.
	dst = Stats{}
	foreign := newStore(t, ca.Leaf(t, "spiffe://other.domain/ns/x/sa/y", testpki.LeafOpts{}).Secret("default"), ca.RootSecret("ROOTCA"))
	r = handshake(t, mustUp(t, foreign, istioUp("sni", serverID), nil), "", mustDown(t, sv.store, istioDown(), &dst))
	if r.serverErr == nil {
		t.Fatal("server accepted spiffe://other.domain")
	}
	wantStats(t, "server", &dst, map[string]uint64{"fail_verify_san": 1})
}

// TestMissingSecret: a secret not yet received fails the handshake with a
// reason naming it, on either side.
func TestMissingSecret(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	noRoot := newStore(t, cl.leaf.Secret("default"))
	r := handshake(t, mustUp(t, noRoot, istioUp("sni", serverID), nil), "", mustDown(t, sv.store, istioDown(), nil))
	if r.clientErr == nil || !strings.Contains(reason(t, r.clientErr), `validation secret "ROOTCA" not ready`) {
		t.Errorf("client without ROOTCA: %v", r.clientErr)
	}
	noCert := newStore(t, ca.RootSecret("ROOTCA"))
	r = handshake(t, mustUp(t, cl.store, istioUp("sni", serverID), nil), "", mustDown(t, noCert, istioDown(), nil))
	if r.serverErr == nil || !strings.Contains(reason(t, r.serverErr), `certificate secret "default" not ready`) {
		t.Errorf("server without default: %v", r.serverErr)
	}
}

// TestRotationReachesNextHandshake: a new default secret is presented by
// the next handshake; the open connection keeps its certificate.
func TestRotationReachesNextHandshake(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	uc := istioUp("sni", serverID)
	uc.MaxSessionKeys = wrapperspb.UInt32(0) // a full handshake each time
	u := mustUp(t, cl.store, uc, nil)
	d := mustDown(t, sv.store, istioDown(), nil)
	first := handshake(t, u, "", d)
	if first.clientErr != nil {
		t.Fatal(first.clientErr)
	}
	next := ca.Leaf(t, serverID, testpki.LeafOpts{})
	put(t, sv.store, next.Secret("default"))
	second := handshake(t, u, "", d)
	if second.clientErr != nil {
		t.Fatal(second.clientErr)
	}
	if got := second.client.ConnectionState().PeerCertificates[0].SerialNumber; got.Cmp(next.Cert.SerialNumber) != 0 {
		t.Errorf("after rotation the server presented serial %x, want the new %x", got, next.Cert.SerialNumber)
	}
	if got := first.client.ConnectionState().PeerCertificates[0].SerialNumber; got.Cmp(sv.leaf.Cert.SerialNumber) != 0 {
		t.Errorf("the open connection's peer serial changed to %x", got)
	}
	// The connection opened before the rotation still carries data.
	if _, err := first.client.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := exchange(first.server, 'y'); err != nil {
		t.Errorf("server end of the connection opened before the rotation: %v", err)
	}
	var b [1]byte
	if _, err := first.client.Read(b[:]); err != nil || b[0] != 'y' {
		t.Errorf("client end of the connection opened before the rotation: %q, %v", b, err)
	}
}

// TestResumedSessionReverified: the second connection resumes
// (session_reused on both sides); once the client's trust bundle no longer
// holds the server's CA, the resumed session is refused too, because the
// checks run in VerifyConnection.
func TestResumedSessionReverified(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	var ust, dst Stats
	u := mustUp(t, cl.store, istioUp("sni", serverID), &ust)
	d := mustDown(t, sv.store, istioDown(), &dst)
	for i := 0; i < 2; i++ {
		if r := handshake(t, u, "", d); r.clientErr != nil || r.serverErr != nil {
			t.Fatalf("handshake %d: client %v, server %v", i, r.clientErr, r.serverErr)
		} else if r.client.ConnectionState().DidResume != (i == 1) {
			t.Fatalf("handshake %d: DidResume = %v", i, !(i == 1))
		}
	}
	wantStats(t, "client", &ust, map[string]uint64{"handshake": 2, "session_reused": 1})
	wantStats(t, "server", &dst, map[string]uint64{"handshake": 2, "session_reused": 1})

	put(t, cl.store, testpki.NewCA(t).RootSecret("ROOTCA"))
	r := handshake(t, u, "", d)
	if r.clientErr == nil {
		t.Fatal("resumed session accepted after the root was replaced")
	}
	if got := reason(t, r.clientErr); !strings.HasPrefix(got, "verify chain:") {
		t.Errorf("reason %q", got)
	}
	wantStats(t, "client", &ust, map[string]uint64{"fail_verify_error": 1, "session_reused": 1})
}

// TestNoResumptionWithZeroKeys: max_session_keys 0 disables resumption.
func TestNoResumptionWithZeroKeys(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	uc := istioUp("sni", serverID)
	uc.MaxSessionKeys = wrapperspb.UInt32(0)
	var ust Stats
	u := mustUp(t, cl.store, uc, &ust)
	d := mustDown(t, sv.store, istioDown(), nil)
	for i := 0; i < 2; i++ {
		if r := handshake(t, u, "", d); r.clientErr != nil {
			t.Fatal(r.clientErr)
		}
	}
	wantStats(t, "client", &ust, map[string]uint64{"handshake": 2, "session_reused": 0})
}

// TestStatelessResumptionDisabled: disable_stateless_session_resumption
// stops the server issuing tickets, so nothing resumes.
func TestStatelessResumptionDisabled(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	dc := istioDown()
	dc.SessionTicketKeysType = &tlsv3.DownstreamTlsContext_DisableStatelessSessionResumption{DisableStatelessSessionResumption: true}
	var dst Stats
	u := mustUp(t, cl.store, istioUp("sni", serverID), nil)
	d := mustDown(t, sv.store, dc, &dst)
	for i := 0; i < 2; i++ {
		if r := handshake(t, u, "", d); r.clientErr != nil || r.serverErr != nil {
			t.Fatalf("client %v, server %v", r.clientErr, r.serverErr)
		}
	}
	wantStats(t, "server", &dst, map[string]uint64{"handshake": 2, "session_reused": 0})
}

// TestIntermediateChain: a leaf issued by an intermediate, which it sends,
// verifies against the root alone.
func TestIntermediateChain(t *testing.T) {
	ca := testpki.NewCA(t)
	mid := ca.Intermediate(t)
	cl := newSide(t, ca, clientID)
	leaf := ca.Leaf(t, serverID, testpki.LeafOpts{Intermediate: mid})
	d := mustDown(t, newStore(t, leaf.Secret("default"), ca.RootSecret("ROOTCA")), istioDown(), nil)
	r := handshake(t, mustUp(t, cl.store, istioUp("sni", serverID), nil), "", d)
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatalf("client %v, server %v", r.clientErr, r.serverErr)
	}
	if n := len(r.client.ConnectionState().PeerCertificates); n < 2 {
		t.Errorf("server sent %d certificates, want the intermediate too", n)
	}
}

// TestHandshakeBoundedByContext: a peer that never answers ends the
// handshake when ctx does, with a HandshakeError.
func TestHandshakeBoundedByContext(t *testing.T) {
	ca := testpki.NewCA(t)
	cl := newSide(t, ca, clientID)
	c, s := net.Pipe()
	defer s.Close()
	go func() { // swallow the ClientHello, answer nothing
		buf := make([]byte, 4096)
		for {
			if _, err := s.Read(buf); err != nil {
				return
			}
		}
	}()
	var st Stats
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := mustUp(t, cl.store, istioUp("sni", serverID), &st).Secure(ctx, c, "")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the context's deadline", err)
	}
	reason(t, err)
	wantStats(t, "client", &st, map[string]uint64{"connection_error": 1})
}

// TestTLSParams: cipher_suites, ecdh_curves and the version range are
// what gets negotiated, and are counted under Envoy's names.
func TestTLSParams(t *testing.T) {
	ca := testpki.NewCA(t)
	cl, sv := newSide(t, ca, clientID), newSide(t, ca, serverID)
	dc := istioDown()
	dc.CommonTlsContext.TlsParams = &tlsv3.TlsParameters{
		TlsMaximumProtocolVersion: tlsv3.TlsParameters_TLSv1_2,
		CipherSuites:              []string{"[ECDHE-ECDSA-CHACHA20-POLY1305|ECDHE-RSA-CHACHA20-POLY1305]"},
		EcdhCurves:                []string{"P-384"},
	}
	var ust, dst Stats
	uc := istioUp("sni", serverID)
	uc.CommonTlsContext.TlsParams = nil // Envoy's client default: TLS 1.2 at most
	r := handshake(t, mustUp(t, cl.store, uc, &ust), "", mustDown(t, sv.store, dc, &dst))
	if r.clientErr != nil || r.serverErr != nil {
		t.Fatalf("client %v, server %v", r.clientErr, r.serverErr)
	}
	cs := r.server.ConnectionState()
	if cs.Version != tls.VersionTLS12 || cs.CipherSuite != tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 || cs.CurveID != tls.CurveP384 {
		t.Errorf("negotiated %x %s %v", cs.Version, tls.CipherSuiteName(cs.CipherSuite), cs.CurveID)
	}
	for who, st := range map[string]*Stats{"client": &ust, "server": &dst} {
		wantStats(t, who, st, map[string]uint64{"versions.TLSv1.2": 1, "ciphers.ECDHE-ECDSA-CHACHA20-POLY1305": 1, "curves.P-384": 1})
	}

	// A TLS 1.3-only server refuses the default (TLS 1.2 max) client.
	dc.CommonTlsContext.TlsParams = &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_3}
	r = handshake(t, mustUp(t, cl.store, uc, nil), "", mustDown(t, sv.store, dc, nil))
	if r.clientErr == nil {
		t.Error("TLS 1.2 client met a TLS 1.3-only server")
	}
}
