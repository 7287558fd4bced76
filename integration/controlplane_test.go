//go:build linux

package integration

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"
)

const (
	profileRegistryOnly = "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: registry-only}\nspec:\n  outboundTrafficPolicy:\n    mode: REGISTRY_ONLY\n"
	// profileRegistryOnlyAccessLog keeps the demo profile's access log
	// (the HTTP request lines) across the switch.
	profileRegistryOnlyAccessLog = "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: registry-only}\nspec:\n  accessLogFile: /dev/stdout\n  outboundTrafficPolicy:\n    mode: REGISTRY_ONLY\n"
	profileAllowAny              = "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\nspec:\n  outboundTrafficPolicy:\n    mode: ALLOW_ANY\n"
)

// TestControlPlaneProfileSwitchesProxy runs `meshtun controlplane` on a
// registry and a proxy fed by it over ADS (delta and state of the world):
// a registered service's VIP is balanced over its endpoints, a UDP
// service's VIP reaches its endpoint through udp_proxy; ALLOW_ANY
// passes an unregistered destination through; `meshtun profile apply -f`
// REGISTRY_ONLY makes the same connect refused within 1 s, and ALLOW_ANY
// makes it work again within 1 s.
func TestControlPlaneProfileSwitchesProxy(t *testing.T) {
	requireRoot(t)
	for _, api := range []string{"DELTA_GRPC", "GRPC"} {
		t.Run(api, func(t *testing.T) { controlPlaneProfileSwitches(t, api) })
	}
}

