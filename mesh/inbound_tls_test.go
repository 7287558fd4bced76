package mesh

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	streamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/netstack"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// istioFixtures is real istiod output for one sidecar, PERMISSIVE mTLS
// (../shared/istio/README.md).
const istioFixtures = "../../shared/istio/permissive-allow-any/"

// fixture decodes the resources of one fixture .pb (a DiscoveryResponse)
// into new(T)s.
func fixture[T proto.Message](t testing.TB, file string, mk func() T) []T {
	t.Helper()
	b, err := os.ReadFile(istioFixtures + file)
	if errors.Is(err, fs.ErrNotExist) {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s missing: CI must check out shared/ beside the repository", file)
		}
		t.Skipf("%s%s not present", istioFixtures, file)
	}
	var dr discoveryv3.DiscoveryResponse
	if err := proto.Unmarshal(b, &dr); err != nil {
		t.Fatal(err)
	}
	var out []T
	for _, a := range dr.GetResources() {
		m := mk()
		if err := proto.Unmarshal(a.GetValue(), m); err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

// Workload identities of the inbound tests: the pod's own (the proxy's
// certificate) and a meshed client's.
const (
	appID   = "spiffe://cluster.local/ns/default/sa/app"
	sleepID = "spiffe://cluster.local/ns/default/sa/sleep"
)

// inbound is istiod's virtualInbound listener (PERMISSIVE, or STRICT as
// istiod builds it: without the plaintext and TLS-passthrough chains)
// with its InboundPassthroughCluster, the agent's SDS secrets default and
// ROOTCA in the store, and a dispatcher logging to log.
type inbound struct {
	snap      *Snapshot
	d         *Dispatcher
	l         *Listener
	ca        *testpki.CA
	app       *testpki.Leaf // the proxy's certificate (default)
	sleep     *testpki.Leaf // a meshed client's
	log       *syncBuf
	accessLog bool
}

func newInbound(t testing.TB, strict, accessLog bool) *inbound {
	t.Helper()
	return newInboundWith(t, strict, accessLog, nil)
}

// newInboundWith is newInbound with edit applied to virtualInbound
// before the snapshot is built (nil: none).
func newInboundWith(t testing.TB, strict, accessLog bool, edit func(*listenerv3.Listener)) *inbound {
	t.Helper()
	var vi *listenerv3.Listener
	for _, l := range fixture(t, "listeners.pb", func() *listenerv3.Listener { return new(listenerv3.Listener) }) {
		if l.GetName() == "virtualInbound" {
			vi = l
		}
	}
	if vi == nil {
		t.Fatal("no virtualInbound in the fixture")
	}
	if strict {
		var keep []*listenerv3.FilterChain
		for _, fc := range vi.GetFilterChains() {
			m := fc.GetFilterChainMatch()
			if m.GetTransportProtocol() == "raw_buffer" || (m.GetTransportProtocol() == "tls" && len(m.GetApplicationProtocols()) == 0) {
				continue
			}
			keep = append(keep, fc)
		}
		vi.FilterChains = keep
	}
	if accessLog {
		// Istio's meshConfig.accessLogFile: /dev/stdout on each HCM.
		for _, fc := range vi.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				if f.GetName() != HCMFilter {
					continue
				}
				var h hcmv3.HttpConnectionManager
				if err := f.GetTypedConfig().UnmarshalTo(&h); err != nil {
					t.Fatal(err)
				}
				h.AccessLog = []*accesslogv3.AccessLog{{Name: "envoy.access_loggers.stream",
					ConfigType: &accesslogv3.AccessLog_TypedConfig{TypedConfig: anyOf(t, &streamv3.StdoutAccessLog{})}}}
				f.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: anyOf(t, &h)}
			}
		}
	}
	if edit != nil {
		edit(vi)
	}
	var clusters []*clusterv3.Cluster
	for _, c := range fixture(t, "clusters.pb", func() *clusterv3.Cluster { return new(clusterv3.Cluster) }) {
		if c.GetName() == InboundPassthroughCluster || c.GetName() == "BlackHoleCluster" {
			clusters = append(clusters, c)
		}
	}
	in := &inbound{ca: testpki.NewCA(t), log: &syncBuf{}, accessLog: accessLog}
	in.app = in.ca.Leaf(t, appID, testpki.LeafOpts{})
	in.sleep = in.ca.Leaf(t, sleepID, testpki.LeafOpts{})
	store := secrets.NewStore()
	store.SetRefs(&secrets.Refs{Names: map[string]secrets.Source{"default": {Cluster: "sds-grpc"}, "ROOTCA": {Cluster: "sds-grpc"}}})
	if err := store.Put("1", in.app.Secret("default"), time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := store.Put("1", in.ca.RootSecret("ROOTCA"), time.Now()); err != nil {
		t.Fatal(err)
	}
	opts := buildOpts()
	opts.Secrets = store
	snap, err := Build("1", []*listenerv3.Listener{vi}, clusters, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { snap.Retire(nil) })
	in.snap, in.l = snap, snap.Listener("virtualInbound")
	in.d = NewDispatcher(DispatcherOptions{Access: accesslog.New(zerolog.New(in.log).Level(zerolog.InfoLevel))})
	in.d.Swap(snap)
	return in
}

