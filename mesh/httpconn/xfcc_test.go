package httpconn

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/internal/xdstest"
)

// The workload identities of these tests: the proxy's (By=) and the
// client's.
const (
	srvID = "spiffe://cluster.local/ns/default/sa/httpbin"
	cliID = "spiffe://cluster.local/ns/default/sa/sleep"
)

// plainConn hides a *tls.Conn's type, as the proxy hands a terminated
// connection to Serve: net/http must not run its own TLS path on it.
type plainConn struct{ net.Conn }

// startTLSProxy is startProxy behind TLS termination with srv's
// certificate: clients may present a certificate signed by ca (verified
// if given, as require_client_certificate false would), and Serve gets
// the connection's TLS state.
func startTLSProxy(t testing.TB, cfg *Config, env Env, srv *testpki.Leaf, srvID string, ca *testpki.CA) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tc := &tls.Config{Certificates: []tls.Certificate{srv.TLS}, ClientAuth: tls.VerifyClientCertIfGiven,
		ClientCAs: ca.Pool, NextProtos: []string{"h2", "http/1.1"}}
	var wg sync.WaitGroup
	var conns sync.Map
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Store(c, true)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conns.Delete(c)
				defer c.Close()
				tl := tls.Server(c, tc)
				if tl.HandshakeContext(ctx) != nil {
					return
				}
				cs := tl.ConnectionState()
				cfg.Serve(ctx, plainConn{tl}, env, ConnInfo{
					Peer: c.RemoteAddr().(*net.TCPAddr).AddrPort(), Local: c.LocalAddr().(*net.TCPAddr).AddrPort(),
					TLS: &cs, LocalURISAN: srvID,
				})
			}()
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		conns.Range(func(k, _ any) bool { k.(net.Conn).Close(); return true })
		wg.Wait()
	})
	return ln.Addr().String()
}

// tlsClient is an HTTP/1.1 (or h2) client over TLS presenting cert (none
// when nil). It does not check the proxy's certificate: these tests are
// about what the proxy does with the client's.
func tlsClient(cert *testpki.Leaf, h2 bool) *http.Client {
	cfg := &tls.Config{InsecureSkipVerify: true}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{cert.TLS}
	}
	p := new(http.Protocols)
	if h2 {
		p.SetHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg, Protocols: p}}
}

// seenHeaders is an upstream that answers with the request headers it
// got as X-Seen-<name>, and sends Istio's peer metadata headers back as
// an inbound sidecar Envoy would.
func seenHeaders(w http.ResponseWriter, r *http.Request) {
	for k, vs := range r.Header {
		w.Header()["X-Seen-"+k] = vs
	}
	w.Header().Set("X-Envoy-Peer-Metadata", "ChgKDkFQUF9DT05UQUlORVJTEgYaBGh0dHA=")
	w.Header().Set("X-Envoy-Peer-Metadata-Id", "sidecar~10.244.1.10~httpbin.default~default.svc.cluster.local")
	w.WriteHeader(200)
}

func xfccHCM(mode hcmv3.HttpConnectionManager_ForwardClientCertDetails, d *hcmv3.HttpConnectionManager_SetCurrentClientCertDetails, up string) *hcmv3.HttpConnectionManager {
	h := hcm(routeConfig(vhost("all", []string{"*"}, prefixRoute("/", up))))
	h.ForwardClientCertDetails = mode
	h.SetCurrentClientCertDetails = d
	return h
}

