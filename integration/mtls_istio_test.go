//go:build linux

package integration

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestIstioConfigACKedWhole is issue 14's test 1: the four resource types
// of real istiod output for a sidecar in Istio's default mesh (auto mTLS,
// PERMISSIVE: virtualInbound with its TLS chains, clusters with
// transport_socket_matches), unchanged, served by go-control-plane to
// `meshtun proxy` on Istio's own bootstrap, with SDS default and ROOTCA
// from `meshtun agent` (its certificate from `meshtun controlplane`'s CA).
// Every type is ACKed and nothing NACKed; /listeners lists istiod's 8
// listeners; through capture, a TCP flow to the postgres VIP and an HTTP
// request to the httpbin VIP reach their endpoints (plaintext: the
// fixture's endpoints have no tlsMode), and an unregistered destination
// passes through (ALLOW_ANY).
func TestIstioConfigACKedWhole(t *testing.T) {
	requireRoot(t)
	requireIstioFixtures(t)
	topo := newTopology(t)
	bs, xdsSock, sdsSock := istioBootstrapCopy(t, t.TempDir())

	// The agent runs in the services namespace without capture: only its
	// SDS socket (a file, reachable from the pod's namespace) is used.
	cp := startMeshtunControlPlane(t, topo, registryDoc(), "--secure-address", ap(topo.GwV4, 15012))
	state := filepath.Dir(cp.tokenFile)
	tokenFile := filepath.Join(t.TempDir(), "istio-token")
	if err := writeFile(tokenFile, []byte(appToken(t, topo, state))); err != nil {
		t.Fatal(err)
	}
	agentNS := *topo
	agentNS.Pod, agentNS.StateDir = topo.Services, t.TempDir()
	ag := startAgentNoWait(t, &agentNS, agentEnv("ECC_SIGNATURE_ALGORITHM=ECDSA"), "--capture", "none",
		"--discovery-address", ap(topo.GwV4, 15012), "--ca-root-file", filepath.Join(state, "ca", "root-cert.pem"),
		"--token-file", tokenFile, "--sds-socket", sdsSock)
	// Its SDS serves once the certificate is issued (its own proxy's
	// readiness is not this test's subject).
	if !ag.waitLine(func(l string) bool { return logMessage(l) == "workload certificate issued" }, 30*time.Second) {
		t.Fatalf("the agent's certificate was not issued within 30s; log:\n%s", strings.Join(ag.logLines(), "\n"))
	}

	// The fixture's endpoints, on the services namespace's loopback.
	postgres := netip.MustParseAddrPort("10.244.2.20:5432")
	httpbin := []netip.AddrPort{netip.MustParseAddrPort("10.244.1.10:8080"), netip.MustParseAddrPort("10.244.1.11:8080")}
	for _, a := range []netip.AddrPort{postgres, httpbin[0], httpbin[1]} {
		if _, err := run("ip", "-n", topo.Services, "addr", "add", a.Addr().String()+"/32", "dev", "lo"); err != nil && !strings.Contains(err.Error(), "File exists") {
			t.Fatal(err)
		}
	}
	pg := startTCPServer(t, topo.Services, postgres.String(), echo)
	hb1 := startRecHTTP(t, topo.Services, httpbin[0].String(), "httpbin-1")
	hb2 := startRecHTTP(t, topo.Services, httpbin[1].String(), "httpbin-2")
	ext := startTCPServer(t, topo.Services, ap(topo.SvcV4, 7000), echo)

	cfg := istiodConfig(t)
	listeners := cfg[resource.ListenerType]
	srv := xdstest.NewUnixServer(t, xdsSock)
	srv.Set(t, istioNode, cfg)

	startProxy(t, topo, "--bootstrap", bs)
	xdstest.Eventually(t, 20*time.Second, "LDS, RDS, CDS and EDS ACKed", func() bool {
		return srv.ACKs(resource.ListenerType) > 0 && srv.ACKs(resource.ClusterType) > 0 &&
			srv.ACKs(resource.RouteType) > 0 && srv.ACKs(resource.EndpointType) > 0
	})
	if n := srv.NACKs(); len(n) != 0 {
		t.Fatalf("istiod's configuration NACKed: %+v", n)
	}

	// /listeners: istiod's 8 and the bootstrap's static ones (Istio's
	// template has the stats and readiness listeners), nothing else.
	var want, got []string
	for _, r := range listeners {
		want = append(want, r.(*listenerv3.Listener).GetName())
	}
	if len(want) != 8 {
		t.Errorf("the fixture has %d listeners, want istiod's 8: %v", len(want), want)
	}
	var boot struct {
		StaticResources struct {
			Listeners []struct {
				Name string `json:"name"`
			} `json:"listeners"`
		} `json:"static_resources"`
	}
	if b, err := os.ReadFile(bs); err != nil || json.Unmarshal(b, &boot) != nil {
		t.Fatalf("bootstrap %s: %v", bs, err)
	}
	for _, l := range boot.StaticResources.Listeners {
		want = append(want, l.Name)
	}
	xdstest.Eventually(t, 10*time.Second, "/listeners with istiod's 8 listeners and the bootstrap's", func() bool {
		got = got[:0]
		for _, l := range strings.Split(strings.TrimSpace(adminGet(t, topo, "/listeners")), "\n") {
			if name, _, ok := strings.Cut(l, "::"); ok {
				got = append(got, name)
			}
		}
		slices.Sort(got)
		slices.Sort(want)
		return slices.Equal(got, want)
	})

	// TCP to the postgres VIP, through 10.96.0.54_5432 and its EDS cluster.
	waitServes(t, topo, "10.96.0.54:5432")
	if _, err := tcpEcho(topo.Pod, "10.96.0.54:5432", 64<<10); err != nil {
		t.Errorf("TCP to the postgres VIP: %v", err)
	}
	if len(pg.accepted()) == 0 {
		t.Errorf("the postgres endpoint %v accepted nothing", postgres)
	}
	// HTTP to the httpbin VIP, through 0.0.0.0_80 and route 80.
	for i := 0; i < 4; i++ {
		body := getUntil(t, topo.Pod, "http://10.96.0.80/get", "httpbin.default.svc.cluster.local", 200, 10*time.Second)
		if !strings.HasPrefix(body, "httpbin-") {
			t.Errorf("GET httpbin VIP: body %q, want an httpbin endpoint's answer", body)
		}
	}
	if n := len(hb1.requests("/get")) + len(hb2.requests("/get")); n != 4 {
		t.Errorf("httpbin endpoints saw %d requests, want 4", n)
	}
	// Passthrough (ALLOW_ANY): an address no service has.
	if _, err := tcpEcho(topo.Pod, ap(topo.SvcV4, 7000), 4096); err != nil {
		t.Errorf("passthrough to an unregistered destination: %v", err)
	}
	if len(ext.accepted()) != 1 {
		t.Errorf("the unregistered server accepted %d connections, want 1", len(ext.accepted()))
	}
	// The clusters' and virtualInbound's TLS contexts have the agent's
	// certificate: /certs shows it.
	if s := certSerial(t, topo); s == "" {
		t.Errorf("/certs shows no workload certificate from the agent:\n%s", adminGet(t, topo, "/certs"))
	}
	if n := srv.NACKs(); len(n) != 0 {
		t.Fatalf("NACK after the flows: %+v", n)
	}
}