// flow opens a connection to the listener as a captured inbound flow to
// dst (the app's address): the client's end, and the flow's access entry
// once it is over.
func (in *inbound) flow(t testing.TB, dst netip.AddrPort) (net.Conn, <-chan accesslog.Entry) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan accesslog.Entry, 1)
	fid := netstack.FlowID{Src: netip.MustParseAddrPort("10.244.1.7:41000"), Dst: dst}
	go func() {
		e := accesslog.Entry{Transport: "tcp", Direction: "inbound", Start: time.Now(), DownstreamLocal: fid.Dst, DownstreamPeer: fid.Src}
		serveFlow(in.snap, in.l, &accepted{conn: s, fid: fid}, &e, in.d)
		in.d.o.Access.Log(&e)
		done <- e
	}()
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c, done
}

func entryOf(t testing.TB, done <-chan accesslog.Entry) accesslog.Entry {
	t.Helper()
	select {
	case e := <-done:
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("the flow did not end")
	}
	return accesslog.Entry{}
}

// sslStat is the listener's ssl.<name> counter.
func (in *inbound) sslStat(name string) uint64 {
	for _, st := range in.l.Stats.SSL().List() {
		if st.Name == name {
			return st.Value
		}
	}
	return 0
}

// meshClient is how a meshed client's sidecar dials: its certificate,
// the pod's SPIFFE ID checked on the server's certificate, ALPN alpn.
func (in *inbound) meshClient(cert *testpki.Leaf, alpn ...string) *tls.Config {
	cfg := &tls.Config{RootCAs: in.ca.Pool, NextProtos: alpn, InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			opts := x509.VerifyOptions{Roots: in.ca.Pool, Intermediates: x509.NewCertPool()}
			if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
				return err
			}
			if len(cs.PeerCertificates[0].URIs) != 1 || cs.PeerCertificates[0].URIs[0].String() != appID {
				return fmt.Errorf("server is %v, want %s", cs.PeerCertificates[0].URIs, appID)
			}
			return nil
		}}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{cert.TLS}
	}
	return cfg
}

// appRecorder is the app: it echoes, and keeps what the first read of each
// connection got (to tell plaintext from TLS bytes on its side).
type appRecorder struct {
	addr    netip.AddrPort
	accepts atomic.Int64
	mu      sync.Mutex
	first   [][]byte
}

func startRecorder(t testing.TB) *appRecorder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &appRecorder{addr: netip.MustParseAddrPort(ln.Addr().String())}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r.accepts.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				buf := make([]byte, 4096)
				n, err := c.Read(buf)
				r.mu.Lock()
				r.first = append(r.first, append([]byte(nil), buf[:n]...))
				r.mu.Unlock()
				if err != nil {
					return
				}
				c.Write(buf[:n])
				io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return r
}