// TestXFCC: x-forwarded-client-cert per forward_client_cert_details, as
// Envoy's mutateXfccRequestHeader: what the client sent is kept, dropped,
// appended to or replaced, and this hop's element is
// By=<proxy's URI SAN>;Hash=<sha256 of the client's certificate> then the
// set_current_client_cert_details fields in Envoy's order.
func TestXFCC(t *testing.T) {
	ca := testpki.NewCA(t)
	srv := ca.Leaf(t, srvID, testpki.LeafOpts{})
	cli := ca.Leaf(t, cliID, testpki.LeafOpts{DNS: []string{"sleep.default.svc", "sleep"}, CommonName: "sleep"})
	bare := ca.Leaf(t, "", testpki.LeafOpts{}) // no SAN, no subject
	up := startUpstream(t, seenHeaders)
	env := newEnv(t, xdstest.StaticCluster("up", up.addr))

	sum := sha256.Sum256(cli.Cert.Raw)
	hash := "Hash=" + hex.EncodeToString(sum[:])
	bareSum := sha256.Sum256(bare.Cert.Raw)
	by := "By=" + srvID
	const prior = "By=spiffe://cluster.local/ns/default/sa/gateway;Hash=abc;URI=spiffe://cluster.local/ns/edge/sa/client"
	istio := &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Subject: wrapperspb.Bool(true), Dns: true, Uri: true}

	type conn int
	const (
		mtls conn = iota
		tlsNoCert
		tlsBare
		plaintext
	)
	for _, tc := range []struct {
		name    string
		mode    hcmv3.HttpConnectionManager_ForwardClientCertDetails
		details *hcmv3.HttpConnectionManager_SetCurrentClientCertDetails
		conn    conn
		sent    string // the client's own XFCC ("" none)
		want    string // at the upstream ("" absent)
	}{
		{"sanitize default drops", hcmv3.HttpConnectionManager_SANITIZE, istio, mtls, prior, ""},
		{"forward only keeps", hcmv3.HttpConnectionManager_FORWARD_ONLY, istio, mtls, prior, prior},
		{"forward only drops without client cert", hcmv3.HttpConnectionManager_FORWARD_ONLY, istio, tlsNoCert, prior, ""},
		{"always forward only keeps on plaintext", hcmv3.HttpConnectionManager_ALWAYS_FORWARD_ONLY, istio, plaintext, prior, prior},
		{"append forward, Istio's inbound", hcmv3.HttpConnectionManager_APPEND_FORWARD, istio, mtls, "",
			by + ";" + hash + `;Subject="CN=sleep";URI=` + cliID + ";DNS=sleep.default.svc;DNS=sleep"},
		{"append forward appends", hcmv3.HttpConnectionManager_APPEND_FORWARD, &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Uri: true}, mtls, prior,
			prior + "," + by + ";" + hash + ";URI=" + cliID},
		{"append forward drops on plaintext", hcmv3.HttpConnectionManager_APPEND_FORWARD, istio, plaintext, prior, ""},
		{"append forward drops without client cert", hcmv3.HttpConnectionManager_APPEND_FORWARD, istio, tlsNoCert, prior, ""},
		{"sanitize set replaces", hcmv3.HttpConnectionManager_SANITIZE_SET, nil, mtls, prior, by + ";" + hash},
		{"empty subject and URI keep their keys", hcmv3.HttpConnectionManager_SANITIZE_SET,
			&hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Subject: wrapperspb.Bool(true), Uri: true, Dns: true}, tlsBare, "",
			by + ";Hash=" + hex.EncodeToString(bareSum[:]) + `;Subject="";URI=`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := mustParse(t, xfccHCM(tc.mode, tc.details, "up"))
			var c *http.Client
			var base string
			switch tc.conn {
			case plaintext:
				c, base = client(false), "http://"+startProxy(t, cfg, env).addr
			case mtls:
				c, base = tlsClient(cli, false), "https://"+startTLSProxy(t, cfg, env, srv, srvID, ca)
			case tlsBare:
				c, base = tlsClient(bare, false), "https://"+startTLSProxy(t, cfg, env, srv, srvID, ca)
			case tlsNoCert:
				c, base = tlsClient(nil, false), "https://"+startTLSProxy(t, cfg, env, srv, srvID, ca)
			}
			req, _ := http.NewRequest("GET", base+"/x", nil)
			if tc.sent != "" {
				req.Header.Set("X-Forwarded-Client-Cert", tc.sent)
			}
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			got, present := resp.Header["X-Seen-X-Forwarded-Client-Cert"]
			switch {
			case tc.want == "" && present:
				t.Errorf("XFCC reached the upstream: %q", got)
			case tc.want != "" && (len(got) != 1 || got[0] != tc.want):
				t.Errorf("XFCC at the upstream:\n got %q\nwant %q", got, tc.want)
			}
		})
	}
}

// TestXFCCCertAndChain: Cert= and Chain= carry the client's certificates
// as PEM, URL-encoded as Envoy's PercentEncoding::urlEncode does (every
// byte but ALPHA, DIGIT and "*-._" as upper-case %XX), so that the PEM's
// newlines, '+', '/' and '=' never read as XFCC separators.
func TestXFCCCertAndChain(t *testing.T) {
	ca := testpki.NewCA(t)
	srv := ca.Leaf(t, srvID, testpki.LeafOpts{})
	cli := ca.Leaf(t, cliID, testpki.LeafOpts{})
	up := startUpstream(t, seenHeaders)
	env := newEnv(t, xdstest.StaticCluster("up", up.addr))
	cfg := mustParse(t, xfccHCM(hcmv3.HttpConnectionManager_SANITIZE_SET,
		&hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Cert: true, Chain: true, Uri: true}, "up"))
	addr := startTLSProxy(t, cfg, env, srv, srvID, ca)
	resp, err := tlsClient(cli, false).Get("https://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	v := resp.Header.Get("X-Seen-X-Forwarded-Client-Cert")
	fields := strings.Split(v, ";")
	if len(fields) != 5 || !strings.HasPrefix(fields[2], `Cert="`) || !strings.HasPrefix(fields[3], `Chain="`) || fields[4] != "URI="+cliID {
		t.Fatalf("XFCC = %q, want By;Hash;Cert;Chain;URI", v)
	}
	leafPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cli.Cert.Raw}))
	for _, f := range []struct{ field, want string }{
		{fields[2], leafPEM},
		{fields[3], leafPEM}, // the chain the client sent: its leaf alone
	} {
		enc := f.field[strings.IndexByte(f.field, '"')+1 : len(f.field)-1]
		if i := strings.IndexFunc(enc, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("*-._%", r))
		}); i >= 0 {
			t.Errorf("%q has %q unencoded", f.field[:6], enc[i])
		}
		if strings.Contains(enc, "%0a") || !strings.Contains(enc, "%0A") || !strings.HasPrefix(enc, "-----BEGIN%20CERTIFICATE-----%0A") {
			t.Errorf("%q: want upper-case %%XX escapes, space as %%20: %.40s…", f.field[:6], enc)
		}
		dec, err := url.PathUnescape(enc)
		if err != nil || dec != f.want {
			t.Errorf("%q decodes to %q (%v), want the PEM %q", f.field[:6], dec, err, f.want)
		}
	}
}

