//go:build linux && bench

package integration

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestAgentReadyWithCABench measures issue 13's benchmark: the time from
// exec'ing `meshtun agent` to its /healthz/ready answering 200 with its
// certificate from the control plane's CA (TLS 15012, token) and its
// configuration by ADS over the same port, for each key type (RSA 2048,
// Istio's default, and ECDSA P-256), median of 5 starts against one
// control plane. A measurement, not a pass/fail test of speed (make bench
// runs it); it checks that each start does get ready and stops cleanly.
func TestAgentReadyWithCABench(t *testing.T) {
	const runs = 5
	requireRoot(t)
	topo := newTopology(t)
	cp := startMeshtunControlPlane(t, topo, registryDoc(), "--secure-address", ap(topo.GwV4, 15012))
	state := filepath.Dir(cp.tokenFile)
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "istio-token")
	if err := os.WriteFile(tokenFile, []byte(appToken(t, topo, state)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, kt := range []struct{ name, env string }{{"RSA 2048", "ECC_SIGNATURE_ALGORITHM="}, {"ECDSA P-256", "ECC_SIGNATURE_ALGORITHM=ECDSA"}} {
		var took []time.Duration
		for i := 0; i < runs; i++ {
			start := time.Now()
			ag := startAgentNoWait(t, topo, agentEnv(kt.env), "--discovery-address", ap(topo.GwV4, 15012),
				"--ca-root-file", filepath.Join(state, "ca", "root-cert.pem"), "--token-file", tokenFile,
				"--sds-socket", filepath.Join(dir, "socket"))
			for {
				if code, _ := readiness(topo); code == 200 {
					break
				}
				if time.Since(start) > 20*time.Second || ag.exited() {
					code, body := readiness(topo)
					t.Fatalf("%s run %d: not ready after %v (exited %v): %d %s; log:\n%s", kt.name, i+1, time.Since(start), ag.exited(),
						code, body, strings.Join(ag.logLines(), "\n"))
				}
				time.Sleep(5 * time.Millisecond)
			}
			took = append(took, time.Since(start))
			if err := ag.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if code, ok := ag.waitExit(15 * time.Second); !ok || code != 0 {
				t.Fatalf("%s run %d: agent after SIGTERM: exited %v, status %d; want 0", kt.name, i+1, ok, code)
			}
		}
		runsText := make([]string, len(took))
		for i, d := range took {
			runsText[i] = d.Round(time.Millisecond).String()
		}
		slices.Sort(took)
		t.Logf("agent start to ready with the CA, %s key: median %v of %d (runs %s)", kt.name,
			took[len(took)/2].Round(time.Millisecond), runs, strings.Join(runsText, " "))
	}
}