func (r *appRecorder) firstRead(i int) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	if i >= len(r.first) {
		return nil
	}
	return r.first[i]
}

// echoOver writes msg on c and reads it back.
func echoOver(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo: %q %v, want %q", buf, err, msg)
	}
}

// TestInboundPermissiveTCP: istiod's PERMISSIVE virtualInbound, TCP.
// A meshed client (TLS, ALPN istio, its certificate) lands on the
// terminating chain: the app gets plaintext, the client sees the pod's
// SPIFFE ID, no ALPN is selected (the server's list, minus
// istio-peer-exchange, has nothing the client offers), and the access
// entry names the client's SPIFFE ID. Plaintext lands on the raw_buffer
// chain; TLS without an istio ALPN on the passthrough chain, its bytes
// reaching the app as the client sent them.
func TestInboundPermissiveTCP(t *testing.T) {
	in := newInbound(t, false, false)
	app := startRecorder(t)

	t.Run("mTLS terminated", func(t *testing.T) {
		c, done := in.flow(t, app.addr)
		tc := tls.Client(c, in.meshClient(in.sleep, "istio"))
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		if p := tc.ConnectionState().NegotiatedProtocol; p != "" {
			t.Errorf("ALPN %q selected, want none", p)
		}
		echoOver(t, tc, "ping")
		tc.CloseWrite()
		if _, err := io.ReadAll(tc); err != nil {
			t.Errorf("after close_notify: %v", err)
		}
		tc.Close()
		e := entryOf(t, done)
		if got := app.firstRead(0); string(got) != "ping" {
			t.Errorf("the app's first read %q, want plaintext ping", got)
		}
		if e.DownstreamPeerURISAN != sleepID || e.UpstreamCluster != InboundPassthroughCluster || e.BytesReceived != 4 || e.BytesSent != 4 {
			t.Errorf("entry %+v, want peer %s, 4 bytes each way to %s", e, sleepID, InboundPassthroughCluster)
		}
		if in.sslStat("handshake") != 1 || in.sslStat("versions.TLSv1.3") != 1 {
			t.Errorf("ssl stats %v, want one TLSv1.3 handshake", in.l.Stats.SSL().List())
		}
		if !strings.Contains(in.log.String(), `"downstream_peer_uri_san":"`+sleepID+`"`) {
			t.Errorf("access log has no downstream_peer_uri_san %s:\n%s", sleepID, in.log)
		}
	})

	t.Run("plaintext", func(t *testing.T) {
		c, done := in.flow(t, app.addr)
		echoOver(t, c, "\x00\x01raw")
		c.Close()
		e := entryOf(t, done)
		if got := app.firstRead(1); string(got) != "\x00\x01raw" || e.DownstreamPeerURISAN != "" {
			t.Errorf("the app got %q, entry %+v", got, e)
		}
	})

	t.Run("TLS without istio ALPN passes through", func(t *testing.T) {
		// The app itself speaks TLS, with a certificate of another CA.
		other := testpki.NewCA(t)
		appCert := other.Leaf(t, "", testpki.LeafOpts{DNS: []string{"app.example"}})
		ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{appCert.TLS}})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			s, err := ln.Accept()
			if err != nil {
				return
			}
			defer s.Close()
			io.Copy(s, s)
		}()
		before := in.sslStat("handshake")
		c, done := in.flow(t, netip.MustParseAddrPort(ln.Addr().String()))
		tc := tls.Client(c, &tls.Config{RootCAs: other.Pool, ServerName: "app.example", NextProtos: []string{"h2", "http/1.1"}})
		echoOver(t, tc, "hello app")
		if cn := tc.ConnectionState().PeerCertificates[0]; !bytes.Equal(cn.Raw, appCert.Cert.Raw) {
			t.Errorf("the client saw %v, want the app's own certificate", cn.DNSNames)
		}
		tc.Close()
		e := entryOf(t, done)
		if in.sslStat("handshake") != before || e.DownstreamPeerURISAN != "" {
			t.Errorf("the proxy took part in the handshake: ssl.handshake %d→%d, entry %+v", before, in.sslStat("handshake"), e)
		}
	})
}

