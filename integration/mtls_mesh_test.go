//go:build linux

package integration

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	"google.golang.org/protobuf/encoding/protojson"
)

// Ports of pod B's applications: an HTTP service port and a TCP one.
const (
	portHTTP = 8080
	portTCP  = 9000
	hostB    = "b.default.svc.cluster.local"
)

// meshTest is two meshed pods and the control plane between them.
type meshTest struct {
	topo  *topology // pod A and the services namespace
	podB  *topology
	cp    *meshtunCP
	a, b  *meshedAgent
	vipB  netip.Addr
	web   *recHTTP   // B's HTTP app on :8080
	echoB *tcpServer // B's TCP app (echo) on :9000
	wire  *sniffer   // A's veth, on the services side: A's traffic to B

	// Pod C (meshOpts.podC): a third meshed pod, service account "c",
	// endpoint of service c; nil otherwise.
	podC *topology
	c    *meshedAgent
	// services are the registry's service entries (b, a, and c when
	// present), so a test rewriting the registry keeps them.
	services []string
}

// meshOpts vary the two-pod setup.
type meshOpts struct {
	peerAuth string        // the profile's peerAuthentication (default PERMISSIVE)
	bSA      string        // B's service account (default "default", the registry's)
	services []string      // more registry services (meshServiceDoc)
	env      []string      // added to both agents' environment
	aExtra   []string      // more flags of A's agent
	bExtra   []string      // more flags of B's agent
	bPorts   []meshPortDoc // more TCP ports of service b (apps started by the test)
	podC     bool          // add pod C (10.X.3.2, service account "c", service c) with its agent
}

// writeRegistry replaces the control plane's registry by the test's
// services followed by more (e.g. a policyDoc).
func (m *meshTest) writeRegistry(t *testing.T, more ...string) {
	t.Helper()
	m.cp.writeRegistry(t, registryDoc(append(append([]string(nil), m.services...), more...)...))
}

// newMeshTest starts the control plane (CA, ADS on 15012) serving service
// b (VIP, HTTP 8080 and TCP 9000, endpoint pod B, meshed) and service a
// (pod A, meshed) (and service c, pod C, with o.podC), B's apps, both pods' agents (ready), and the wire
// sniffer on A's veth.
func newMeshTest(t *testing.T, o meshOpts) *meshTest {
	t.Helper()
	return newMeshTestHook(t, o, nil)
}

// bAddr is pod B's address with port.
func (m *meshTest) bAddr(port uint16) netip.AddrPort { return netip.AddrPortFrom(m.podB.PodV4, port) }

// urlB is the URL of service b's HTTP port by its VIP.
func (m *meshTest) urlB(path string) string {
	return fmt.Sprintf("http://%s%s", ap(m.vipB, portHTTP), path)
}

// sni is the SNI istiod gives a cluster: outbound_.<port>_.<subset>_.<host>.
func sni(port uint16, host string) string { return fmt.Sprintf("outbound_.%d_._.%s", port, host) }

