//go:build linux

package integration

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestControlPlaneHTTPRoutesByHost runs `meshtun controlplane` on a
// registry of two HTTP services on port 80 (different VIPs) and a proxy
// fed by it over ADS (delta and state of the world). The control plane
// serves Istio's HTTP shape: one listener 0.0.0.0_80 with an
// http_connection_manager and the route configuration "80" over RDS.
// From the pod, requests to the first VIP reach the service their Host
// names (svc1 or svc2: routing by Host over one listener); a request for
// an unknown Host goes, under ALLOW_ANY, through allow_any and
// PassthroughCluster to its original destination (an unregistered server
// on port 80); `meshtun profile apply -f` REGISTRY_ONLY makes the same
// request a 502 (block_all) within a second, and the registered services
// still answer.
func TestControlPlaneHTTPRoutesByHost(t *testing.T) {
	requireRoot(t)
	for _, api := range []string{"DELTA_GRPC", "GRPC"} {
		t.Run(api, func(t *testing.T) { controlPlaneHTTP(t, api) })
	}
}

func httpServiceDoc(name string, vipAddr, endpoint netip.Addr) string {
	return fmt.Sprintf("- name: %s\n  namespace: default\n  vip: %s\n  ports: [{name: http, port: 80, targetPort: 8080, protocol: HTTP}]\n  endpoints:\n  - {address: %s}\n",
		name, vipAddr, endpoint)
}