// TestInboundPermissiveHTTP: the terminating HTTP chain (ALPN
// istio-http/1.1 or istio-h2, the server then picks http/1.1 or h2): the
// app gets the request in plaintext with Istio's XFCC (APPEND_FORWARD,
// subject + uri + dns: what the client sent, then By=<pod>;Hash;Subject;
// URI=<client>), never the peer metadata headers; the client never sees
// the app's; the HTTP access line names the client. Plaintext HTTP on
// the raw_buffer chain gets no XFCC: the client's own is dropped.
func TestInboundPermissiveHTTP(t *testing.T) {
	in := newInbound(t, false, true)
	var seen sync.Map // request id → headers the app got
	srv := startHTTPApp(t, func(w http.ResponseWriter, r *http.Request) {
		seen.Store(r.Header.Get("X-Test-Id"), r.Header.Clone())
		w.Header().Set("X-Envoy-Peer-Metadata", "app-metadata")
		w.Header().Set("X-Envoy-Peer-Metadata-Id", "sidecar~10.244.0.5~app-abc.default~default.svc.cluster.local")
		fmt.Fprintf(w, "%s %v", r.Proto, r.TLS != nil)
	})
	sum := sha256.Sum256(in.sleep.Cert.Raw)
	const prior = "By=spiffe://cluster.local/ns/istio-system/sa/ingress;Hash=00;URI=spiffe://cluster.local/ns/edge/sa/c"
	want := prior + ",By=" + appID + ";Hash=" + hex.EncodeToString(sum[:]) + `;Subject="";URI=` + sleepID

	for _, tc := range []struct {
		name, wantProto, wantXFCC string
		alpn                      []string
		tls                       bool
	}{
		{"mTLS http/1.1", "HTTP/1.1", want, []string{"istio-http/1.1", "istio", "http/1.1"}, true},
		{"mTLS h2", "HTTP/2.0", want, []string{"istio-h2", "istio", "h2"}, true},
		{"plaintext", "HTTP/1.1", "", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var dialed <-chan accesslog.Entry
			tr := &http.Transport{DisableKeepAlives: true, Protocols: new(http.Protocols)}
			if tc.wantProto == "HTTP/2.0" {
				tr.Protocols.SetHTTP2(true)
			} else {
				tr.Protocols.SetHTTP1(true)
			}
			dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
				c, done := in.flow(t, srv)
				dialed = done
				if !tc.tls {
					return c, nil
				}
				tl := tls.Client(c, in.meshClient(in.sleep, tc.alpn...))
				return tl, tl.HandshakeContext(ctx)
			}
			tr.DialContext, tr.DialTLSContext = dial, dial
			scheme := "http"
			if tc.tls {
				scheme = "https"
			}
			req, _ := http.NewRequest("GET", scheme+"://app.default.svc.cluster.local:8080/hello", nil)
			req.Header.Set("X-Test-Id", tc.name)
			req.Header.Set("X-Forwarded-Client-Cert", prior)
			req.Header.Set("X-Envoy-Peer-Metadata", "client-metadata")
			req.Header.Set("X-Envoy-Peer-Metadata-Id", "sidecar~10.244.1.7~sleep-1.default~default.svc.cluster.local")
			resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			tr.CloseIdleConnections()
			if resp.Proto != tc.wantProto || string(body) != tc.wantProto+" false" {
				t.Errorf("%s %q, want %s to the client and a plaintext %s request at the app", resp.Proto, body, tc.wantProto, tc.wantProto)
			}
			if v := resp.Header.Values("X-Envoy-Peer-Metadata"); len(v) > 0 || resp.Header.Get("X-Envoy-Peer-Metadata-Id") != "" {
				t.Errorf("the app's peer metadata reached the client: %v", resp.Header)
			}
			v, _ := seen.Load(tc.name)
			h := v.(http.Header)
			if got := h.Values("X-Forwarded-Client-Cert"); (tc.wantXFCC == "" && len(got) > 0) || (tc.wantXFCC != "" && (len(got) != 1 || got[0] != tc.wantXFCC)) {
				t.Errorf("XFCC at the app %q\nwant %q", got, tc.wantXFCC)
			}
			if h.Get("X-Envoy-Peer-Metadata") != "" || h.Get("X-Envoy-Peer-Metadata-Id") != "" {
				t.Errorf("the client's peer metadata reached the app: %v", h)
			}
			e := entryOf(t, dialed)
			wantSAN := ""
			if tc.tls {
				wantSAN = sleepID
			}
			if e.DownstreamPeerURISAN != wantSAN {
				t.Errorf("connection entry peer %q, want %q", e.DownstreamPeerURISAN, wantSAN)
			}
			line := ""
			for _, l := range strings.Split(in.log.String(), "\n") {
				if strings.Contains(l, `"transport":"http"`) && strings.Contains(l, `"protocol":"`+tc.wantProto+`"`) {
					line = l
				}
			}
			if line == "" || (wantSAN != "") != strings.Contains(line, `"downstream_peer_uri_san":"`+wantSAN+`"`) ||
				(wantSAN == "" && strings.Contains(line, "downstream_peer_uri_san")) {
				t.Errorf("HTTP access line %q, want downstream_peer_uri_san %q (absent on plaintext)", line, wantSAN)
			}
		})
	}
}

