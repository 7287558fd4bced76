package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshtun/meshtun/mesh/bootstrap"
)

func setAgentEnv(t *testing.T, kv ...string) {
	t.Helper()
	base := map[string]string{"POD_NAME": "app", "POD_NAMESPACE": "default", "INSTANCE_IP": "10.0.0.2", "PROXY_CONFIG": "",
		"INSTANCE_IPS": "", "ISTIO_META_INTERCEPTION_MODE": "REDIRECT", "ISTIO_BOOTSTRAP_OVERRIDE": "", "ISTIO_METAJSON_LABELS": ""}
	for i := 0; i+1 < len(kv); i += 2 {
		base[kv[i]] = kv[i+1]
	}
	for k, v := range base {
		t.Setenv(k, v)
		if v == "" {
			os.Unsetenv(k)
		}
	}
}

// TestAgentPrintBootstrap: --print-bootstrap prints the bootstrap the
// environment gives, which the proxy's reader accepts, and starts nothing.
func TestAgentPrintBootstrap(t *testing.T) {
	setAgentEnv(t, "ISTIO_METAJSON_LABELS", `{"app":"ratings"}`)
	out := filepath.Join(t.TempDir(), "bootstrap.json")
	var stdout, stderr bytes.Buffer
	code := run([]string{"agent", "--print-bootstrap", "--bootstrap-out", out, "--pod-labels-file", "", "--pod-annotations-file", ""}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	b, err := bootstrap.Parse(stdout.Bytes(), "stdout", false)
	if err != nil {
		t.Fatal(err)
	}
	if b.GetNode().GetId() != "sidecar~10.0.0.2~app.default~default.svc.cluster.local" || b.GetNode().GetCluster() != "ratings.default" {
		t.Errorf("node %v", b.GetNode())
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("--print-bootstrap wrote %s (%v)", out, err)
	}
}

// TestAgentBadEnvironment is agent test 6 at the command: each bad value
// exits 2 before anything starts, naming the variable and the value.
func TestAgentBadEnvironment(t *testing.T) {
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"INSTANCE_IP", "10.0.0.300"}, `INSTANCE_IP: "10.0.0.300" is not an IP address`},
		{[]string{"INSTANCE_IP", ""}, "INSTANCE_IP or INSTANCE_IPS: required"},
		{[]string{"POD_NAME", ""}, "POD_NAME: required"},
		{[]string{"PROXY_CONFIG", `{"drainDuraton":"5s"}`}, "PROXY_CONFIG: drainDuraton: not a ProxyConfig field"},
		{[]string{"PROXY_CONFIG", `{"imageTyp": "x"}`}, "PROXY_CONFIG: imageTyp: not a ProxyConfig field"},
		{[]string{"PROXY_CONFIG", `{"proxyAdminPort":"admin"}`}, `PROXY_CONFIG: proxyAdminPort: invalid value for int32 field proxyAdminPort: "admin"`},
		{[]string{"PROXY_CONFIG", `{"proxyAdminPort":70000}`}, `PROXY_CONFIG: proxyAdminPort: want a port number 1..65535, got 70000`},
		{[]string{"ISTIO_META_INTERCEPTION_MODE", "EBPF"}, `ISTIO_META_INTERCEPTION_MODE: "EBPF": want REDIRECT, TPROXY or NONE`},
	} {
		t.Run(tc.want, func(t *testing.T) {
			setAgentEnv(t, tc.env...)
			var stdout, stderr bytes.Buffer
			code := run([]string{"agent", "--print-bootstrap", "--pod-labels-file", "", "--pod-annotations-file", ""}, &stdout, &stderr)
			if code != 2 || !strings.Contains(stderr.String(), tc.want) {
				t.Errorf("exit %d, stderr %q; want 2 and %q", code, stderr.String(), tc.want)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout %q", stdout.String())
			}
		})
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"agent", "--capture", "iptables"}, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), "iptables") {
		t.Errorf("--capture iptables: exit %d %q", code, stderr.String())
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--mode", "cloud"}, `-mode: want "sidecar" or "local", got "cloud"`},
		{[]string{"--mode", "local"}, "--mode local needs at least one --capture-cidr"},
		{[]string{"--capture-cidr", "10.96.0.0/12"}, "--capture-cidr applies to --mode local only"},
		{[]string{"--mode", "local", "--capture-cidr", "10.96.0.1/12"}, "host bits set (did you mean 10.96.0.0/12?)"},
		{[]string{"--mode", "local", "--capture", "sidecar", "--capture-cidr", "10.96.0.0/12"}, "drop --capture sidecar"},
	} {
		stderr.Reset()
		if code := run(append([]string{"agent"}, tc.args...), &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("%v: exit %d %q, want 2 and %q", tc.args, code, stderr.String(), tc.want)
		}
	}
}

