//go:build linux

package integration

import (
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// networkRBAC is istiod's envoy.filters.network.rbac for a TCP chain
// with the given rules (nil: ALLOW with rules {}, which denies all).
func networkRBAC(rules obj) obj {
	if rules == nil {
		rules = obj{}
	}
	return obj{"name": "envoy.filters.network.rbac", "typed_config": obj{
		"@type": "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
		"rules": rules, "stat_prefix": "tcp.", "shadow_rules_stat_prefix": "istio_dry_run_allow_"}}
}

// denyPathPrefix is istiod's HTTP DENY filter for an operation on paths.
func denyPathPrefix(prefix string) obj {
	return obj{"name": "envoy.filters.http.rbac", "typed_config": obj{
		"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
		"rules": obj{"action": "DENY", "policies": obj{"ns[default]-policy[no-admin]-rule[0]": obj{
			"permissions": []obj{{"and_rules": obj{"rules": []obj{{"or_rules": obj{"rules": []obj{
				{"url_path": obj{"path": obj{"prefix": prefix}}}}}}}}}},
			"principals": []obj{{"and_ids": obj{"ids": []obj{{"any": true}}}}},
		}}},
		"shadow_rules_stat_prefix": "istio_dry_run_allow_"}}
}

// withHTTPFilter puts f before the router of an istioHTTPListener.
func withHTTPFilter(l obj, f obj) obj {
	hcm := l["filter_chains"].([]obj)[0]["filters"].([]obj)[0]["typed_config"].(obj)
	fs := hcm["http_filters"].([]obj)
	hcm["http_filters"] = append(append(append([]obj{}, fs[:len(fs)-1]...), f), fs[len(fs)-1])
	return l
}

// TestRBACThroughSidecar is issue 17's end-to-end case through a real
// proxy in namespaces, with policies shaped as istiod emits them: an
// ALLOW with no rules closes a TCP service's connections before any
// byte reaches it while another service passes; a DENY on /admin answers
// 403 "RBAC: access denied" while / is proxied; removing the policy by
// xDS lets new requests to /admin through within a second; a policy on
// JWT claims is NACKed naming the field and the last good config serves.
func TestRBACThroughSidecar(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	closed := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9000), echo)
	open := startTCPServer(t, topo.Services, ap(topo.Svc2V4, 9000), echo)
	startHTTPServer(t, topo.Services, ap(topo.SvcV4, 9080), "web")

	const cWeb = "outbound|80||web.default.svc.cluster.local"
	vipClosed, vipOpen, vipWeb := vip(topo, false, 81), vip(topo, false, 82), vip(topo, false, 83)
	route := obj{"name": "80", "validate_clusters": false, "virtual_hosts": []obj{
		{"name": "web", "domains": []string{"*"}, "routes": []obj{routeTo("/", obj{"cluster": cWeb})}}}}
	tcpListener := func(v netip.Addr, cluster string, rbac obj) obj {
		l := serviceListener(v, 9000, cluster)
		fc := l["filter_chains"].([]obj)[0]
		fc["filters"] = append([]obj{rbac}, fc["filters"].([]obj)...)
		return l
	}
	clusters := append(istioClusters(), edsCluster("closed"), edsCluster("open"), edsCluster(cWeb))
	eps := map[string][]netip.AddrPort{
		"closed": {netip.AddrPortFrom(topo.SvcV4, 9000)}, "open": {netip.AddrPortFrom(topo.Svc2V4, 9000)},
		cWeb: {netip.AddrPortFrom(topo.SvcV4, 9080)},
	}
	listeners := func(httpDeny bool) []obj {
		h := istioHTTPListener(80)
		if httpDeny {
			h = withHTTPFilter(h, denyPathPrefix("/admin"))
		}
		return []obj{virtualOutbound("BlackHoleCluster"), virtualInbound(), h,
			tcpListener(vipClosed, "closed", networkRBAC(nil)),
			tcpListener(vipOpen, "open", networkRBAC(obj{"action": "DENY", "policies": obj{"ns[default]-policy[other-port]-rule[0]": obj{
				"permissions": []obj{{"destination_port": 1234}}, "principals": []obj{{"any": true}}}}}))}
	}
	cp.pushHTTP(t, "1", listeners(true), clusters, eps, []obj{route})
	px := startHTTPProxy(t, topo)

	// TCP: the denied service's connection is closed, nothing reaches it.
	c, err := dialTCP(topo.Pod, ap(vipClosed, 9000), dialTimeout)
	if err != nil {
		t.Fatalf("dial %s: %v", vipClosed, err)
	}
	if err := echoRoundTrip(c, []byte("secret"), echoTimeout); err == nil {
		t.Fatal("a connection to the denied service was proxied")
	}
	c.Close()
	c, err = dialTCP(topo.Pod, ap(vipOpen, 9000), dialTimeout)
	if err != nil {
		t.Fatalf("dial %s: %v", vipOpen, err)
	}
	if err := echoRoundTrip(c, []byte("hello"), echoTimeout); err != nil {
		t.Fatalf("allowed service: %v", err)
	}
	c.Close()
	if n := len(closed.accepted()); n != 0 {
		t.Fatalf("the denied service accepted %d connections", n)
	}
	if n := len(open.accepted()); n != 1 {
		t.Fatalf("the allowed service accepted %d connections, want 1", n)
	}
	if e, ok := px.waitAccess(func(e AccessEntry) bool {
		return strings.Contains(e.String(), "rbac_access_denied_matched_policy[none]")
	}, 5*time.Second); !ok {
		t.Errorf("no access log entry with the RBAC termination details (got %v)", px.accessLogs())
	} else {
		t.Logf("denied: %s", e)
	}
	if st := adminGet(t, topo, "/stats"); !strings.Contains(st, "tcp.rbac.denied: 1") || !strings.Contains(st, "tcp.rbac.allowed: 1") {
		t.Errorf("stats:\n%s", grepLines(st, "rbac"))
	}

	// HTTP: /admin is refused by the proxy, / is proxied.
	web := "http://" + ap(vipWeb, 80)
	cl := podClient(topo, false, 1)
	defer cl.CloseIdleConnections()
	if code, body := get1(t, cl, web+"/", "web"); code != 200 || body != "web /" {
		t.Fatalf("GET /: %d %q", code, body)
	}
	if code, body := get1(t, cl, web+"/admin/users", "web"); code != 403 || body != "RBAC: access denied" {
		t.Fatalf("GET /admin/users: %d %q", code, body)
	}

	// Removing the policy takes effect for new requests within a second.
	cl.CloseIdleConnections()
	cp.pushHTTP(t, "2", listeners(false), clusters, eps, []obj{route})
	start := time.Now()
	for {
		// A connection accepted by the replaced listener as it starts
		// draining may be closed before its request is read: that
		// counts as "not yet", like a 403.
		fresh := podClient(topo, false, 1)
		req, _ := http.NewRequest("GET", web+"/admin/users", nil)
		req.Host = "web"
		code := 0
		if resp, err := fresh.Do(req); err == nil {
			code = resp.StatusCode
			resp.Body.Close()
		}
		fresh.CloseIdleConnections()
		if code == 200 {
			break
		}
		if time.Since(start) > time.Second {
			t.Fatalf("GET /admin/users still %d 1 s after the policy was removed", code)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("policy removal in force after %v", time.Since(start).Round(time.Millisecond))

	// A policy meshtun cannot evaluate (requestPrincipals: JWT metadata,
	// and meshtun runs no JWT filter) is NACKed naming the field; the
	// last good listener keeps serving.
	n0, _ := cp.nack()
	jwt := withHTTPFilter(istioHTTPListener(80), obj{"name": "envoy.filters.http.rbac", "typed_config": obj{
		"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
		"rules": obj{"policies": obj{"ns[default]-policy[jwt]-rule[0]": obj{
			"permissions": []obj{{"any": true}},
			"principals": []obj{{"metadata": obj{"filter": "envoy.filters.http.jwt_authn",
				"path": []obj{{"key": "payload"}, {"key": "iss"}}, "value": obj{"string_match": obj{"exact": "issuer"}}}}},
		}}}}})
	ls := listeners(false)
	ls[2] = jwt
	cp.pushHTTP(t, "3", ls, clusters, eps, []obj{route})
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, msg := cp.nack()
		if n > n0 {
			if !strings.Contains(msg, "0.0.0.0_80") || !strings.Contains(msg, `principals[0].metadata (filter "envoy.filters.http.jwt_authn")`) {
				t.Fatalf("NACK error_detail %q does not name the listener and the field", msg)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the JWT policy was never NACKed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	fresh := podClient(topo, false, 1)
	defer fresh.CloseIdleConnections()
	if code, body := get1(t, fresh, web+"/admin/users", "web"); code != 200 || body != "web /admin/users" {
		t.Fatalf("after the NACK, GET /admin/users: %d %q (want the last good config: 200)", code, body)
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