// startHTTPApp is the app behind the sidecar: HTTP/1.1 and h2c.
func startHTTPApp(t *testing.T, h http.HandlerFunc) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	s := &http.Server{Handler: h, Protocols: p}
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	return netip.MustParseAddrPort(ln.Addr().String())
}

// TestInboundRefusals: a client with no certificate (require_client_
// certificate), or one from another CA, fails the handshake: nothing
// reaches the app, the listener's ssl.* count the failure by kind, and
// the access entry says why.
func TestInboundRefusals(t *testing.T) {
	in := newInbound(t, false, false)
	app := startRecorder(t)
	stranger := testpki.NewCA(t).Leaf(t, sleepID, testpki.LeafOpts{})
	for _, tc := range []struct {
		name   string
		cert   *testpki.Leaf
		stat   string
		reason string
	}{
		{"no client certificate", nil, "fail_verify_no_cert", "no certificate"},
		{"untrusted client certificate", stranger, "fail_verify_error", "verify"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, errsBefore := in.sslStat(tc.stat), in.sslStat("connection_error")
			c, done := in.flow(t, app.addr)
			tl := tls.Client(c, in.meshClient(tc.cert, "istio"))
			// TLS 1.3: the client's handshake ends before the server has
			// judged its certificate; the refusal comes on the next read.
			err := tl.Handshake()
			if err == nil {
				tl.Write([]byte("ping"))
				_, err = tl.Read(make([]byte, 4))
			}
			if err == nil {
				t.Fatal("the handshake was accepted")
			}
			e := entryOf(t, done)
			if app.accepts.Load() != 0 {
				t.Errorf("the app got %d connections", app.accepts.Load())
			}
			if in.sslStat(tc.stat) != before+1 || in.sslStat("connection_error") != errsBefore+1 {
				t.Errorf("ssl.%s %d→%d, connection_error %d→%d; want +1 each", tc.stat, before, in.sslStat(tc.stat), errsBefore, in.sslStat("connection_error"))
			}
			if !strings.Contains(e.DownstreamTransportFailureReason, tc.reason) || e.Details != "downstream TLS handshake failed" || e.UpstreamCluster != "" {
				t.Errorf("entry %+v, want a failure reason with %q and no upstream", e, tc.reason)
			}
		})
	}
}