// waitHello waits (5 s at most) for a ClientHello to dst with the given
// SNI on the wire; every flow to dst seen meanwhile must be TLS.
func (s *sniffer) waitHello(t *testing.T, dst netip.AddrPort, wantSNI string) clientHello {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var seen []string
		for k, b := range s.streams(dst) {
			if len(b) == 0 {
				continue
			}
			if b[0] != 0x16 {
				t.Fatalf("flow %v → %v is not TLS on the wire: it starts %q", k.Src, k.Dst, head(b, 64))
			}
			ch, err := parseClientHello(b)
			if err != nil {
				seen = append(seen, fmt.Sprintf("%v: %v", k.Src, err))
				continue
			}
			if ch.SNI == wantSNI {
				return ch
			}
			seen = append(seen, fmt.Sprintf("%v: SNI %q ALPN %q", k.Src, ch.SNI, ch.ALPN))
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ClientHello to %v with SNI %q on the wire within 5s (sniffer error %v); seen: %v", dst, wantSNI, s.failure(), seen)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestMTLSTwoMeshedPods is issue 14's test 2: pod A → service b (endpoint
// pod B, tlsMode istio) through the embedded control plane. B's apps get
// plaintext; the wire between the pods carries TLS only (ClientHello with
// istiod's SNI and Istio's ALPN, never istio-peer-exchange, none of the
// application bytes); B's access log shows A's SPIFFE ID and A's shows
// B's; HTTP and TCP; and an h2 upstream over TLS (a static cluster with
// HTTP/2 options in A's bootstrap) offers istio-h2 and is served by B.
func TestMTLSTwoMeshedPods(t *testing.T) {
	requireRoot(t)
	// A's bootstrap gains a listener at vipH2:8081 whose cluster speaks
	// HTTP/2 over Istio's TLS to pod B's HTTP port.
	const hostH2 = "b-h2.default.svc.cluster.local"
	var vipH2 netip.Addr
	m := newMeshTestHook(t, meshOpts{}, func(topo, podB *topology) []string {
		vipH2 = vip(topo, false, 43)
		cl := "outbound|8080||" + hostH2
		f := t.TempDir() + "/extra.json"
		if err := writeFile(f, bootstrapExtra(t, []obj{h2Listener(vipH2, 8081, cl)},
			[]obj{h2TLSCluster(cl, netip.AddrPortFrom(podB.PodV4, portHTTP), sni(portHTTP, hostH2), spiffeID("default"))})); err != nil {
			t.Fatal(err)
		}
		return []string{"--bootstrap-extra", f}
	})
	aID, bID := spiffeID("a"), spiffeID("default")

	t.Run("HTTP", func(t *testing.T) {
		path := "/mtls-" + randHex(6)
		body := getUntil(t, m.topo.Pod, m.urlB(path), hostB, 200, 20*time.Second)
		if !strings.HasPrefix(body, "b "+path+" HTTP/1.1") {
			t.Errorf("GET %s through mTLS: body %q, want B's app answering HTTP/1.1", path, body)
		}
		reqs := m.web.requests(path)
		if len(reqs) == 0 {
			t.Fatalf("B's app did not see %s", path)
		}
		r := reqs[len(reqs)-1]
		// Istio's inbound HCM: forward_client_cert_details APPEND_FORWARD
		// with the URI: the app learns the client's identity.
		if xfcc := r.Header.Get("X-Forwarded-Client-Cert"); !strings.Contains(xfcc, "URI="+aID) || !strings.Contains(xfcc, "By="+bID) {
			t.Errorf("B's app got x-forwarded-client-cert %q, want By=%s and URI=%s", xfcc, bID, aID)
		}
		for _, h := range []string{"X-Envoy-Peer-Metadata", "X-Envoy-Peer-Metadata-Id"} {
			if v := r.Header.Get(h); v != "" {
				t.Errorf("B's app got %s: %q (must be stripped)", h, v)
			}
		}
		ch := m.wire.waitHello(t, m.bAddr(portHTTP), sni(portHTTP, hostB))
		checkHello(t, "A → b:8080 (HTTP/1.1)", ch, sni(portHTTP, hostB), []string{"istio-http/1.1", "istio", "http/1.1"})
		m.wire.checkNotOnWire(t, "HTTP request A → B", path, "GET /mtls-")
		if e, ok := m.b.waitAccess(func(e AccessEntry) bool {
			return e.DownstreamPeerURISAN == aID && e.DownstreamLocal == m.bAddr(portHTTP).String()
		}, accessWait); !ok {
			t.Errorf("B's access log has no line for :%d with downstream_peer_uri_san %s: %v\n%s", portHTTP, aID, e, entriesText(m.b.accessLogs()))
		}
		if _, ok := m.a.waitAccess(func(e AccessEntry) bool {
			return e.UpstreamPeerURISAN == bID && strings.HasSuffix(e.DownstreamLocal, fmt.Sprintf(":%d", portHTTP))
		}, accessWait); !ok {
			t.Errorf("A's access log has no line for :%d with upstream_peer_uri_san %s:\n%s", portHTTP, bID, entriesText(m.a.accessLogs()))
		}
	})

	t.Run("TCP", func(t *testing.T) {
		marker := "tcp-over-mtls-" + randHex(8)
		c, err := dialTCP(m.topo.Pod, ap(m.vipB, portTCP), dialTimeout)
		if err != nil {
			t.Fatal(err)
		}
		local := addrPort(c.LocalAddr()).String()
		err = echoRoundTrip(c, []byte(strings.Repeat(marker, 1000)), echoTimeout)
		c.Close()
		if err != nil {
			t.Fatalf("echo through mTLS: %v", err)
		}
		ch := m.wire.waitHello(t, m.bAddr(portTCP), sni(portTCP, hostB))
		checkHello(t, "A → b:9000 (TCP)", ch, sni(portTCP, hostB), []string{"istio"})
		m.wire.checkNotOnWire(t, "TCP bytes A → B", marker)
		if got := m.echoB.accepted(); len(got) == 0 {
			t.Errorf("B's TCP app accepted nothing")
		}
		if e, ok := m.b.waitAccess(func(e AccessEntry) bool {
			return e.DownstreamPeerURISAN == aID && e.DownstreamLocal == m.bAddr(portTCP).String()
		}, accessWait); !ok {
			t.Errorf("B's access log has no line for :%d with downstream_peer_uri_san %s: %v\n%s", portTCP, aID, e, entriesText(m.b.accessLogs()))
		}
		if e, ok := m.a.waitAccess(func(e AccessEntry) bool { return e.DownstreamRemote == local }, accessWait); !ok ||
			e.UpstreamPeerURISAN != bID || e.UpstreamCluster != "outbound|9000||"+hostB || e.ResponseFlags != "-" {
			t.Errorf("A's access line for the TCP flow: %v (found %v), want upstream_peer_uri_san %s, cluster outbound|9000||%s, no flags", e, ok, bID, hostB)
		}
		// Envoy's ssl counters on both sides.
		if n := statsMap(t, m.topo)["cluster.outbound|9000||"+hostB+".ssl.handshake"]; n == 0 {
			t.Errorf("A: cluster.outbound|9000||%s.ssl.handshake is 0; ssl stats:\n%s", hostB, formatStats(statsWith(t, m.topo, ".ssl.")))
		}
		if n := sumStats(statsWith(t, m.podB, "listener.", ".ssl."), ".ssl.handshake"); n == 0 {
			t.Errorf("B: no listener.*.ssl.handshake counted; ssl stats:\n%s", formatStats(statsWith(t, m.podB, ".ssl.")))
		}
	})

	t.Run("H2UpstreamOverTLS", func(t *testing.T) {
		path := "/h2-" + randHex(6)
		body := getUntil(t, m.topo.Pod, fmt.Sprintf("http://%s%s", ap(vipH2, 8081), path), "b-h2", 200, 20*time.Second)
		if !strings.HasPrefix(body, "b "+path) {
			t.Errorf("GET %s over h2+TLS: body %q, want B's app", path, body)
		}
		ch := m.wire.waitHello(t, m.bAddr(portHTTP), sni(portHTTP, hostH2))
		checkHello(t, "A → B (h2 upstream)", ch, sni(portHTTP, hostH2), []string{"istio-h2", "istio", "h2"})
		m.wire.checkNotOnWire(t, "h2 request A → B", path)
		if len(m.web.requests(path)) == 0 {
			t.Errorf("B's app did not see %s", path)
		}
	})
}

// newMeshTestHook is newMeshTest with more flags for A's agent computed
// once both pods exist (extra may be nil): a bootstrap naming pod B.
func newMeshTestHook(t *testing.T, o meshOpts, extra func(topo, podB *topology) []string) *meshTest {
	t.Helper()
	if o.peerAuth == "" {
		o.peerAuth = "PERMISSIVE"
	}
	if o.bSA == "" {
		o.bSA = "default"
	}
	m := &meshTest{topo: newTopology(t)}
	m.podB = addPod(t, m.topo)
	m.vipB = vip(m.topo, false, 40)
	m.services = []string{
		meshServiceDoc("b", m.vipB, append([]meshPortDoc{{"http", portHTTP, "HTTP"}, {"tcp", portTCP, "TCP"}}, o.bPorts...), true, m.podB.PodV4),
		meshServiceDoc("a", vip(m.topo, false, 41), []meshPortDoc{{"tcp", 7070, "TCP"}}, true, m.topo.PodV4),
	}
	if o.podC {
		m.podC = addPodAt(t, m.topo, 3)
		m.services = append(m.services, meshServiceDoc("c", vip(m.topo, false, 42), []meshPortDoc{{"tcp", 7070, "TCP"}}, true, m.podC.PodV4))
	}
	reg := registryDoc(append(append([]string(nil), m.services...), o.services...)...)
	m.cp = startMeshCP(t, m.topo, reg, meshProfile("mtls-"+strings.ToLower(o.peerAuth), o.peerAuth))
	m.web = startRecHTTP(t, m.podB.Pod, fmt.Sprintf("0.0.0.0:%d", portHTTP), "b")
	m.echoB = startTCPServer(t, m.podB.Pod, fmt.Sprintf("0.0.0.0:%d", portTCP), echo)
	m.b = startMeshedAgent(t, m.topo, m.podB, m.cp, "b-1", o.bSA, o.env, o.bExtra...)
	aExtra := o.aExtra
	if extra != nil {
		aExtra = append(append([]string(nil), aExtra...), extra(m.topo, m.podB)...)
	}
	m.a = startMeshedAgent(t, m.topo, m.topo, m.cp, "a-1", "a", o.env, aExtra...)
	if o.podC {
		m.c = startMeshedAgent(t, m.topo, m.podC, m.cp, "c-1", "c", o.env)
	}
	m.wire = startSniffer(t, m.topo.Services, m.topo.SvcIface)
	return m
}

// sdsRef is istiod's SdsSecretConfig for name: the agent's sds-grpc
// cluster, waiting for the secret forever (initial_fetch_timeout 0s).
func sdsRef(name string) obj {
	return obj{"name": name, "sds_config": obj{
		"api_config_source": obj{"api_type": "GRPC", "grpc_services": []obj{{"envoy_grpc": obj{"cluster_name": "sds-grpc"}}},
			"set_node_on_first_message_only": true, "transport_api_version": "V3"},
		"initial_fetch_timeout": "0s", "resource_api_version": "V3"}}
}

// istioUpstreamTLS is istiod's tlsMode-istio transport socket (MTLS.md
// §2.4) with the given ALPN and SANs.
func istioUpstreamTLS(sniName string, alpn []string, sans ...string) obj {
	var ms []obj
	for _, s := range sans {
		ms = append(ms, obj{"exact": s})
	}
	return obj{"name": "envoy.transport_sockets.tls", "typed_config": obj{
		"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
		"common_tls_context": obj{
			"tls_params":                         obj{"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
			"alpn_protocols":                     alpn,
			"tls_certificate_sds_secret_configs": []obj{sdsRef("default")},
			"combined_validation_context": obj{
				"default_validation_context":           obj{"match_subject_alt_names": ms},
				"validation_context_sds_secret_config": sdsRef("ROOTCA")}},
		"sni": sniName}}
}

// h2Listener is an outbound HTTP listener at v:port (bound to nothing)
// routing everything to cluster.
func h2Listener(v netip.Addr, port uint16, cluster string) obj {
	return obj{"name": fmt.Sprintf("%s_%d", v, port), "address": sockAddr(v, port), "bind_to_port": false, "traffic_direction": "OUTBOUND",
		"filter_chains": []obj{{"filters": []obj{{"name": "envoy.filters.network.http_connection_manager", "typed_config": obj{
			"@type":       "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
			"stat_prefix": "outbound_h2",
			"route_config": obj{"name": "h2", "virtual_hosts": []obj{{"name": "b-h2", "domains": []string{"*"},
				"routes": []obj{routeTo("/", obj{"cluster": cluster})}}}},
			"http_filters": []obj{{"name": "envoy.filters.http.router", "typed_config": obj{"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}},
		}}}}}}
}

// h2TLSCluster is a STATIC cluster to ep speaking HTTP/2 (explicit
// http2_protocol_options) over istiod's TLS socket (ALPN istio, h2 as
// istiod writes it for HTTP/2 clusters; istio.alpn makes it istio-h2).
func h2TLSCluster(name string, ep netip.AddrPort, sniName string, sans ...string) obj {
	c := staticCluster(name, "ROUND_ROBIN", ep)
	c["typed_extension_protocol_options"] = obj{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": obj{
		"@type":                "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
		"explicit_http_config": obj{"http2_protocol_options": obj{}}}}
	c["transport_socket"] = istioUpstreamTLS(sniName, []string{"istio-peer-exchange", "istio", "h2"}, sans...)
	return c
}

// tlsDialFrom runs a TLS handshake from ns to dst with cfg and returns the
// connection (nil and the error if the handshake failed).
func tlsDialFrom(ns string, dst netip.AddrPort, cfg *tls.Config) (*tls.Conn, error) {
	raw, err := dialTCP(ns, dst.String(), dialTimeout)
	if err != nil {
		return nil, err
	}
	c := tls.Client(raw, cfg)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.Handshake(); err != nil {
		raw.Close()
		return nil, err
	}
	return c, nil
}

// tlsEcho sends msg on c and reads the same number of bytes back.
func tlsEcho(c net.Conn, msg []byte) error {
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != string(msg) {
		return errors.New("echo corrupted")
	}
	return nil
}

// startOpaqueTLSApp runs a TLS echo server (B's app speaking TLS itself,
// with its own self-signed certificate, no ALPN) on addr in ns.
func startOpaqueTLSApp(t *testing.T, ns, addr string) *x509Leaf {
	t.Helper()
	ca, caKey := foreignCA(t)
	leaf := issueLeaf(t, ca, caKey, "spiffe://app.example/opaque", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	cfg := &tls.Config{Certificates: []tls.Certificate{leaf.tls}}
	startTCPServer(t, ns, addr, func(c *net.TCPConn) {
		tc := tls.Server(c, cfg)
		if tc.Handshake() != nil {
			return
		}
		_, _ = io.Copy(tc, tc)
	})
	return &x509Leaf{serial: leaf.leaf.SerialNumber.String()}
}

// x509Leaf names a certificate by its serial.
type x509Leaf struct{ serial string }

// TestMTLSPermissiveStrict is issue 14's test 3 on pod B: under
// PERMISSIVE (the default) a plaintext client from outside the mesh and
// meshed A both reach B's apps, and a TLS client offering no istio ALPN
// reaches B's TLS app untouched (the passthrough chain: the app's own
// certificate answers); after `meshtun profile apply` with STRICT the
// plaintext client is reset, nothing reaches the app, and A still gets
// through.
func TestMTLSPermissiveStrict(t *testing.T) {
	requireRoot(t)
	m := newMeshTest(t, meshOpts{})
	opaque := startOpaqueTLSApp(t, m.podB.Pod, "0.0.0.0:9443")

	// PERMISSIVE: the non-mesh client (the services namespace has no
	// sidecar) in plaintext, HTTP and TCP.
	plainPath := "/plain-" + randHex(4)
	getUntil(t, m.topo.Services, fmt.Sprintf("http://%s%s", m.bAddr(portHTTP), plainPath), hostB, 200, 20*time.Second)
	if len(m.web.requests(plainPath)) != 1 {
		t.Errorf("PERMISSIVE: B's app saw %s %d times, want 1", plainPath, len(m.web.requests(plainPath)))
	}
	if _, err := tcpEcho(m.topo.Services, m.bAddr(portTCP).String(), 4096); err != nil {
		t.Errorf("PERMISSIVE: plaintext TCP from outside the mesh: %v", err)
	}
	meshPath := "/meshed-" + randHex(4)
	getUntil(t, m.topo.Pod, m.urlB(meshPath), hostB, 200, 20*time.Second)

	// A TLS client with no istio ALPN: passed through without termination,
	// so the handshake is with B's app and its own certificate.
	c, err := tlsDialFrom(m.topo.Services, m.bAddr(9443), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2", "http/1.1"}, ServerName: "opaque.example"})
	if err != nil {
		t.Fatalf("PERMISSIVE: TLS without istio ALPN to B's TLS app: %v", err)
	}
	if got := c.ConnectionState().PeerCertificates[0].SerialNumber.String(); got != opaque.serial {
		t.Errorf("PERMISSIVE: the TLS client without istio ALPN was answered by certificate serial %s, want B's app's own %s (the proxy terminated it)", got, opaque.serial)
	}
	if err := tlsEcho(c, []byte("opaque tls")); err != nil {
		t.Errorf("PERMISSIVE: echo through the passthrough chain: %v", err)
	}
	c.Close()

	// STRICT, applied live.
	code, out, errs := m.cp.applyProfile(t, "strict.yaml", meshProfile("mtls-strict", "STRICT"))
	applied := time.Now()
	if code != 0 {
		t.Fatalf("profile apply STRICT: exit %d\n%s%s", code, out, errs)
	}
	if live := m.cp.liveProfile(t); !strings.Contains(live, "peerAuthentication: STRICT") {
		t.Fatalf("live profile after apply:\n%s", live)
	}
	// Plaintext is reset once B has the STRICT chains.
	var took time.Duration
	for {
		p := "/strict-" + randHex(4)
		_, _, err := getFrom(m.topo.Services, fmt.Sprintf("http://%s%s", m.bAddr(portHTTP), p), hostB, 2*time.Second)
		if err != nil {
			if n := len(m.web.requests(p)); n != 0 {
				t.Fatalf("STRICT: the refused plaintext request reached the app %d times", n)
			}
			took = time.Since(applied)
			break
		}
		if time.Since(applied) > 10*time.Second {
			t.Fatalf("STRICT: plaintext HTTP from outside the mesh still served 10s after the apply")
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("STRICT in force on B %v after `profile apply`", took.Round(time.Millisecond))
	for i := 0; i < 3; i++ {
		p := "/strict-" + randHex(4)
		code, body, err := getFrom(m.topo.Services, fmt.Sprintf("http://%s%s", m.bAddr(portHTTP), p), hostB, 2*time.Second)
		if err == nil {
			t.Errorf("STRICT: plaintext HTTP answered %d %q", code, body)
		}
		if n := len(m.web.requests(p)); n != 0 {
			t.Errorf("STRICT: plaintext request %s reached the app", p)
		}
	}
	before := len(m.echoB.accepted())
	pc, err := dialTCP(m.topo.Services, m.bAddr(portTCP).String(), dialTimeout)
	if err == nil {
		err = pingPong(pc, []byte("plaintext under STRICT"))
		pc.Close()
		if err == nil {
			t.Errorf("STRICT: plaintext TCP echoed")
		} else if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("STRICT: plaintext TCP: %v, want reset or closed", err)
		}
	}
	if n := len(m.echoB.accepted()); n != before {
		t.Errorf("STRICT: B's TCP app accepted %d plaintext connections", n-before)
	}
	// Meshed A still gets through, HTTP and TCP.
	meshPath = "/strict-meshed-" + randHex(4)
	getUntil(t, m.topo.Pod, m.urlB(meshPath), hostB, 200, 10*time.Second)
	if _, err := tcpEcho(m.topo.Pod, ap(m.vipB, portTCP), 64<<10); err != nil {
		t.Errorf("STRICT: A → b:9000: %v", err)
	}
}

// certSerial is the serial of the workload certificate in the proxy's
// /certs of pod (lowercase hex, as Envoy prints it).
func certSerial(t *testing.T, pod *topology) string {
	t.Helper()
	var certs adminv3.Certificates
	if err := protojson.Unmarshal([]byte(adminGet(t, pod, "/certs")), &certs); err != nil {
		t.Fatalf("/certs: %v", err)
	}
	for _, c := range certs.GetCertificates() {
		for _, d := range c.GetCertChain() {
			for _, san := range d.GetSubjectAltNames() {
				if strings.HasPrefix(san.GetUri(), "spiffe://") {
					return d.GetSerialNumber()
				}
			}
		}
	}
	return ""
}

// TestMTLSRotationWithOpenFlows is issue 14's test 6: with SECRET_TTL=30s
// both workload certificates rotate at ~15 s; TCP and HTTP flows A → B
// opened over mTLS before the rotation keep working across it, and a new
// handshake with B presents B's new serial.
func TestMTLSRotationWithOpenFlows(t *testing.T) {
	requireRoot(t)
	m := newMeshTest(t, meshOpts{env: []string{"SECRET_TTL=30s"}})
	ca := loadMeshCA(t, m.cp)
	client := ca.issue(t, spiffeID("probe"), time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca.rootPEM) {
		t.Fatal("the CA's root-cert.pem has no certificate")
	}
	// B's certificate is checked as Istio's client does: chained to the
	// root, its URI SAN the registry's service account; the TLS name is not.
	verifyB := func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("B sent no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		leaf := cs.PeerCertificates[0]
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			return err
		}
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != spiffeID("default") {
			return fmt.Errorf("B's certificate has URI SANs %v, want %s", leaf.URIs, spiffeID("default"))
		}
		return nil
	}
	handshakeSerial := func() string {
		t.Helper()
		var c *tls.Conn
		var err error
		xdsDeadline := time.Now().Add(10 * time.Second)
		for {
			c, err = tlsDialFrom(m.topo.Services, m.bAddr(portTCP), &tls.Config{Certificates: []tls.Certificate{client.tls},
				NextProtos: []string{"istio"}, InsecureSkipVerify: true, VerifyConnection: verifyB})
			if err == nil || time.Now().After(xdsDeadline) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("mTLS handshake with B from outside: %v", err)
		}
		defer c.Close()
		if err := tlsEcho(c, []byte("probe")); err != nil {
			t.Fatalf("echo over a direct mTLS handshake with B: %v", err)
		}
		return hex.EncodeToString(c.ConnectionState().PeerCertificates[0].SerialNumber.Bytes())
	}

	first := certSerial(t, m.podB)
	if first == "" {
		t.Fatalf("B's /certs shows no workload certificate:\n%s", adminGet(t, m.podB, "/certs"))
	}
	if got := handshakeSerial(); got != first {
		// A rotation may have come between the two reads.
		if now := certSerial(t, m.podB); now != got {
			t.Errorf("B presents serial %s, /certs says %s (before: %s)", got, now, first)
		}
		first = got
	}
	flow := dialUntil(t, m.topo, ap(m.vipB, portTCP), 20*time.Second)
	defer flow.Close()
	httpC := podClient(m.topo, false, 1)
	getOK := func(what string) {
		t.Helper()
		code, body := get1(t, httpC, m.urlB("/rot-"+what), hostB)
		if code != 200 || !strings.HasPrefix(body, "b /rot-"+what) {
			t.Errorf("%s: GET over the kept-alive connection: %d %q", what, code, body)
		}
	}
	getOK("before")
	acceptedBefore := len(m.web.requests("/rot-before"))

	deadline := time.Now().Add(45 * time.Second)
	var second string
	for {
		if second = certSerial(t, m.podB); second != first && second != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B's certificate not rotated 45s after start with SECRET_TTL=30s (serial still %s)", first)
		}
		if err := pingPong(flow, []byte("during")); err != nil {
			t.Fatalf("the TCP flow broke before the rotation: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("B rotated: serial %s → %s", first, second)
	if err := pingPong(flow, []byte("after the rotation")); err != nil {
		t.Fatalf("the TCP flow opened before the rotation broke across it: %v", err)
	}
	getOK("after")
	if acceptedBefore != 1 {
		t.Errorf("B's app saw /rot-before %d times", acceptedBefore)
	}
	if got := handshakeSerial(); got != second {
		t.Errorf("a new handshake after the rotation presents serial %s, want the new %s", got, second)
	}
	// New flows A → B over the rotated certificates.
	if _, err := tcpEcho(m.topo.Pod, ap(m.vipB, portTCP), 4096); err != nil {
		t.Errorf("new flow after the rotation: %v", err)
	}
}
