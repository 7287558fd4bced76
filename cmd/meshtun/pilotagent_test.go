package main

import (
	"bytes"
	"slices"
	"strings"
	"testing"
)

// The argv Istio's stock injection template gives the sidecar
// (injection-template.yaml: proxy sidecar --domain … --proxyLogLevel=…
// --proxyComponentLogLevel=… --log_output_level=…), with a meshtun
// template's own flags after them.
func TestPilotAgentProxyArgsOfIstiosTemplate(t *testing.T) {
	out, ignored, err := translateProxyArgs([]string{"sidecar", "--domain", "shop.svc.cluster.local",
		"--proxyLogLevel=warning,misc:error", "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info",
		"--concurrency", "2", "--log_as_json", "--state-dir", "/run/x", "--inbound=false"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"--domain", "shop.svc.cluster.local", "--proxy-arg=--log-level=warning", "--log-level", "info",
		"--proxy-arg=--concurrency=2", "--log-format", "json", "--state-dir", "/run/x", "--inbound=false"}
	if !slices.Equal(out, want) {
		t.Fatalf("meshtun agent args:\n got %q\nwant %q", out, want)
	}
	if len(ignored) != 1 || !strings.Contains(ignored[0], "--proxyComponentLogLevel=misc:error") {
		t.Fatalf("accepted-but-ignored: %q, want the component levels named", ignored)
	}
}

func TestPilotAgentProxyArgsRefused(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "want the proxy type first"},
		{[]string{"router"}, "only sidecar"},
		{[]string{"waypoint"}, "unknown proxy type"},
		{[]string{"sidecar", "--proxyLogLevel=loud"}, `--proxyLogLevel: level "loud"`},
		{[]string{"sidecar", "--concurrency=many"}, `--concurrency "many"`},
		{[]string{"sidecar", "--domain"}, "--domain needs a value"},
		{[]string{"sidecar", "extra"}, `unexpected argument "extra"`},
	} {
		_, _, err := translateProxyArgs(tc.args)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want an error with %q", tc.args, err, tc.want)
		}
	}
	// A flag neither pilot-agent nor meshtun agent knows is refused by the
	// agent, by name, before anything starts.
	var stderr bytes.Buffer
	if code := runPilotAgent([]string{"proxy", "sidecar", "--no-such-flag=1"}, &bytes.Buffer{}, &stderr); code != 2 || !strings.Contains(stderr.String(), "no-such-flag") {
		t.Fatalf("unknown flag: exit %d, %q", code, stderr.String())
	}
}

func TestPilotAgentCommands(t *testing.T) {
	var out, errb bytes.Buffer
	if code := runPilotAgent([]string{"istio-iptables", "-p", "15001"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "istio-iptables") {
		t.Fatalf("unsupported command: exit %d %q", code, errb.String())
	}
	errb.Reset()
	if code := runPilotAgent([]string{"request", "--debug-port", "22", "GET", "/"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "debug port 22 is not in the allowed list") {
		t.Fatalf("request to a port pilot-agent refuses: exit %d %q", code, errb.String())
	}
	out.Reset()
	if code := runPilotAgent([]string{"version"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "pilot-agent") {
		t.Fatalf("version: exit %d %q", code, out.String())
	}
	errb.Reset()
	if code := runPilotAgent([]string{"wait", "--timeoutSeconds", "0"}, &out, &errb); code != 2 {
		t.Fatalf("wait --timeoutSeconds 0: exit %d %q", code, errb.String())
	}
}
