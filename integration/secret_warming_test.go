//go:build linux

package integration

import (
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/agent/sds"
	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestIstioClustersWarmOnSDS: `meshtun proxy` on Istio's rendered
// bootstrap, with istiod's configuration on the xDS pipe and the agent's
// SDS server up but without a certificate yet (the CA is slow). istiod's
// outbound clusters name default and ROOTCA: they are ACKed and warm
// (dynamic_warming_clusters, absent from /clusters), and /ready says
// INITIALIZING and which secrets from where. Two seconds later the agent
// gets its certificate: the clusters go into force and /ready is LIVE,
// with no reload and no new xDS update.
func TestIstioClustersWarmOnSDS(t *testing.T) {
	requireRoot(t)
	requireIstioFixtures(t)
	topo := newTopology(t)
	bs, xdsSock, sdsSock := istioBootstrapCopy(t, t.TempDir())

	cp := xdstest.NewUnixServer(t, xdsSock)
	cp.Set(t, istioNode, istiodConfig(t))
	srv, err := sds.New(sds.Options{SocketPath: sdsSock, SocketMode: 0o660, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })

	px := startProxy(t, topo, "--bootstrap", bs, "--capture", "none")
	xdstest.Eventually(t, 15*time.Second, "CDS and LDS ACKed", func() bool {
		return cp.ACKs(resource.ListenerType) > 0 && cp.ACKs(resource.ClusterType) > 0
	})
	if n := cp.NACKs(); len(n) != 0 {
		t.Fatalf("istiod's configuration NACKed: %+v", n)
	}
	const httpbin = "outbound|80||httpbin.default.svc.cluster.local"
	code, ready := adminStatus(t, topo, "/ready")
	if want := "INITIALIZING\nwaiting for secret ROOTCA from sds-grpc, secret default from sds-grpc\n"; code != 503 || ready != want {
		t.Errorf("/ready while the secrets are missing = %d %q, want 503 %q", code, ready, want)
	}
	if strings.Contains(adminGet(t, topo, "/clusters"), httpbin+"::") {
		t.Errorf("%s in force before its secrets", httpbin)
	}
	if !strings.Contains(adminGet(t, topo, "/config_dump?resource=dynamic_warming_clusters"), httpbin) {
		t.Errorf("%s not in dynamic_warming_clusters", httpbin)
	}
	time.Sleep(2 * time.Second)
	if code, ready := adminStatus(t, topo, "/ready"); code != 503 || !strings.HasPrefix(ready, "INITIALIZING") {
		t.Fatalf("/ready = %d %q without the secrets", code, ready)
	}

	id, _ := testIdentity(t, "spiffe://cluster.local/ns/default/sa/app")
	if err := srv.Update(id); err != nil {
		t.Fatal(err)
	}
	issued := time.Now()
	xdstest.Eventually(t, 10*time.Second, "/ready LIVE", func() bool {
		code, ready := adminStatus(t, topo, "/ready")
		return code == 200 && ready == "LIVE\n"
	})
	t.Logf("LIVE %v after the certificate was issued", time.Since(issued).Round(time.Millisecond))
	if !strings.Contains(adminGet(t, topo, "/clusters"), httpbin+"::") {
		t.Errorf("%s not in force once its secrets arrived", httpbin)
	}
	if strings.Contains(adminGet(t, topo, "/config_dump?resource=dynamic_warming_clusters"), httpbin) {
		t.Errorf("%s still warming", httpbin)
	}
	if n := cp.NACKs(); len(n) != 0 {
		t.Errorf("NACKs: %+v", n)
	}
	if px.exited() {
		t.Fatalf("proxy exited: %v", px.waitErr)
	}
}

// adminStatus fetches path from the proxy's admin API in the pod and
// returns the status code and body, whatever the status.
func adminStatus(t *testing.T, topo *topology, path string) (int, string) {
	t.Helper()
	c, err := dialTCP(topo.Pod, "127.0.0.1:15000", dialTimeout)
	if err != nil {
		t.Fatalf("admin: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path)
	resp, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("admin %s: %v", path, err)
	}
	head, body, _ := strings.Cut(string(resp), "\r\n\r\n")
	var code int
	if _, err := fmt.Sscanf(head, "HTTP/1.%d %d", new(int), &code); err != nil {
		t.Fatalf("admin %s: %q", path, head)
	}
	return code, body
}
