//go:build linux

package integration

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// pilotAgentBin is a pilot-agent link to the meshtun binary, as the image
// ships it.
func pilotAgentBin(t *testing.T) string {
	t.Helper()
	link := filepath.Join(t.TempDir(), "pilot-agent")
	if err := os.Symlink(meshtunBin(t), link); err != nil {
		t.Fatal(err)
	}
	return link
}

// pilotAgent runs the pilot-agent link in ns; the exit code and stderr.
func pilotAgent(t *testing.T, ns, bin string, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns, bin}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, stdout.String(), stderr.String()
}

// TestPilotAgentCompatibility runs meshtun under the name pilot-agent with
// the argv Istio's injection template gives it, and its lifecycle hooks
// and rewritten application probes, in a pod namespace (issue 16, item 2):
//   - `pilot-agent proxy sidecar --domain … --proxyLogLevel=… …` starts the
//     agent (flags it does not act on named once);
//   - `pilot-agent wait` fails while the proxy has no configuration and
//     passes once it has;
//   - /app-health/<container>/… on the status port, probed from outside
//     the pod as the kubelet does, runs the application's httpGet,
//     tcpSocket and grpc probes (pass and fail each);
//   - `pilot-agent request --debug-port=15020 POST drain` (the native
//     sidecar's preStop) makes readiness fail while the proxy still
//     serves outbound;
//   - `pilot-agent request GET /listeners` reads the proxy's admin.
func TestPilotAgentCompatibility(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	pa := pilotAgentBin(t)

	// The application, in the pod: HTTP, TCP and gRPC health endpoints, on
	// the address INSTANCE_IP names (the one xdsNode is made of).
	appIP := netip.MustParseAddr("10.0.0.2")
	if out, err := run("ip", "-n", topo.Pod, "addr", "add", appIP.String()+"/32", "dev", "lo"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	hl, err := listenTCP(topo.Pod, ap(appIP, 8081))
	if err != nil {
		t.Fatal(err)
	}
	hsrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/ok" {
			io.WriteString(w, "app ok")
			return
		}
		http.Error(w, "app sick", http.StatusServiceUnavailable)
	}), ReadHeaderTimeout: 5 * time.Second}
	go hsrv.Serve(hl)
	t.Cleanup(func() { hsrv.Close() })
	startTCPServer(t, topo.Pod, ap(appIP, 8082), func(c *net.TCPConn) { c.Close() })
	gl, err := listenTCP(topo.Pod, ap(appIP, 8083))
	if err != nil {
		t.Fatal(err)
	}
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("down", healthpb.HealthCheckResponse_NOT_SERVING)
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	go gs.Serve(gl)
	t.Cleanup(gs.Stop)

	probers := `{
		"/app-health/web/livez": {"httpGet": {"path": "/ok", "port": 8081}, "timeoutSeconds": 2},
		"/app-health/web/readyz": {"httpGet": {"path": "/sick", "port": 8081}},
		"/app-health/db/livez": {"tcpSocket": {"port": 8082}},
		"/app-health/db/readyz": {"tcpSocket": {"port": 8089}},
		"/app-health/api/livez": {"grpc": {"port": 8083}},
		"/app-health/api/readyz": {"grpc": {"port": 8083, "service": "down"}}}`
	env := []string{"PATH=" + os.Getenv("PATH"), "POD_NAME=app", "POD_NAMESPACE=default", "SERVICE_ACCOUNT=app",
		"INSTANCE_IP=" + appIP.String(), "ISTIO_KUBE_APP_PROBERS=" + probers}
	args := []string{"netns", "exec", topo.Pod, pa, "proxy", "sidecar", "--domain", "default.svc.cluster.local",
		"--proxyLogLevel=warning,misc:error", "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info",
		"--log_as_json",
		// meshtun's own, as a meshtun template adds them
		"--state-dir", topo.StateDir, "--bootstrap-out", filepath.Join(t.TempDir(), "envoy-rev.json"),
		"--pod-labels-file", "", "--pod-annotations-file", "", "--discovery-address", ap(topo.GwV4, 15010)}
	ag := startProc(t, "pilot-agent proxy sidecar", args, env, syscall.SIGKILL)
	if !ag.waitLine(func(l string) bool { return logMessage(l) == "proxy started" }, 15*time.Second) {
		t.Fatalf("pilot-agent proxy sidecar did not start its proxy; log:\n%s", strings.Join(ag.logLines(), "\n"))
	}
	if !ag.waitLine(func(l string) bool {
		return strings.Contains(l, "accepted, not acted on by meshtun: --proxyComponentLogLevel=misc:error")
	}, time.Second) {
		t.Errorf("the flag meshtun does not act on was not named")
	}

	// No configuration yet: wait gives up, naming what it saw.
	code, _, stderr := pilotAgent(t, topo.Pod, pa, "wait", "--timeoutSeconds=1", "--periodMillis=100")
	if code == 0 || !strings.Contains(stderr, "timeout waiting for the proxy") {
		t.Fatalf("pilot-agent wait without configuration: exit %d %q, want a timeout", code, stderr)
	}
	vipAddr := xdsService(t, cp, topo, "1", 72, netip.AddrPortFrom(topo.SvcV4, 9080))
	if code, _, stderr := pilotAgent(t, topo.Pod, pa, "wait", "--timeoutSeconds", "20", "--periodMillis", "100"); code != 0 {
		t.Fatalf("pilot-agent wait after the push: exit %d %s", code, stderr)
	}

	// The kubelet probes the status port by the pod's IP from outside.
	for _, tc := range []struct {
		path string
		code int
		body string
	}{
		{"/app-health/web/livez", 200, "app ok"},
		{"/app-health/web/readyz", 503, "app sick"},
		{"/app-health/db/livez", 200, ""},
		{"/app-health/db/readyz", 500, "application probe failed"},
		{"/app-health/api/livez", 200, ""},
		{"/app-health/api/readyz", 500, "NOT_SERVING"},
		{"/app-health/nope/livez", 404, "ISTIO_KUBE_APP_PROBERS"},
	} {
		code, body, err := httpGetIn(topo.Services, ap(topo.PodV4, 15020), tc.path, 5*time.Second)
		if err != nil || code != tc.code || !strings.Contains(body, tc.body) {
			t.Errorf("GET %s from outside the pod: %d %q (%v), want %d with %q", tc.path, code, body, err, tc.code, tc.body)
		}
	}

	// The admin through pilot-agent request.
	code, out, stderr := pilotAgent(t, topo.Pod, pa, "request", "GET", "/listeners")
	if code != 0 || !strings.Contains(out, "virtualOutbound::") {
		t.Fatalf("pilot-agent request GET /listeners: exit %d %q %q", code, out, stderr)
	}

	// The native sidecar's preStop: readiness fails, outbound still flows.
	if code, body := readiness(topo); code != 200 {
		t.Fatalf("readiness before the drain: %d %s", code, body)
	}
	code, out, stderr = pilotAgent(t, topo.Pod, pa, "request", "--debug-port=15020", "POST", "drain")
	if code != 0 || !strings.Contains(out, "OK") {
		t.Fatalf("pilot-agent request --debug-port=15020 POST drain: exit %d %q %q", code, out, stderr)
	}
	if code, body := readiness(topo); code != 503 || !strings.Contains(body, "draining") {
		t.Fatalf("readiness after POST drain: %d %q, want 503 draining", code, body)
	}
	if _, err := tcpEcho(topo.Pod, ap(vipAddr, 9080), 1024); err != nil {
		t.Fatalf("outbound through the draining sidecar: %v", err)
	}
	if !ag.waitLine(func(l string) bool { return strings.Contains(logMessage(l), "/drain") }, 5*time.Second) {
		t.Errorf("the agent did not log the drain")
	}
}