// TestPeerMetadataHeadersStripped: Istio's x-envoy-peer-metadata and
// -id, which sidecar Envoys exchange, reach neither the application (on
// the request) nor the client (on the response), on plaintext or mTLS,
// HTTP/1.1 or h2; and x-forwarded-proto says which the downstream was.
func TestPeerMetadataHeadersStripped(t *testing.T) {
	ca := testpki.NewCA(t)
	srv := ca.Leaf(t, srvID, testpki.LeafOpts{})
	cli := ca.Leaf(t, cliID, testpki.LeafOpts{})
	up := startUpstream(t, seenHeaders)
	env := newEnv(t, xdstest.StaticCluster("up", up.addr))
	cfg := mustParse(t, xfccHCM(hcmv3.HttpConnectionManager_APPEND_FORWARD, nil, "up"))
	tlsAddr := "https://" + startTLSProxy(t, cfg, env, srv, srvID, ca)
	plainAddr := "http://" + startProxy(t, cfg, env).addr
	for _, tc := range []struct {
		name, base, proto, xfp string
		c                      *http.Client
	}{
		{"plaintext h1", plainAddr, "HTTP/1.1", "http", client(false)},
		{"plaintext h2c", plainAddr, "HTTP/2.0", "http", client(true)},
		{"mTLS h1", tlsAddr, "HTTP/1.1", "https", tlsClient(cli, false)},
		{"mTLS h2", tlsAddr, "HTTP/2.0", "https", tlsClient(cli, true)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", tc.base+"/", nil)
			req.Header.Set("X-Envoy-Peer-Metadata", "from-the-client")
			req.Header.Set("X-Envoy-Peer-Metadata-Id", "sidecar~10.0.0.1~sleep.default~default.svc.cluster.local")
			resp, err := tc.c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.Proto != tc.proto {
				t.Fatalf("protocol %s, want %s", resp.Proto, tc.proto)
			}
			for _, k := range []string{"X-Seen-X-Envoy-Peer-Metadata", "X-Seen-X-Envoy-Peer-Metadata-Id", "X-Envoy-Peer-Metadata", "X-Envoy-Peer-Metadata-Id"} {
				if v, ok := resp.Header[k]; ok {
					t.Errorf("%s: %q got through", k, v)
				}
			}
			if got := resp.Header.Get("X-Seen-X-Forwarded-Proto"); got != tc.xfp {
				t.Errorf("x-forwarded-proto %q, want %q", got, tc.xfp)
			}
		})
	}
}

// TestXFCCConfigErrors: what meshtun cannot do is refused by name.
func TestXFCCConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		mut  func(*hcmv3.HttpConnectionManager)
		want string
	}{
		{func(h *hcmv3.HttpConnectionManager) {
			h.SetCurrentClientCertDetails = &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Issuer: true}
		}, "http_connection_manager.set_current_client_cert_details.issuer: not supported"},
		{func(h *hcmv3.HttpConnectionManager) {
			h.SetCurrentClientCertDetails = &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Format: hcmv3.HttpConnectionManager_JSON}
		}, "http_connection_manager.set_current_client_cert_details.format: JSON not supported"},
	} {
		h := xfccHCM(hcmv3.HttpConnectionManager_APPEND_FORWARD, nil, "up")
		tc.mut(h)
		_, err := ParseHCM(h)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("error %v, want %q", err, tc.want)
		}
	}
}

// BenchmarkXFCCAppend is one request's XFCC on an mTLS connection whose
// element is built: the join with what the client sent, nothing else.
func BenchmarkXFCCAppend(b *testing.B) {
	ca := testpki.NewCA(b)
	cli := ca.Leaf(b, cliID, testpki.LeafOpts{})
	cfg := mustParse(b, xfccHCM(hcmv3.HttpConnectionManager_APPEND_FORWARD,
		&hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Subject: wrapperspb.Bool(true), Dns: true, Uri: true}, "up"))
	state := tls.ConnectionState{PeerCertificates: []*x509.Certificate{cli.Cert}}
	h := &connHandler{cfg: cfg, info: ConnInfo{TLS: &state, LocalURISAN: srvID}}
	s := &stream{h: h, cfg: cfg}
	hdr := http.Header{}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		delete(hdr, xfccHeader)
		s.mutateXFCC(hdr)
	}
	if !strings.Contains(hdr.Get(xfccHeader), "URI="+cliID) {
		b.Fatalf("XFCC %q", hdr.Get(xfccHeader))
	}
}