// TestInboundStrict: istiod's STRICT virtualInbound has no raw_buffer
// chain: plaintext matches no chain and is reset (no_filter_chain_match),
// while a meshed client still gets through.
func TestInboundStrict(t *testing.T) {
	in := newInbound(t, true, false)
	app := startRecorder(t)
	c, done := in.flow(t, app.addr)
	c.Write([]byte("GET / HTTP/1.1\r\nHost: app\r\n\r\n"))
	_, err := c.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("plaintext read: %v, want ECONNRESET", err)
	}
	if e := entryOf(t, done); e.ResponseFlags != "NR" || in.l.Stats.NoFilterChainMatch.Load() != 1 || app.accepts.Load() != 0 {
		t.Errorf("entry %+v, no_filter_chain_match %d, app accepts %d; want NR, 1, 0", e, in.l.Stats.NoFilterChainMatch.Load(), app.accepts.Load())
	}
	c, done = in.flow(t, app.addr)
	tl := tls.Client(c, in.meshClient(in.sleep, "istio"))
	echoOver(t, tl, "ping")
	tl.Close()
	if e := entryOf(t, done); e.DownstreamPeerURISAN != sleepID {
		t.Errorf("mTLS under STRICT: entry %+v", e)
	}
}

// TestTLSChainErrorsNameTheField: a DownstreamTlsContext meshtun cannot
// honour rejects the listener, naming chain and field.
func TestTLSChainErrorsNameTheField(t *testing.T) {
	ts := testpki.DownstreamSocket("h2")
	var dc tlsv3.DownstreamTlsContext
	if err := ts.GetTypedConfig().UnmarshalTo(&dc); err != nil {
		t.Fatal(err)
	}
	dc.SessionTimeout = durationpb.New(time.Minute)
	ts = testpki.Socket(&dc)
	fc := tcpChain(t, "mtls", "PassthroughCluster", 0)
	fc.TransportSocket = ts
	_, err := Build("1", []*listenerv3.Listener{listener(t, "in", "0.0.0.0", 15006, false, &no, fc)}, passthroughClusters(), nil, buildOpts())
	const want = `listener "in": filter_chains[0] (mtls): transport_socket.typed_config.session_timeout: not supported`
	if err == nil || err.Error() != want {
		t.Errorf("error %v\nwant  %s", err, want)
	}
}

// TestDownstreamCarriesPeer: what a TLS chain's network filters get is a
// *Downstream with the client's verified identity (where RBAC's network
// filter finds the principal); a plaintext connection has none.
func TestDownstreamCarriesPeer(t *testing.T) {
	in := newInbound(t, false, false)
	var chain *Chain
	for _, c := range in.l.Chains {
		if c.TLS != nil && c.TCP != nil {
			chain = c
		}
	}
	if chain == nil {
		t.Fatal("no terminating tcp_proxy chain")
	}
	cli, srv := net.Pipe()
	defer cli.Close()
	go func() {
		tc := tls.Client(cli, in.meshClient(in.sleep, "istio"))
		if tc.Handshake() == nil {
			io.Copy(io.Discard, tc) // until the proxy's close_notify
		}
	}()
	var e accesslog.Entry
	d, ok := terminate(in.l, chain, srv, &e)
	if !ok {
		t.Fatalf("handshake failed: %s", e.DownstreamTransportFailureReason)
	}
	defer d.Close()
	p := PeerOf(d)
	if p == nil || len(p.URISANs) != 1 || p.URISANs[0] != sleepID || !bytes.Equal(p.Cert.Raw, in.sleep.Cert.Raw) {
		t.Errorf("PeerOf = %+v, want %s", p, sleepID)
	}
	if d.TLS.Version != tls.VersionTLS13 || !d.TLS.HandshakeComplete {
		t.Errorf("TLS state %+v", d.TLS)
	}
	if PeerOf(srv) != nil {
		t.Error("a plaintext connection has a peer")
	}
}