// TestAgentRequest: `agent request` goes to the admin address in the
// agent's bootstrap.
func TestAgentRequest(t *testing.T) {
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/listeners" {
			w.Write([]byte("virtualOutbound::0.0.0.0:15001\n"))
			return
		}
		w.WriteHeader(404)
	}))
	defer ts.Close()
	host, port, _ := strings.Cut(strings.TrimPrefix(ts.URL, "http://"), ":")
	bs := filepath.Join(t.TempDir(), "envoy-rev.json")
	doc := `{"admin":{"address":{"socket_address":{"address":"` + host + `","port_value":` + port + `}}}}`
	if err := os.WriteFile(bs, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"agent", "request", "--bootstrap-out", bs, "GET", "/listeners"}, &stdout, &stderr); code != 0 ||
		stdout.String() != "virtualOutbound::0.0.0.0:15001\n" {
		t.Errorf("exit %d stdout %q stderr %q", code, stdout.String(), stderr.String())
	}
	// Without a bootstrap: PROXY_CONFIG's proxyAdminPort.
	setAgentEnv(t, "PROXY_CONFIG", `{"proxyAdminPort":`+port+`}`)
	stdout.Reset()
	if code := run([]string{"agent", "request", "--bootstrap-out", bs + ".missing", "--pod-labels-file", "", "--pod-annotations-file", "", "GET", "listeners"}, &stdout, &stderr); code != 0 ||
		!strings.HasPrefix(stdout.String(), "virtualOutbound") {
		t.Errorf("from PROXY_CONFIG: exit %d stdout %q stderr %q", code, stdout.String(), stderr.String())
	}
}

// TestAgentWaitTimesOut: `agent wait` exits 1 naming the last answer.
func TestAgentWaitTimesOut(t *testing.T) {
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "proxy not running", 503)
	}))
	defer ts.Close()
	var stdout, stderr bytes.Buffer
	if code := run([]string{"agent", "wait", "--timeout", "300ms", "--period", "50ms", "--url", ts.URL}, &stdout, &stderr); code != 1 ||
		!strings.Contains(stderr.String(), "503 proxy not running") {
		t.Errorf("exit %d stderr %q", code, stderr.String())
	}
}

// TestAgentCaptureOnlyInterceptionNone: the init container under
// interception mode NONE installs nothing and exits 0, saying so; laptop
// mode has no init container and is refused as a usage error. Every case
// names a TUN that cannot be opened, so an attempt to capture exits 1 and
// never changes the network namespace the test runs in.
func TestAgentCaptureOnlyInterceptionNone(t *testing.T) {
	bad := []string{"--tun-name", "no/such/tun-device-name", "--state-dir", t.TempDir(), "--pod-annotations-file", ""}
	for _, tc := range []struct {
		name string
		mode string
		args []string
	}{
		{"ISTIO_META_INTERCEPTION_MODE=NONE", "NONE", nil},
		{"--capture none", "REDIRECT", []string{"--capture", "none"}},
	} {
		setAgentEnv(t, "ISTIO_META_INTERCEPTION_MODE", tc.mode)
		var stdout, stderr bytes.Buffer
		code := run(append(append([]string{"agent", "--capture-only"}, bad...), tc.args...), &stdout, &stderr)
		if code != 0 || !strings.Contains(stderr.String(), "no capture installed") {
			t.Errorf("%s: exit %d %q, want 0 and the no-op said", tc.name, code, stderr.String())
		}
	}
	setAgentEnv(t)
	var stdout, stderr bytes.Buffer
	if code := run(append([]string{"agent", "--capture-only"}, bad...), &stdout, &stderr); code != 1 {
		t.Errorf("REDIRECT with an impossible TUN: exit %d %q, want 1 (capture attempted)", code, stderr.String())
	}
	stderr.Reset()
	if code := run(append([]string{"agent", "--capture-only", "--mode", "local", "--capture-cidr", "10.96.0.0/12"}, bad...), &stdout, &stderr); code != 2 ||
		!strings.Contains(stderr.String(), "--capture-only: laptop mode has no init container") {
		t.Errorf("--capture-only --mode local: exit %d %q, want 2", code, stderr.String())
	}
}