// tryGet is get1 without failing the test: for polling.
func tryGet(c *http.Client, url, host string) (int, string, error) {
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		return 0, "", err
	}
	req.Host = host
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func controlPlaneHTTP(t *testing.T, api string) {
	topo := newTopology(t)
	startHTTPServer(t, topo.Services, ap(topo.SvcV4, 8080), "svc1")
	startHTTPServer(t, topo.Services, ap(topo.Svc2V4, 8080), "svc2")
	outside := startHTTPServer(t, topo.Services, ap(topo.SvcV4, 80), "outside") // registered nowhere
	v1, v2 := vip(topo, false, 60), vip(topo, false, 61)
	// The demo profile (accessLogFile /dev/stdout) gives the HTTP
	// connection managers the access_log this test reads request lines
	// from: without one the proxy, as Envoy, logs no request.
	cp := startMeshtunControlPlane(t, topo, registryDoc(httpServiceDoc("svc1", v1, topo.SvcV4), httpServiceDoc("svc2", v2, topo.Svc2V4)), "--profile", "demo")
	px := startProxy(t, topo, "--bootstrap", adsBootstrap(t, topo, api))

	url1, urlOutside := "http://"+ap(v1, 80), "http://"+ap(topo.SvcV4, 80)
	poll := podClient(topo, false, 1)
	poll.Timeout = 500 * time.Millisecond
	defer poll.CloseIdleConnections()
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body, err := tryGet(poll, url1+"/", "svc1")
		if err == nil && code == http.StatusOK && body == "svc1 /" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("svc1 never served through 0.0.0.0_80: %d %q %v\nlisteners:\n%s", code, body, err, adminGet(t, topo, "/listeners"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	ls := adminGet(t, topo, "/listeners")
	if !strings.Contains(ls, "0.0.0.0_80::0.0.0.0:80") || strings.Contains(ls, v1.String()+"_80") || strings.Contains(ls, v2.String()+"_80") {
		t.Errorf("want one HTTP listener 0.0.0.0_80 and none per VIP:\n%s", ls)
	}

	c := podClient(topo, false, 2)
	defer c.CloseIdleConnections()
	// Routing by Host over one listener: the VIP the client dialled does
	// not decide, the Host header does (Istio's domains: short name, FQDN,
	// the VIP itself).
	for _, tc := range []struct{ url, host, want string }{
		{url1 + "/a", "svc1", "svc1 /a"},
		{url1 + "/b", "svc2", "svc2 /b"},
		{url1 + "/c", "svc2.default.svc.cluster.local", "svc2 /c"},
		{url1 + "/d", "svc1.default:80", "svc1 /d"},
		{"http://" + ap(v2, 80) + "/e", v2.String(), "svc2 /e"},
	} {
		if code, body := get1(t, c, tc.url, tc.host); code != http.StatusOK || body != tc.want {
			t.Errorf("GET %s Host %s: %d %q, want 200 %q", tc.url, tc.host, code, body, tc.want)
		}
	}
	if _, ok := px.waitAccess(func(e AccessEntry) bool {
		return e.UpstreamCluster == "outbound|80||svc2.default.svc.cluster.local" && strings.Contains(e.Raw, `"route_name":"default"`)
	}, accessWait); !ok {
		t.Error("no access line for svc2's default route")
	}

	// ALLOW_ANY: an unknown Host goes to the original destination.
	before := outside.accepts.Load()
	if code, body := get1(t, c, urlOutside+"/x", "unknown.example.com"); code != http.StatusOK || body != "outside /x" {
		t.Fatalf("ALLOW_ANY, unknown Host: %d %q, want the original destination's answer", code, body)
	}
	if outside.accepts.Load() == before {
		t.Error("the original destination accepted no connection")
	}
	if e, ok := px.waitAccess(func(e AccessEntry) bool {
		return e.UpstreamCluster == "PassthroughCluster" && strings.Contains(e.Raw, `"route_name":"allow_any"`) &&
			strings.Contains(e.Raw, `"authority":"unknown.example.com"`)
	}, accessWait); !ok {
		t.Errorf("no HTTP access line through allow_any and PassthroughCluster: %v", e)
	}

	// REGISTRY_ONLY: block_all answers 502 within a second of the apply.
	code, out, errs := cp.applyProfile(t, "registry-only.yaml", profileRegistryOnlyAccessLog)
	applied := time.Now()
	if code != 0 || !strings.Contains(out, "REGISTRY_ONLY") {
		t.Fatalf("profile apply REGISTRY_ONLY: exit %d\n%s%s", code, out, errs)
	}
	for {
		code, body, err := tryGet(poll, urlOutside+"/y", "unknown.example.com")
		if err == nil && code == http.StatusBadGateway {
			break
		}
		if time.Since(applied) > time.Second {
			t.Fatalf("unknown Host still answered %d %q (%v) %v after `profile apply` REGISTRY_ONLY returned", code, body, err, time.Since(applied))
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%s: block_all in force %v after `profile apply` returned", api, time.Since(applied))
	// A connection accepted under REGISTRY_ONLY. Routes are resolved in
	// the snapshot in force at each request (mesh/dispatch.go, liveEnv), so
	// one kept alive from before the switch gets block_all as well (only
	// its listener and http_connection_manager stay those it started with);
	// the idle ones are closed so that this request exercises a new one.
	c.CloseIdleConnections()
	before = outside.accepts.Load()
	if code, _ := get1(t, c, urlOutside+"/z", "unknown.example.com"); code != http.StatusBadGateway {
		t.Errorf("REGISTRY_ONLY, unknown Host: %d, want 502", code)
	}
	if _, ok := px.waitAccess(func(e AccessEntry) bool { return strings.Contains(e.Raw, `"route_name":"block_all"`) }, accessWait); !ok {
		t.Error("no access line for block_all")
	}
	for host, want := range map[string]string{"svc1": "svc1 /r", "svc2": "svc2 /r"} {
		if code, body := get1(t, c, url1+"/r", host); code != http.StatusOK || body != want {
			t.Errorf("REGISTRY_ONLY, Host %s: %d %q, want 200 %q", host, code, body, want)
		}
	}
	if n := outside.accepts.Load() - before; n != 0 {
		t.Errorf("the unregistered server accepted %d connections under REGISTRY_ONLY", n)
	}

	st := cp.status(t)
	if len(st.Nodes) != 1 || st.Nodes[0].NACKs != 0 || st.Nodes[0].ACKs == 0 {
		t.Errorf("control plane status: %+v", st)
	}
}