func controlPlaneProfileSwitches(t *testing.T, api string) {
	topo := newTopology(t)
	ep1 := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	ep2 := startTCPServer(t, topo.Services, ap(topo.Svc2V4, 9080), echo)
	ext := startTCPServer(t, topo.Services, ap(topo.SvcV4, 7000), echo)
	udp := startUDPEcho(t, topo.Services, ap(topo.Svc2V4, 5353))
	v, dns := vip(topo, false, 30), vip(topo, false, 31)
	cp := startMeshtunControlPlane(t, topo, registryDoc(serviceDoc("reviews", v, 9080, "TCP", topo.SvcV4, topo.Svc2V4),
		serviceDoc("dns", dns, 5353, "UDP", topo.Svc2V4)))
	px := startProxy(t, topo, "--bootstrap", adsBootstrap(t, topo, api))
	waitServes(t, topo, ap(v, 9080))

	// The VIP is balanced over both endpoints. Istio's default policy is
	// LEAST_REQUEST: with connections held open, each new one goes to the
	// endpoint with fewer, so four open flows split two and two.
	a0, b0 := len(ep1.accepted()), len(ep2.accepted())
	for i := 0; i < 4; i++ {
		c, err := dialTCP(topo.Pod, ap(v, 9080), dialTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := pingPong(c, []byte("held")); err != nil {
			t.Fatal(err)
		}
	}
	if a, b := len(ep1.accepted())-a0, len(ep2.accepted())-b0; a != 2 || b != 2 {
		t.Fatalf("4 held flows to the VIP reached the endpoints %d and %d times, want 2 and 2", a, b)
	}
	cl := "outbound|9080||reviews.default.svc.cluster.local"
	if e, ok := px.waitAccess(func(e AccessEntry) bool { return byDst(ap(v, 9080))(e) && e.UpstreamCluster == cl }, accessWait); !ok {
		t.Errorf("no access line for the VIP with cluster %s: %v", cl, e)
	}

	// A UDP port: a UDP listener whose udp_proxy uses the EDS cluster.
	uc, err := dialUDP(topo.Pod, ap(dns, 5353))
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	if err := udpRoundTrip(uc, []byte("query"), 5, time.Second); err != nil {
		t.Fatalf("UDP to the service VIP: %v", err)
	}
	// The VIP is no interface's address: the endpoint answering proves the
	// datagrams went through udp_proxy and the cluster.
	if len(udp.sources()) != 1 {
		t.Errorf("UDP endpoint saw sources %v", udp.sources())
	}

	// ALLOW_ANY (the built-in default): an unregistered destination passes.
	if !strings.Contains(cp.liveProfile(t), "mode: ALLOW_ANY") {
		t.Fatalf("the control plane does not start on ALLOW_ANY:\n%s", cp.liveProfile(t))
	}
	if _, err := tcpEcho(topo.Pod, ap(topo.SvcV4, 7000), 1024); err != nil {
		t.Fatalf("ALLOW_ANY passthrough to an unregistered server: %v", err)
	}

	// REGISTRY_ONLY: refused within a second of the apply returning.
	code, out, errs := cp.applyProfile(t, "registry-only.yaml", profileRegistryOnly)
	applied := time.Now()
	if code != 0 || !strings.Contains(out, "REGISTRY_ONLY") {
		t.Fatalf("profile apply REGISTRY_ONLY: exit %d\n%s%s", code, out, errs)
	}
	took := untilRefused(t, topo, ap(topo.SvcV4, 7000), applied, time.Second)
	t.Logf("%s: REGISTRY_ONLY in force %v after `profile apply` returned", api, took)
	before := len(ext.accepted())
	for i := 0; i < 3; i++ {
		if c, err := dialTCP(topo.Pod, ap(topo.SvcV4, 7000), time.Second); err == nil {
			c.Close()
			t.Fatal("an unregistered destination connects under REGISTRY_ONLY")
		}
	}
	if n := len(ext.accepted()); n != before {
		t.Fatalf("the unregistered server accepted %d connections under REGISTRY_ONLY", n-before)
	}
	if _, err := tcpEcho(topo.Pod, ap(v, 9080), 1024); err != nil {
		t.Fatalf("the registered VIP under REGISTRY_ONLY: %v", err)
	}
	if e, ok := px.waitAccess(func(e AccessEntry) bool { return e.UpstreamCluster == "BlackHoleCluster" }, accessWait); !ok {
		t.Errorf("no BlackHoleCluster access line: %v", e)
	}
	if live := cp.liveProfile(t); !strings.Contains(live, "name: registry-only") || !strings.Contains(live, "mode: REGISTRY_ONLY") {
		t.Errorf("live profile after apply:\n%s", live)
	}

	// Back to ALLOW_ANY: works again within a second.
	code, _, errs = cp.applyProfile(t, "allow-any.yaml", profileAllowAny)
	applied = time.Now()
	if code != 0 {
		t.Fatalf("profile apply ALLOW_ANY: exit %d: %s", code, errs)
	}
	took = untilConnects(t, topo, ap(topo.SvcV4, 7000), applied, time.Second)
	t.Logf("%s: ALLOW_ANY in force %v after `profile apply` returned", api, took)

	st := cp.status(t)
	if len(st.Nodes) != 1 || st.Nodes[0].ID != xdsNode || st.Nodes[0].NACKs != 0 || st.Nodes[0].ACKs == 0 {
		t.Errorf("control plane status: %+v", st)
	}
}

// TestControlPlaneRejectsInvalidAndKeepsServing: an invalid profile (a
// typo in the mode, an unknown field) is rejected by `profile apply` with
// the valid choices listed, and by the control plane's API too; an invalid
// registry change is rejected with a message naming the file, the service
// and the field, and counted. Each time the live profile is unchanged and
// the proxy keeps serving. Then a valid registry change that adds a
// service and removes one reaches the proxy (clusters are removed only
// after the listeners that used them: no NACK).
func TestControlPlaneRejectsInvalidAndKeepsServing(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9081), echo)
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 7000), echo)
	v, v2 := vip(topo, false, 40), vip(topo, false, 41)
	reviews := serviceDoc("reviews", v, 9080, "TCP", topo.SvcV4)
	cp := startMeshtunControlPlane(t, topo, registryDoc(reviews))
	startProxy(t, topo, "--bootstrap", adsBootstrap(t, topo, "DELTA_GRPC"))
	waitServes(t, topo, ap(v, 9080))
	live := cp.liveProfile(t)
	serving := func(when string) {
		t.Helper()
		if _, err := tcpEcho(topo.Pod, ap(v, 9080), 512); err != nil {
			t.Fatalf("%s: the registered VIP stopped serving: %v", when, err)
		}
		if _, err := tcpEcho(topo.Pod, ap(topo.SvcV4, 7000), 512); err != nil {
			t.Fatalf("%s: ALLOW_ANY passthrough stopped: %v", when, err)
		}
		if got := cp.liveProfile(t); got != live {
			t.Fatalf("%s: the live profile changed:\n%s\nwas:\n%s", when, got, live)
		}
	}

	// A typo in the mode, and an unknown field: refused by the CLI.
	for _, tc := range []struct{ doc, want string }{
		{strings.Replace(profileRegistryOnly, "REGISTRY_ONLY", "REGISTY_ONLY", 1),
			`spec.outboundTrafficPolicy.mode: "REGISTY_ONLY" is not valid; valid choices: ALLOW_ANY, REGISTRY_ONLY`},
		{profileRegistryOnly + "  outboundTrafficPolcy: {mode: REGISTRY_ONLY}\n",
			`spec: unknown field "outboundTrafficPolcy"; valid fields: accessLogEncoding, accessLogFile, connectTimeout, defaultConfig, dnsRefreshRate, enableAutoMtls, outboundTrafficPolicy, peerAuthentication`},
	} {
		code, _, errs := cp.applyProfile(t, "bad.yaml", tc.doc)
		if code != 1 || !strings.Contains(errs, tc.want) || !strings.Contains(errs, "nothing was changed") {
			t.Fatalf("profile apply of an invalid file: exit %d, stderr %q, want 1 and %q", code, errs, tc.want)
		}
	}
	serving("after invalid profiles at the CLI")

	// The same typo sent to the API directly: refused there too.
	tok := cp.token(t)
	code, body := cp.api(t, http.MethodPost, "/v1/profile", tok, strings.Replace(profileRegistryOnly, "REGISTRY_ONLY", "REGISTY_ONLY", 1))
	if code != http.StatusBadRequest || !strings.Contains(body, `"REGISTY_ONLY" is not valid; valid choices: ALLOW_ANY, REGISTRY_ONLY`) {
		t.Fatalf("API POST of an invalid profile: %d %q", code, body)
	}
	if code, _ := cp.api(t, http.MethodPost, "/v1/profile", "", profileRegistryOnly); code != http.StatusUnauthorized {
		t.Fatalf("API POST without a token: %d", code)
	}
	if code, _ := cp.api(t, http.MethodPost, "/v1/profile", tok+"x", profileRegistryOnly); code != http.StatusUnauthorized {
		t.Fatalf("API POST with a wrong token: %d", code)
	}
	serving("after invalid profiles at the API")

	// An invalid registry change: rejected, logged with file, service and
	// field, counted; the previous registry keeps serving.
	cp.writeRegistry(t, registryDoc(strings.Replace(reviews, "protocol: TCP", "protocol: TPC", 1)))
	want := cp.registry + `: services[0] (reviews.default): ports[0].protocol: "TPC" is not valid; valid choices: TCP, HTTP, TLS, UDP`
	if !cp.waitLine(func(l string) bool {
		var m struct{ Message, Error string }
		return json.Unmarshal([]byte(l), &m) == nil && m.Message == "change rejected; the previous configuration keeps serving" && m.Error == want
	}, 5*time.Second) {
		t.Fatalf("no rejection logged with %q", want)
	}
	st := cp.status(t)
	if st.RegistryRejected != 1 || st.ProfileRejected != 1 || st.LastRejection != want {
		t.Errorf("status after the invalid registry: %+v", st)
	}
	version := st.Version
	time.Sleep(300 * time.Millisecond) // more polls of the same bad file: no new version, no second rejection
	serving("after an invalid registry")
	if st := cp.status(t); st.Version != version || st.RegistryRejected != 1 {
		t.Errorf("the invalid registry changed the configuration: %+v", st)
	}

	// A valid change: ratings added, reviews removed.
	cp.writeRegistry(t, registryDoc(serviceDoc("ratings", v2, 9081, "TCP", topo.SvcV4)))
	changed := time.Now()
	took := untilConnects(t, topo, ap(v2, 9081), changed, 2*time.Second)
	t.Logf("registry change in force %v after the file was written", took)
	deadline := time.Now().Add(5 * time.Second)
	for {
		ls, cs := adminGet(t, topo, "/listeners"), adminGet(t, topo, "/clusters")
		if !strings.Contains(ls, v.String()+"_9080") && !strings.Contains(cs, "reviews.default") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the removed service is still configured:\n%s\n%s", ls, cs)
		}
		time.Sleep(50 * time.Millisecond)
	}
	st = cp.status(t)
	if len(st.Nodes) != 1 || st.Nodes[0].NACKs != 0 {
		t.Errorf("the proxy NACKed a push: %+v", st)
	}
	if _, err := tcpEcho(topo.Pod, ap(topo.SvcV4, 7000), 512); err != nil {
		t.Fatalf("passthrough after the registry change: %v", err)
	}
}
