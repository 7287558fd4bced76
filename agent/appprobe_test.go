package agent

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// probeServer is the status handler with the probes of js, the
// application being on 127.0.0.1.
func probeServer(t *testing.T, js string) *httptest.Server {
	t.Helper()
	ap, err := parseAppProbers(js, netip.MustParseAddr("127.0.0.1"), 15020)
	if err != nil {
		t.Fatal(err)
	}
	s := &statusServer{AppProbes: ap}
	srv := httptest.NewServer(s.StatusHandler())
	t.Cleanup(srv.Close)
	return srv
}

func probeGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func portOf(t *testing.T, addr string) string {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAppProbeHTTPGet(t *testing.T) {
	var gotHost, gotUA string
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotHost, gotUA = r.Host, r.UserAgent()
		switch r.URL.Path {
		case "/healthz":
			io.WriteString(w, "fine")
		case "/moved":
			http.Redirect(w, r, "http://elsewhere.example/", http.StatusFound)
		default:
			http.Error(w, "sick", http.StatusServiceUnavailable)
		}
	}))
	defer app.Close()
	port := portOf(t, app.Listener.Addr().String())
	srv := probeServer(t, `{
		"/app-health/web/livez": {"httpGet": {"path": "/healthz", "port": `+port+`, "scheme": "HTTP"}, "timeoutSeconds": 2},
		"/app-health/web/readyz": {"httpGet": {"path": "sick", "port": `+port+`}},
		"/app-health/web/startupz": {"httpGet": {"path": "/moved", "port": `+port+`}}}`)

	code, body := probeGet(t, srv.URL+"/app-health/web/livez")
	if code != 200 || body != "fine" {
		t.Fatalf("passing httpGet probe: %d %q, want 200 with the application's body", code, body)
	}
	if gotUA != "Go-http-client/1.1" || gotHost == "" {
		t.Fatalf("the kubelet's headers did not reach the application: UA %q Host %q", gotUA, gotHost)
	}
	if code, body := probeGet(t, srv.URL+"/app-health/web/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "sick") {
		t.Fatalf("failing httpGet probe: %d %q, want the application's 503", code, body)
	}
	if code, _ := probeGet(t, srv.URL+"/app-health/web/startupz"); code != 200 {
		t.Fatalf("a redirect to another host passes (kubelet): got %d", code)
	}
	if code, body := probeGet(t, srv.URL+"/app-health/other/livez"); code != 404 || !strings.Contains(body, envAppProbers) {
		t.Fatalf("probe path not given: %d %q, want 404 naming %s", code, body, envAppProbers)
	}
	app.Close()
	if code, body := probeGet(t, srv.URL+"/app-health/web/livez"); code != 500 || !strings.Contains(body, "application probe failed") {
		t.Fatalf("application down: %d %q, want 500", code, body)
	}
}

func TestAppProbeHostAimedAtStatusPort(t *testing.T) {
	var gotHost string
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { gotHost = r.Host }))
	defer app.Close()
	port := portOf(t, app.Listener.Addr().String())
	ap, err := parseAppProbers(`{"/app-health/web/livez": {"httpGet": {"path": "/", "port": `+port+`}}}`, netip.MustParseAddr("127.0.0.1"), 15020)
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodGet, "/app-health/web/livez", nil)
	req.Host = "10.1.2.3:15020" // the kubelet probes the status port by pod IP
	rec := httptest.NewRecorder()
	ap.ServeHTTP(rec, req)
	if rec.Code != 200 || gotHost != "10.1.2.3:"+port {
		t.Fatalf("got %d, Host %q at the application; want 200 and Host 10.1.2.3:%s", rec.Code, gotHost, port)
	}
}

func TestAppProbeTCPSocket(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := portOf(t, closed.Addr().String())
	closed.Close()
	srv := probeServer(t, `{
		"/app-health/db/livez": {"tcpSocket": {"port": `+portOf(t, ln.Addr().String())+`}},
		"/app-health/db/readyz": {"tcpSocket": {"port": `+closedPort+`}}}`)
	if code, _ := probeGet(t, srv.URL+"/app-health/db/livez"); code != 200 {
		t.Fatalf("tcpSocket probe to a listening port: %d, want 200", code)
	}
	if code, _ := probeGet(t, srv.URL+"/app-health/db/readyz"); code != 500 {
		t.Fatalf("tcpSocket probe to a closed port: %d, want 500", code)
	}
}

func TestAppProbeGRPC(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("payments", healthpb.HealthCheckResponse_NOT_SERVING)
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	go gs.Serve(ln)
	defer gs.Stop()
	port := portOf(t, ln.Addr().String())
	srv := probeServer(t, `{
		"/app-health/api/livez": {"grpc": {"port": `+port+`}},
		"/app-health/api/readyz": {"grpc": {"port": `+port+`, "service": "payments"}},
		"/app-lifecycle/api/poststartz": {"grpc": {"port": `+port+`, "service": "unknown"}}}`)
	if code, body := probeGet(t, srv.URL+"/app-health/api/livez"); code != 200 {
		t.Fatalf("grpc probe of a SERVING server: %d %q", code, body)
	}
	if code, body := probeGet(t, srv.URL+"/app-health/api/readyz"); code != 500 || !strings.Contains(body, "NOT_SERVING") {
		t.Fatalf("grpc probe of a NOT_SERVING service: %d %q, want 500 naming NOT_SERVING", code, body)
	}
	if code, _ := probeGet(t, srv.URL+"/app-lifecycle/api/poststartz"); code != 500 {
		t.Fatalf("grpc probe of an unknown service: %d, want 500", code)
	}
}

func TestAppProbersBadInput(t *testing.T) {
	for _, tc := range []struct{ js, want string }{
		{`{"/app-health/a/livez": {"httpGet": {"port": "http"}}}`, `httpGet.port "http": must be a number`},
		{`{"/app-health/a/livez": {}}`, "exactly one of httpGet, tcpSocket, grpc"},
		{`{"/app-health/a/livez": {"tcpSocket": {"port": 1}, "grpc": {"port": 2}}}`, "exactly one"},
		{`{"/healthz/ready": {"tcpSocket": {"port": 1}}}`, "path must match"},
		{`{"/app-health/a/livez": {"tcpSocket": {"port": 70000}}}`, "port 70000: out of range"},
		{`{"/app-health/a/livez": {"exec": {"command": ["true"]}}}`, `unknown field "exec"`},
		{`not json`, "invalid character"},
	} {
		_, err := parseAppProbers(tc.js, netip.Addr{}, 15020)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), envAppProbers) {
			t.Errorf("%s: got %v, want an error naming %s and %q", tc.js, err, envAppProbers, tc.want)
		}
	}
}

func TestDrainEndpoint(t *testing.T) {
	drained := make(chan struct{}, 1)
	s := &statusServer{Ready: func(context.Context) error { return nil }, Drain: func() { drained <- struct{}{} }}
	srv := httptest.NewServer(s.StatusHandler())
	defer srv.Close()
	if code, _ := probeGet(t, srv.URL+"/drain"); code != http.StatusMethodNotAllowed {
		t.Fatalf("GET /drain: %d, want 405", code)
	}
	resp, err := http.Post(srv.URL+"/drain", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("POST /drain: %d", resp.StatusCode)
	}
	<-drained
	if code, body := probeGet(t, srv.URL+"/healthz/ready"); code != http.StatusServiceUnavailable || !strings.Contains(body, "draining") {
		t.Fatalf("readiness after /drain: %d %q, want 503 draining", code, body)
	}
}
