//go:build linux

package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// meshtunCP is a running `meshtun controlplane` in the services namespace:
// ADS on GwV4:15010 (where adsBootstrap points the proxy), its API on
// 127.0.0.1:15014 of that namespace.
type meshtunCP struct {
	*proxyProc
	ns        string
	registry  string // the watched registry file
	tokenFile string
}

const cpAPI = "127.0.0.1:15014"

// startMeshtunControlPlane runs the control plane on registry (YAML text,
// written to a file it watches) and waits for "control plane ready".
func startMeshtunControlPlane(t *testing.T, topo *topology, registry string, extra ...string) *meshtunCP {
	t.Helper()
	bin := meshtunBin(t)
	dir := t.TempDir()
	cp := &meshtunCP{ns: topo.Services, registry: filepath.Join(dir, "registry.yaml"),
		tokenFile: filepath.Join(dir, "state", "controlplane.token")}
	cp.writeRegistry(t, registry)
	args := append([]string{"netns", "exec", topo.Services, bin, "controlplane", "--log-format", "json", "--log-level", "debug",
		"--registry", cp.registry, "--state-dir", filepath.Join(dir, "state"),
		"--xds-address", ap(topo.GwV4, 15010), "--api-address", cpAPI}, extra...)
	p := startProc(t, "meshtun controlplane", args, nil, syscall.SIGTERM)
	if !p.waitLine(func(l string) bool { return logMessage(l) == "control plane ready" }, 10*time.Second) {
		t.Fatalf("%s not ready after 10s (exited: %v %v); log:\n%s", p.name, p.exited(), p.waitErr, strings.Join(p.logLines(), "\n"))
	}
	cp.proxyProc = p
	return cp
}

// writeRegistry replaces the registry file by a rename, as editors and
// config-map updates do.
func (cp *meshtunCP) writeRegistry(t *testing.T, doc string) {
	t.Helper()
	tmp := cp.registry + ".tmp"
	if err := os.WriteFile(tmp, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, cp.registry); err != nil {
		t.Fatal(err)
	}
}

// meshtunCmd runs `meshtun args...` in ns and returns its exit code and
// output.
func meshtunCmd(t *testing.T, ns string, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, meshtunBin(t)}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("meshtun %v: %v", args, err)
	}
	return code, out.String(), errb.String()
}

// profile runs `meshtun profile args...` against the control plane's API.
func (cp *meshtunCP) profile(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	return meshtunCmd(t, cp.ns, append(append([]string{"profile"}, args...), "--controlplane", cpAPI, "--token-file", cp.tokenFile)...)
}

// liveProfile is `meshtun profile dump --controlplane`.
func (cp *meshtunCP) liveProfile(t *testing.T) string {
	t.Helper()
	code, out, errs := cp.profile(t, "dump")
	if code != 0 {
		t.Fatalf("profile dump --controlplane: exit %d: %s", code, errs)
	}
	return out
}

// applyProfile writes doc to a file and applies it with `meshtun profile
// apply -f`.
func (cp *meshtunCP) applyProfile(t *testing.T, name, doc string) (int, string, string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(f, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	return cp.profile(t, "apply", "-f", f)
}

// api calls the control plane's HTTP API from inside its namespace.
func (cp *meshtunCP) api(t *testing.T, method, path, token, body string) (int, string) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) { return dialTCP(cp.ns, addr, dialTimeout) },
	}}
	req, err := http.NewRequest(method, "http://"+cpAPI+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (cp *meshtunCP) token(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(cp.tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// cpStatus is GET /v1/status.
type cpStatus struct {
	Version               string `json:"version"`
	OutboundTrafficPolicy string `json:"outboundTrafficPolicy"`
	RegistryRejected      int    `json:"registryRejected"`
	ProfileRejected       int    `json:"profileRejected"`
	LastRejection         string `json:"lastRejection"`
	Nodes                 []struct {
		ID    string `json:"id"`
		ACKs  int    `json:"acks"`
		NACKs int    `json:"nacks"`
	} `json:"nodes"`
}

func (cp *meshtunCP) status(t *testing.T) cpStatus {
	t.Helper()
	code, body := cp.api(t, http.MethodGet, "/v1/status", cp.token(t), "")
	var st cpStatus
	if code != http.StatusOK || json.Unmarshal([]byte(body), &st) != nil {
		t.Fatalf("status: %d %s", code, body)
	}
	return st
}

// waitServes waits (10 s at most) until dst echoes through the proxy.
func waitServes(t *testing.T, topo *topology, dst string) {
	t.Helper()
	dialUntil(t, topo, dst, 10*time.Second).Close()
}

// untilRefused polls a connect to dst until it is refused (ECONNREFUSED:
// a timeout is not a refusal), within d of since; it returns how long
// after since the refusal came.
func untilRefused(t *testing.T, topo *topology, dst string, since time.Time, d time.Duration) time.Duration {
	t.Helper()
	for {
		c, err := dialTCP(topo.Pod, dst, 250*time.Millisecond)
		took := time.Since(since)
		if err == nil {
			c.Close()
		} else if errors.Is(err, syscall.ECONNREFUSED) {
			if took > d {
				t.Fatalf("%s refused %v after the change, want within %v", dst, took, d)
			}
			return took
		}
		if took > d {
			t.Fatalf("%s not refused %v after the change (last: %v)", dst, took, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// untilConnects polls an echo through dst until it works, within d of
// since. Each attempt's connect is bounded by 250 ms: before the change
// arrives, a flow to an address nobody owns waits on its upstream connect.
func untilConnects(t *testing.T, topo *topology, dst string, since time.Time, d time.Duration) time.Duration {
	t.Helper()
	for {
		c, err := dialTCP(topo.Pod, dst, 250*time.Millisecond)
		if err == nil {
			err = echoRoundTrip(c, randomPayload(64), echoTimeout)
			c.Close()
		}
		took := time.Since(since)
		if err == nil {
			if took > d {
				t.Fatalf("%s works only %v after the change, want within %v", dst, took, d)
			}
			return took
		}
		if took > d {
			t.Fatalf("%s still fails %v after the change: %v", dst, took, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// dialUntil connects to dst from the pod, retrying for up to d (a
// configuration on its way), and fails the test if it never connects.
func dialUntil(t *testing.T, topo *topology, dst string, d time.Duration) *net.TCPConn {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		c, err := dialTCP(topo.Pod, dst, 250*time.Millisecond)
		if err == nil {
			if err = pingPong(c, []byte("ping")); err == nil {
				return c
			}
			c.Close()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never served within %v: %v", dst, d, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func registryDoc(services ...string) string {
	return "apiVersion: meshtun.io/v1alpha1\nkind: Registry\nservices:\n" + strings.Join(services, "")
}

func serviceDoc(name string, vipAddr fmt.Stringer, port uint16, protocol string, endpoints ...fmt.Stringer) string {
	s := fmt.Sprintf("- name: %s\n  namespace: default\n  vip: %s\n  ports: [{name: main, port: %d, protocol: %s}]\n  endpoints:\n", name, vipAddr, port, protocol)
	for _, e := range endpoints {
		s += fmt.Sprintf("  - {address: %s}\n", e)
	}
	return s
}