// TestTLSHandshakeBounded: a client that connects to a TLS chain and
// never completes its handshake is closed at the chain's
// transport_socket_connect_timeout, and at once when the listener's
// drain ends; neither reaches the chain's tcp_proxy.
func TestTLSHandshakeBounded(t *testing.T) {
	for _, tc := range []struct {
		name    string
		timeout time.Duration
		drain   bool
		reason  string
	}{
		{"transport_socket_connect_timeout", 200 * time.Millisecond, false, "deadline"},
		{"listener drained", time.Hour, true, "canceled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := newInbound(t, false, false) // for its secrets
			fc := tcpChain(t, "mtls", "BlackHoleCluster", 0)
			fc.TransportSocket = testpki.DownstreamSocket("h2", "http/1.1")
			fc.TransportSocketConnectTimeout = durationpb.New(tc.timeout)
			opts := buildOpts()
			opts.Secrets = in.snap.secrets
			snap, err := Build("2", []*listenerv3.Listener{listener(t, "tls", "0.0.0.0", 9443, false, &no, fc)}, passthroughClusters(), nil, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer snap.Retire(nil)
			if got := snap.Listener("tls").Chains[0].HandshakeTimeout; got != tc.timeout {
				t.Fatalf("HandshakeTimeout %v, want %v", got, tc.timeout)
			}
			in.snap, in.l = snap, snap.Listener("tls")
			in.d.Swap(snap)
			c, done := in.flow(t, netip.MustParseAddrPort("10.244.0.5:9443"))
			if tc.drain {
				next, err := Build("3", nil, passthroughClusters(), snap, opts)
				if err != nil {
					t.Fatal(err)
				}
				defer next.Retire(nil)
				snap.Drain(next, 0)
			}
			if _, err := c.Read(make([]byte, 1)); err != io.EOF {
				t.Errorf("client read %v, want EOF (closed by the proxy)", err)
			}
			e := entryOf(t, done)
			if !strings.Contains(e.DownstreamTransportFailureReason, tc.reason) || e.UpstreamCluster != "" || in.sslStat("connection_error") != 1 {
				t.Errorf("entry %+v, ssl.connection_error %d; want a %q failure before any upstream, counted", e, in.sslStat("connection_error"), tc.reason)
			}
		})
	}
}

