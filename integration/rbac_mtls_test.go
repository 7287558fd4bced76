//go:build linux

package integration

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// policyDoc is the registry's authorizationPolicies section (Istio's
// AuthorizationPolicy fields) with the given entries.
func policyDoc(entries ...string) string {
	return "authorizationPolicies:\n" + strings.Join(entries, "")
}

// TestRBACTwoMeshedPods is issue 17's test 2 through the embedded control
// plane, with mTLS between the pods: an ALLOW policy for pod A's SPIFFE
// ID lets A in (TCP and HTTP); a DENY on /admin answers 403 to A while /
// works; changing the ALLOW to another service account refuses A (TCP
// closed, HTTP 403) within a second of the registry change.
func TestRBACTwoMeshedPods(t *testing.T) {
	requireRoot(t)
	allowA := fmt.Sprintf("- name: allow-a\n  namespace: default\n  rules:\n  - from:\n    - source: {principals: [%q]}\n",
		strings.TrimPrefix(spiffeID("a"), "spiffe://"))
	// On port 8080 only: for TCP, istiod drops a DENY rule's HTTP fields
	// (it denies more), so a paths-only DENY would refuse all TCP too.
	denyAdmin := "- name: no-admin\n  namespace: default\n  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"8080\"], paths: [\"/admin*\"]}\n"
	m := newMeshTest(t, meshOpts{peerAuth: "STRICT", services: []string{policyDoc(allowA, denyAdmin)}})

	if body := getUntil(t, m.topo.Pod, m.urlB("/hello"), hostB, 200, 20*time.Second); !strings.HasPrefix(body, "b /hello") {
		t.Fatalf("GET /hello: %q", body)
	}
	if code, body, err := getFrom(m.topo.Pod, m.urlB("/admin/users"), hostB, 5*time.Second); err != nil || code != 403 || body != "RBAC: access denied" {
		t.Fatalf("GET /admin/users: %d %q %v, want 403", code, body, err)
	}
	tcpOK := func() error {
		c, err := dialTCP(m.topo.Pod, ap(m.vipB, portTCP), dialTimeout)
		if err != nil {
			return err
		}
		defer c.Close()
		return echoRoundTrip(c, []byte("rbac"), 3*time.Second)
	}
	if err := tcpOK(); err != nil {
		t.Fatalf("TCP from A: %v", err)
	}
	if len(m.web.requests("/admin/users")) != 0 {
		t.Fatal("B's app saw the denied /admin request")
	}

	// Only service account c is allowed now: A is refused.
	allowC := strings.ReplaceAll(allowA, "/sa/a", "/sa/c")
	m.cp.writeRegistry(t, registryDoc(
		meshServiceDoc("b", m.vipB, []meshPortDoc{{"http", portHTTP, "HTTP"}, {"tcp", portTCP, "TCP"}}, true, m.podB.PodV4),
		meshServiceDoc("a", vip(m.topo, false, 41), []meshPortDoc{{"tcp", 7070, "TCP"}}, true, m.topo.PodV4),
		policyDoc(allowC, denyAdmin)))
	start := time.Now()
	for {
		code, _, err := getFrom(m.topo.Pod, m.urlB("/hello"), hostB, 2*time.Second)
		if err == nil && code == 403 {
			break
		}
		if time.Since(start) > 3*time.Second {
			t.Fatalf("GET /hello still %d %v 3 s after the policy change", code, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("HTTP refused %v after the registry change", time.Since(start).Round(time.Millisecond))
	if err := tcpOK(); err == nil {
		t.Fatal("TCP from A still proxied under a policy for c")
	}
	st := statsWith(t, m.podB, "rbac")
	t.Logf("B's rbac stats: %v", st)
	if sumStats(st, "tcp.rbac.denied") == 0 || sumStats(st, "rbac.denied") < 2 {
		t.Errorf("B's rbac stats %v: want TCP and HTTP denials counted", st)
	}
}
