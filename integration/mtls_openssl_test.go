//go:build linux

package integration

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// requireTool stops the test when a command is missing: a failure under
// CI=true (scripts/install-deps.sh installs it), a skip elsewhere.
func requireTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s not found under CI (make deps installs it): %v", name, err)
		}
		t.Skipf("%s not installed: %v", name, err)
	}
}

// sClient runs `openssl s_client -connect dst args...` from ns with stdin
// and returns its stdout and stderr together. -ign_eof keeps it reading
// after stdin ends, until the server closes (the HTTP requests sent ask
// for that) or the timeout.
func sClient(t *testing.T, ns, dst, stdin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, "openssl", "s_client", "-connect", dst}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("openssl s_client %s %v: timed out; output:\n%s", dst, args, out.String())
	}
	_ = err // s_client's status says little: the output is checked
	return out.String()
}

// firstCert is the first PEM certificate in openssl's output (-showcerts:
// the server's leaf).
func firstCert(t *testing.T, out string) *x509.Certificate {
	t.Helper()
	blk, _ := pem.Decode([]byte(out[max(0, strings.Index(out, "-----BEGIN CERTIFICATE-----")):]))
	if blk == nil {
		t.Fatalf("no certificate in openssl's output:\n%s", out)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestMTLSOpenSSLInterop is issue 14's test 5, a TLS stack that is not
// Go's on the other end. Inbound (pod B): `openssl s_client` with a
// CA-issued client certificate and -alpn istio completes the handshake,
// verifies B's chain against the mesh root and sees B's SPIFFE ID, and
// its HTTP request reaches B's app; -alpn istio-peer-exchange alone
// completes with no ALPN selected (on the TCP chain, whose alpn_protocols
// list it: Envoy never selects it); without a client certificate it is
// refused and nothing reaches the app. Upstream (pod A): `openssl
// s_server` with a CA-issued certificate as an endpoint with tlsMode
// istio completes meshtun's handshake (openssl verifies A's certificate
// and reports A's SPIFFE ID), and one whose SPIFFE ID is not the
// service's is refused (ssl.fail_verify_san).
func TestMTLSOpenSSLInterop(t *testing.T) {
	requireRoot(t)
	requireTool(t, "openssl")
	m := newMeshTest(t, meshOpts{})
	vOK, vBad := vip(m.topo, false, 46), vip(m.topo, false, 47)
	m.cp.writeRegistry(t, registryDoc(
		meshServiceDoc("b", m.vipB, []meshPortDoc{{"http", portHTTP, "HTTP"}, {"tcp", portTCP, "TCP"}}, true, m.podB.PodV4),
		meshServiceDoc("a", vip(m.topo, false, 41), []meshPortDoc{{"tcp", 7070, "TCP"}}, true, m.topo.PodV4),
		meshServiceDoc("ossl", vOK, []meshPortDoc{{"tcp", 9200, "TCP"}}, true, m.topo.SvcV4),
		meshServiceDoc("ossl-bad", vBad, []meshPortDoc{{"tcp", 9201, "TCP"}}, true, m.topo.Svc2V4),
	))
	ca := loadMeshCA(t, m.cp)
	client := ca.issue(t, spiffeID("openssl-client"), time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	withCert := []string{"-cert", client.certFile, "-key", client.keyFile, "-CAfile", ca.rootFile(), "-verify_return_error", "-showcerts"}

	t.Run("SClientALPNIstio", func(t *testing.T) {
		path := "/openssl-" + randHex(4)
		req := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, hostB)
		out := sClient(t, m.topo.Services, m.bAddr(portHTTP).String(), req, append([]string{"-alpn", "istio", "-ign_eof"}, withCert...)...)
		if !strings.Contains(out, "Verify return code: 0 (ok)") {
			t.Errorf("s_client -alpn istio: B's chain not verified against the mesh root:\n%s", out)
		}
		if leaf := firstCert(t, out); len(leaf.URIs) != 1 || leaf.URIs[0].String() != spiffeID("default") {
			t.Errorf("B's certificate URI SANs %v, want %s", leaf.URIs, spiffeID("default"))
		}
		if !strings.Contains(out, "b "+path+" HTTP/1.1") {
			t.Errorf("s_client's request did not reach B's app (no answer from it):\n%s", out)
		}
		if strings.Contains(out, "ALPN protocol: istio") {
			t.Errorf("B selected an istio ALPN (its HTTP chain offers h2, http/1.1 only):\n%s", out)
		}
		if got := m.web.requests(path); len(got) != 1 || !strings.Contains(got[0].Header.Get("X-Forwarded-Client-Cert"), "URI="+spiffeID("openssl-client")) {
			t.Errorf("B's app got %d requests; x-forwarded-client-cert should name %s: %+v", len(got), spiffeID("openssl-client"), got)
		}
	})

	t.Run("SClientPeerExchangeOnly", func(t *testing.T) {
		for _, port := range []uint16{portTCP, portHTTP} {
			out := sClient(t, m.topo.Services, m.bAddr(port).String(), "", append([]string{"-alpn", "istio-peer-exchange"}, withCert...)...)
			if !strings.Contains(out, "Verify return code: 0 (ok)") || !strings.Contains(out, "No ALPN negotiated") {
				t.Errorf(":%d -alpn istio-peer-exchange: want a completed handshake with no ALPN selected:\n%s", port, out)
			}
			if strings.Contains(out, "ALPN protocol: istio-peer-exchange") {
				t.Errorf(":%d: B selected istio-peer-exchange", port)
			}
		}
	})

	t.Run("SClientNoCertificate", func(t *testing.T) {
		path := "/openssl-nocert-" + randHex(4)
		req := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, hostB)
		out := sClient(t, m.topo.Services, m.bAddr(portHTTP).String(), req, "-alpn", "istio", "-ign_eof", "-CAfile", ca.rootFile())
		if strings.Contains(out, "b "+path) {
			t.Errorf("s_client without a certificate got B's app's answer:\n%s", out)
		}
		if !strings.Contains(strings.ToLower(out), "alert") && !strings.Contains(out, "errno") && !strings.Contains(strings.ToLower(out), "error") {
			t.Errorf("s_client without a certificate: no alert or error reported:\n%s", out)
		}
		if len(m.web.requests(path)) != 0 {
			t.Errorf("the request without a client certificate reached B's app")
		}
	})

	t.Run("SServerUpstream", func(t *testing.T) {
		good := ca.issue(t, spiffeID("default"), time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
		bad := ca.issue(t, spiffeID("impostor"), time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
		sServer := func(addr string, c *issuedCert) *proxyProc {
			p := startProc(t, "openssl s_server "+addr, []string{"netns", "exec", m.topo.Services, "openssl", "s_server", "-accept", addr,
				"-cert", c.certFile, "-key", c.keyFile, "-CAfile", ca.rootFile(), "-Verify", "2", "-verify_return_error",
				"-alpn", "istio", "-www"}, nil, syscall.SIGTERM)
			if !p.waitLine(func(l string) bool { return strings.Contains(l, "ACCEPT") }, 10*time.Second) {
				t.Fatalf("openssl s_server on %s not accepting; output:\n%s", addr, strings.Join(p.logLines(), "\n"))
			}
			return p
		}
		sServer(ap(m.topo.SvcV4, 9200), good)
		badSrv := sServer(ap(m.topo.Svc2V4, 9201), bad)
		xdstest.Eventually(t, 15*time.Second, "A's listeners for the openssl services", func() bool {
			l := adminGet(t, m.topo, "/listeners")
			return strings.Contains(l, "_9200::") && strings.Contains(l, "_9201::")
		})

		code, body, err := httpGetIn(m.topo.Pod, ap(vOK, 9200), "/", 10*time.Second)
		if err != nil || code != 200 {
			t.Fatalf("GET / of openssl s_server through A's mTLS: %d %v", code, err)
		}
		if !strings.Contains(body, "Verify return code: 0 (ok)") || !strings.Contains(body, "URI:"+spiffeID("a")) {
			t.Errorf("openssl s_server did not verify A's certificate with A's SPIFFE ID:\n%.4000s", body)
		}
		if !strings.Contains(body, "Protocol  : TLSv1.3") && !strings.Contains(body, "Protocol  : TLSv1.2") {
			t.Errorf("openssl s_server reports no TLS 1.2/1.3 session:\n%.2000s", body)
		}

		// The SAN check applies to openssl's certificate as to meshtun's.
		refusedFlow(t, m.topo, ap(vBad, 9201))
		checkUF(t, m.a, ap(vBad, 9201), "openssl s_server presenting "+spiffeID("impostor"), "SAN", "subject_alt_name", spiffeID("impostor"))
		cl := "cluster.outbound|9201||ossl-bad.default.svc.cluster.local.ssl.fail_verify_san"
		if n := statsMap(t, m.topo)[cl]; n == 0 {
			t.Errorf("A: %s is 0; ssl stats:\n%s", cl, formatStats(statsWith(t, m.topo, ".ssl.")))
		}
		for _, l := range badSrv.logLines() {
			if strings.Contains(l, "GET /") {
				t.Errorf("the impostor openssl server received application data: %s", l)
			}
		}
	})
}
