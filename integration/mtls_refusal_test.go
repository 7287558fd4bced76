//go:build linux

package integration

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// tlsApp is a TLS server standing for a meshed endpoint with a given
// certificate; it counts completed handshakes and application bytes.
type tlsApp struct {
	handshakes atomic.Int64
	appBytes   atomic.Int64
}

func startTLSApp(t *testing.T, ns, addr string, cert tls.Certificate) *tlsApp {
	t.Helper()
	a := &tlsApp{}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert, NextProtos: []string{"istio"}}
	startTCPServer(t, ns, addr, func(c *net.TCPConn) {
		tc := tls.Server(c, cfg)
		if tc.Handshake() != nil {
			return
		}
		a.handshakes.Add(1)
		n, _ := io.Copy(tc, tc)
		a.appBytes.Add(n)
	})
	return a
}

// refusedFlow opens a flow to dst from the pod and expects it refused:
// meshtun connects upstream before it completes the client's handshake
// through capture, so a failed upstream TLS handshake is a refused connect
// (or, once accepted, a flow closed or reset without an echo).
func refusedFlow(t *testing.T, topo *topology, dst string) {
	t.Helper()
	c, err := dialTCP(topo.Pod, dst, dialTimeout)
	if err != nil {
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s: %v, want refused", dst, err)
		}
		return
	}
	defer c.Close()
	if err := pingPong(c, []byte("must not arrive\n")); err == nil {
		t.Errorf("%s: the flow echoed; the upstream TLS should have been refused", dst)
	}
}

// checkUF checks the access line of a refused flow to dst: flag UF and an
// upstream_transport_failure_reason containing one of reasons.
func checkUF(t *testing.T, ag *meshedAgent, dst, what string, reasons ...string) {
	t.Helper()
	e, ok := ag.waitAccess(func(e AccessEntry) bool {
		return e.DownstreamLocal == dst && strings.Contains(e.ResponseFlags, "UF")
	}, accessWait)
	if !ok {
		t.Errorf("%s: no access line for %s with flag UF:\n%s", what, dst, entriesText(ag.accessMatching(byDst(dst))))
		return
	}
	r := e.UpstreamTransportFailureReason
	found := false
	for _, want := range reasons {
		found = found || strings.Contains(strings.ToLower(r), strings.ToLower(want))
	}
	if !found {
		t.Errorf("%s: upstream_transport_failure_reason %q, want it to say %q; line: %s", what, r, reasons, e.Raw)
	}
	t.Logf("%s: refused, upstream_transport_failure_reason %q", what, r)
}

