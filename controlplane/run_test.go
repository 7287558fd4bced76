package controlplane

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// TestRunServesAndCleansUp: Run loads the files, writes the token (0600),
// serves the API with it and ADS, applies a valid profile file change and
// rejects an invalid one, and removes the token file when it stops. An
// invalid file at the start is an error naming it.
func TestRunServesAndCleansUp(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	prof := filepath.Join(dir, "profile.yaml")
	if err := os.WriteFile(prof, []byte("apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mine}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	type ready struct {
		xds, api net.Addr
		token    string
	}
	rc := make(chan ready, 1)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		errc <- Run(ctx, Options{RegistryFile: "testdata/registry.yaml", Profile: prof, XDSAddress: "127.0.0.1:0", APIAddress: "127.0.0.1:0", SecureAddress: "127.0.0.1:0",
			StateDir: state, PollInterval: 10 * time.Millisecond, Log: zerolog.Nop(),
			Ready: func(x, a net.Addr, tok string) { rc <- ready{x, a, tok} }})
	}()
	var r ready
	select {
	case r = <-rc:
	case err := <-errc:
		t.Fatal(err)
	case <-time.After(5 * time.Second):
		t.Fatal("not ready")
	}
	if fi, err := os.Stat(r.token); err != nil || fi.Mode().Perm() != 0o600 || filepath.Dir(r.token) != state {
		t.Fatalf("token file %s: %v %v", r.token, fi, err)
	}
	tok, _ := ReadTokenFile(r.token)
	base := "http://" + r.api.String()
	if code, body, _ := call(t, "GET", base+"/v1/profile", tok, ""); code != 200 || !strings.Contains(body, "name: mine") {
		t.Fatalf("GET profile: %d %s", code, body)
	}
	if code, _, _ := call(t, "GET", base+"/v1/profile", "", ""); code != 401 {
		t.Fatalf("GET without token: %d", code)
	}
	px := startProxyStub(t, r.xds.String(), true, "sidecar~10.1.0.5~app.default~default.svc.cluster.local")
	if !waitFor(5*time.Second, func() bool { return catchAllOf(t, px.accepted()) == passthroughCluster }) {
		t.Fatal("the proxy got no configuration")
	}

	os.WriteFile(prof, []byte("apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec: {outboundTrafficPolicy: {mode: REGISTY_ONLY}}\n"), 0o644)
	if !waitFor(2*time.Second, func() bool {
		_, body, _ := call(t, "GET", base+"/v1/status", tok, "")
		return strings.Contains(body, `"profileRejected": 1`) && strings.Contains(body, `REGISTY_ONLY\" is not valid`)
	}) {
		_, body, _ := call(t, "GET", base+"/v1/status", tok, "")
		t.Fatalf("invalid profile file not rejected: %s", body)
	}
	os.WriteFile(prof, []byte("apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n"), 0o644)
	if !waitFor(2*time.Second, func() bool { return catchAllOf(t, px.accepted()) == blackHoleCluster }) {
		t.Fatal("the valid profile file change never reached the proxy")
	}

	cancel()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(r.token); !os.IsNotExist(err) {
		t.Errorf("token file left behind: %v", err)
	}

	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("services: [{name: x}]\n"), 0o644)
	err := Run(context.Background(), Options{RegistryFile: bad, StateDir: state, Log: zerolog.Nop()})
	if err == nil || !strings.Contains(err.Error(), bad+": services[0] (x.default): vip:") {
		t.Errorf("invalid registry at start: %v", err)
	}
}