// TestIstioListenersBuild: istiod's eight listeners for a PERMISSIVE pod,
// with their TLS chains, build whole (they were rejected while TLS
// termination was not supported); virtualInbound terminates on its
// istio-ALPN chains (catch-all HTTP, catch-all TCP, the app's port 8080)
// and passes the rest through.
func TestIstioListenersBuild(t *testing.T) {
	listeners := fixture(t, "listeners.pb", func() *listenerv3.Listener { return new(listenerv3.Listener) })
	clusters := fixture(t, "clusters.pb", func() *clusterv3.Cluster { return new(clusterv3.Cluster) })
	opts := buildOpts()
	opts.AddedViaAPI, opts.AllowUnknownClusters = true, true
	snap, err := Build("1", listeners, clusters, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Retire(nil)
	if len(snap.Listeners) != 8 {
		t.Errorf("%d listeners, want istiod's 8", len(snap.Listeners))
	}
	var terminating []string
	for _, c := range snap.Listener("virtualInbound").Chains {
		if c.TLS != nil {
			terminating = append(terminating, c.Name)
		}
	}
	if strings.Join(terminating, ",") != "virtualInbound-catchall-http,virtualInbound,0.0.0.0_8080" || !snap.Listener("virtualInbound").TerminatesTLS() {
		t.Errorf("terminating chains %q, want the catch-all HTTP, TCP and port 8080 mTLS ones", terminating)
	}
	if snap.Listener("virtualOutbound").TerminatesTLS() {
		t.Error("virtualOutbound terminates TLS")
	}
}

// TestInboundOpenSSLClient: not Go talking to Go. openssl s_client with a
// CA-issued client certificate gets through istiod's PERMISSIVE
// virtualInbound (verifying the pod's certificate against the root) with
// ALPN istio, or istio-peer-exchange alone, and no ALPN selected either
// way, as Envoy answers; without a client certificate it is refused.
func TestInboundOpenSSLClient(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("openssl not installed")
		}
		t.Skip("openssl not installed")
	}
	in := newInbound(t, false, false)
	app := startRecorder(t)
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := dir + "/" + name
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	certFile, keyFile, rootFile := write("cert.pem", in.sleep.CertPEM), write("key.pem", in.sleep.KeyPEM), write("root.pem", in.ca.CertPEM)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	entries := make(chan accesslog.Entry, 8)
	xdstest.ServeConns(t, ln, func(c net.Conn) {
		fid := netstack.FlowID{Src: netip.MustParseAddrPort(c.RemoteAddr().String()), Dst: app.addr}
		e := accesslog.Entry{Transport: "tcp", Direction: "inbound", Start: time.Now()}
		serveFlow(in.snap, in.l, &accepted{conn: c, fid: fid}, &e, in.d)
		entries <- e
	})

	for _, tc := range []struct {
		name   string
		args   []string
		output []string // in s_client's output
		peer   string   // in the access entry
		reason string   // downstream_transport_failure_reason
	}{
		{"alpn istio", []string{"-cert", certFile, "-key", keyFile, "-alpn", "istio"},
			[]string{"Verify return code: 0 (ok)", "No ALPN negotiated", "New, TLSv1.3"}, sleepID, ""},
		{"alpn istio-peer-exchange alone", []string{"-cert", certFile, "-key", keyFile, "-alpn", "istio-peer-exchange"},
			[]string{"Verify return code: 0 (ok)", "No ALPN negotiated"}, sleepID, ""},
		{"no client certificate", []string{"-alpn", "istio"}, nil, "", "no certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			args := append([]string{"s_client", "-connect", ln.Addr().String(), "-CAfile", rootFile, "-verify_return_error"}, tc.args...)
			cmd := exec.CommandContext(ctx, openssl, args...)
			cmd.Stdin = strings.NewReader("ping\n")
			out, _ := cmd.CombinedOutput()
			for _, want := range tc.output {
				if !strings.Contains(string(out), want) {
					t.Errorf("s_client output lacks %q:\n%s", want, out)
				}
			}
			if tc.peer != "" {
				// The certificate s_client was shown is the pod's identity.
				i := bytes.Index(out, []byte("-----BEGIN CERTIFICATE-----"))
				if i < 0 {
					t.Fatalf("s_client printed no server certificate:\n%s", out)
				}
				blk, _ := pem.Decode(out[i:])
				if c, err := x509.ParseCertificate(blk.Bytes); err != nil || len(c.URIs) != 1 || c.URIs[0].String() != appID {
					t.Errorf("server certificate %v (%v), want URI SAN %s", c, err, appID)
				}
			}
			e := entryOf(t, entries)
			if e.DownstreamPeerURISAN != tc.peer || !strings.Contains(e.DownstreamTransportFailureReason, tc.reason) {
				t.Errorf("entry %+v, want peer %q, failure %q\ns_client:\n%s", e, tc.peer, tc.reason, out)
			}
		})
	}
}

// BenchmarkInboundMTLSFlow is one new mTLS connection through istiod's
// terminating TCP chain: the ClientHello peeked, the chain matched, the
// handshake (ECDSA P-256, client certificate verified), one byte each way
// to the app, the close. It measures the proxy's share of a new meshed
// connection, for the connections-per-second figure.
func BenchmarkInboundMTLSFlow(b *testing.B) {
	in := newInbound(b, false, false)
	app := startRecorder(b)
	cfg := in.meshClient(in.sleep, "istio")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		c, done := in.flow(b, app.addr)
		tc := tls.Client(c, cfg)
		echoOver(b, tc, "x")
		tc.Close()
		if e := entryOf(b, done); e.DownstreamPeerURISAN != sleepID {
			b.Fatalf("entry %+v", e)
		}
	}
}