// TestMTLSRefusals is issue 14's test 4. Upstream (A's proxy): B's
// certificate names a service account the registry does not give service
// b (not in match_subject_alt_names) → refused, cluster ssl.fail_verify_san
// counted, access flag UF with the reason, nothing reaches B's app; an
// endpoint with an expired certificate, and one whose certificate chains
// to a root the mesh does not trust → refused with the reason
// (ssl.fail_verify_error), nothing reaches them. Downstream (B's proxy): a
// client with no certificate on the mTLS chain → handshake failure
// counted, nothing reaches the app.
func TestMTLSRefusals(t *testing.T) {
	requireRoot(t)
	m := newMeshTest(t, meshOpts{bSA: "impostor"})
	// The expired and untrusted endpoints live in the services namespace;
	// their services join the registry now (the control plane watches it).
	vExp, vFor := vip(m.topo, false, 44), vip(m.topo, false, 45)
	vipExp, vipFor := ap(vExp, 9100), ap(vFor, 9101)
	m.cp.writeRegistry(t, registryDoc(
		meshServiceDoc("b", m.vipB, []meshPortDoc{{"http", portHTTP, "HTTP"}, {"tcp", portTCP, "TCP"}}, true, m.podB.PodV4),
		meshServiceDoc("a", vip(m.topo, false, 41), []meshPortDoc{{"tcp", 7070, "TCP"}}, true, m.topo.PodV4),
		meshServiceDoc("expired", vExp, []meshPortDoc{{"tcp", 9100, "TCP"}}, true, m.topo.SvcV4),
		meshServiceDoc("untrusted", vFor, []meshPortDoc{{"tcp", 9101, "TCP"}}, true, m.topo.Svc2V4),
	))
	ca := loadMeshCA(t, m.cp)
	expired := ca.issue(t, spiffeID("default"), time.Now().Add(-3*time.Hour), time.Now().Add(-time.Hour))
	fca, fkey := foreignCA(t)
	untrusted := issueLeaf(t, fca, fkey, spiffeID("default"), time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	expApp := startTLSApp(t, m.topo.Services, ap(m.topo.SvcV4, 9100), expired.tls)
	forApp := startTLSApp(t, m.topo.Services, ap(m.topo.Svc2V4, 9101), untrusted.tls)

	t.Run("WrongSPIFFEID", func(t *testing.T) {
		cl := "cluster.outbound|9000||" + hostB + ".ssl.fail_verify_san"
		before := len(m.echoB.accepted())
		refusedFlow(t, m.topo, ap(m.vipB, portTCP))
		checkUF(t, m.a, ap(m.vipB, portTCP), "B presenting "+spiffeID("impostor"), "SAN", "subject_alt_name", spiffeID("impostor"))
		if n := statsMap(t, m.topo)[cl]; n == 0 {
			t.Errorf("A: %s is 0; ssl stats:\n%s", cl, formatStats(statsWith(t, m.topo, ".ssl.")))
		}
		if n := len(m.echoB.accepted()) - before; n != 0 {
			t.Errorf("B's app accepted %d connections from the refused flow", n)
		}
		// HTTP as well: the request is not sent; A answers 503 itself.
		path := "/wrong-san-" + randHex(4)
		code, _, err := getFrom(m.topo.Pod, m.urlB(path), hostB, 5*time.Second)
		if err == nil && code == 200 {
			t.Errorf("HTTP to B with the wrong SPIFFE ID answered 200")
		}
		if len(m.web.requests(path)) != 0 {
			t.Errorf("the HTTP request reached B's app despite the SAN mismatch")
		}
	})

	t.Run("ExpiredCertificate", func(t *testing.T) {
		xdstest.Eventually(t, 15*time.Second, "the expired endpoint's listener", func() bool {
			return strings.Contains(adminGet(t, m.topo, "/listeners"), "_9100::")
		})
		refusedFlow(t, m.topo, vipExp)
		checkUF(t, m.a, vipExp, "expired certificate", "expired")
		cl := "cluster.outbound|9100||expired.default.svc.cluster.local.ssl.fail_verify_error"
		if n := statsMap(t, m.topo)[cl]; n == 0 {
			t.Errorf("A: %s is 0; ssl stats:\n%s", cl, formatStats(statsWith(t, m.topo, ".ssl.")))
		}
		if n := expApp.appBytes.Load(); n != 0 {
			t.Errorf("the expired endpoint received %d application bytes", n)
		}
	})

	t.Run("UntrustedRoot", func(t *testing.T) {
		xdstest.Eventually(t, 15*time.Second, "the untrusted endpoint's listener", func() bool {
			return strings.Contains(adminGet(t, m.topo, "/listeners"), "_9101::")
		})
		refusedFlow(t, m.topo, vipFor)
		checkUF(t, m.a, vipFor, "untrusted root", "unknown authority", "untrusted", "not trusted")
		cl := "cluster.outbound|9101||untrusted.default.svc.cluster.local.ssl.fail_verify_error"
		if n := statsMap(t, m.topo)[cl]; n == 0 {
			t.Errorf("A: %s is 0; ssl stats:\n%s", cl, formatStats(statsWith(t, m.topo, ".ssl.")))
		}
		if n := forApp.appBytes.Load(); n != 0 {
			t.Errorf("the untrusted endpoint received %d application bytes", n)
		}
	})

	t.Run("NoClientCertificate", func(t *testing.T) {
		failures := func() uint64 {
			st := statsWith(t, m.podB, "listener.", ".ssl.")
			return sumStats(st, ".ssl.connection_error") + sumStats(st, ".ssl.no_certificate")
		}
		before := failures()
		path := "/no-client-cert-" + randHex(4)
		// ALPN istio-http/1.1 selects the mTLS chain (require_client_certificate).
		c, err := tlsDialFrom(m.topo.Services, m.bAddr(portHTTP), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"istio-http/1.1", "istio"}})
		if err == nil {
			// TLS 1.3: the client's handshake ends before the server has
			// checked the (absent) certificate; the refusal arrives next.
			fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, hostB)
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			resp, rerr := io.ReadAll(c)
			c.Close()
			if rerr == nil && len(resp) > 0 {
				t.Errorf("a client without a certificate got an answer: %.200q", resp)
			}
		}
		if n := len(m.web.requests(path)); n != 0 {
			t.Errorf("the request without a client certificate reached B's app")
		}
		xdstest.Eventually(t, 5*time.Second, "B counting the failed handshake (listener ssl.connection_error or ssl.no_certificate)", func() bool {
			return failures() > before
		})
	})
}
