package controlplane

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

func newTestAPI(t *testing.T) (*API, *httptest.Server) {
	t.Helper()
	def, _ := BuiltinProfile("default")
	a := &API{Server: NewServer(mustRegistry(t, "testdata/registry.yaml"), def, zerolog.Nop()), Token: "s3cret", Log: zerolog.Nop()}
	ts := httptest.NewServer(a.Handler())
	t.Cleanup(ts.Close)
	return a, ts
}

func call(t *testing.T, method, url, token, body string) (int, string, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

// TestAPIAuth: every /v1 endpoint needs the bearer token: none or a wrong
// one is 401 (with WWW-Authenticate) and changes nothing; /ready is open.
func TestAPIAuth(t *testing.T) {
	a, ts := newTestAPI(t)
	v0 := a.Server.currentVersion()
	for _, tc := range []struct{ method, path, token, body string }{
		{"GET", "/v1/profile", "", ""},
		{"GET", "/v1/profile", "wrong", ""},
		{"GET", "/v1/profile", "s3cret0", ""},
		{"POST", "/v1/profile", "", "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n"},
		{"POST", "/v1/profile", "wrong", "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n"},
		{"GET", "/v1/status", "", ""},
	} {
		code, body, h := call(t, tc.method, ts.URL+tc.path, tc.token, tc.body)
		if code != http.StatusUnauthorized || !strings.Contains(h.Get("WWW-Authenticate"), "Bearer") {
			t.Errorf("%s %s token %q: %d %q, want 401 with WWW-Authenticate", tc.method, tc.path, tc.token, code, body)
		}
	}
	// A header that is not a bearer token.
	req, _ := http.NewRequest("GET", ts.URL+"/v1/profile", nil)
	req.Header.Set("Authorization", "Basic czNjcmV0")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("basic auth: %v %v", resp, err)
	}
	if a.Server.currentVersion() != v0 || a.Server.Profile().Spec.OutboundTrafficPolicy.Mode != AllowAny {
		t.Error("an unauthenticated request changed the configuration")
	}
	if code, body, _ := call(t, "GET", ts.URL+"/ready", "", ""); code != 200 || body != "ready\n" {
		t.Errorf("/ready: %d %q", code, body)
	}
}

// TestAPIGetAndPostProfile: GET returns the profile in force as YAML;
// POST of a valid profile puts it in force (new version); POST of an
// invalid one is 400 with the reason, counted, and changes nothing.
func TestAPIGetAndPostProfile(t *testing.T) {
	a, ts := newTestAPI(t)
	code, body, h := call(t, "GET", ts.URL+"/v1/profile", "s3cret", "")
	def, _ := BuiltinProfile("default")
	want, _ := MarshalProfile(def)
	if code != 200 || body != string(want) || h.Get("Content-Type") != "application/yaml" || h.Get(VersionHeader) != "1" {
		t.Fatalf("GET: %d %v\n%s", code, h, body)
	}

	code, body, h = call(t, "POST", ts.URL+"/v1/profile?source=strict.yaml", "s3cret",
		"apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: strict}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
	if code != 200 || !strings.Contains(body, "mode: REGISTRY_ONLY") || h.Get(VersionHeader) != "2" {
		t.Fatalf("POST: %d %v\n%s", code, h, body)
	}
	if p := a.Server.Profile(); p.Metadata.Name != "strict" || p.Spec.OutboundTrafficPolicy.Mode != RegistryOnly {
		t.Fatalf("profile in force: %+v", p)
	}

	before, _ := MarshalProfile(a.Server.Profile())
	for _, bad := range []struct{ doc, want string }{
		{"apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec:\n  outboundTrafficPolicy: {mode: REGISTY_ONLY}\n",
			`bad.yaml: spec.outboundTrafficPolicy.mode: "REGISTY_ONLY" is not valid; valid choices: ALLOW_ANY, REGISTRY_ONLY`},
		{"apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec:\n  outboundTrafficPolicy: {mode: ALLOW_ANY}\n  conectTimeout: 1s\n",
			`bad.yaml: spec: unknown field "conectTimeout"; valid fields: accessLogEncoding, accessLogFile, connectTimeout`},
	} {
		code, body, _ = call(t, "POST", ts.URL+"/v1/profile?source=bad.yaml", "s3cret", bad.doc)
		if code != http.StatusBadRequest || !strings.Contains(body, bad.want) {
			t.Errorf("POST invalid: %d %q, want 400 containing %q", code, body, bad.want)
		}
	}
	if _, body, _ = call(t, "GET", ts.URL+"/v1/profile", "s3cret", ""); body != string(before) || a.Server.currentVersion() != "2" {
		t.Errorf("an invalid profile changed the configuration (version %s):\n%s", a.Server.currentVersion(), body)
	}
	code, body, _ = call(t, "GET", ts.URL+"/v1/status", "s3cret", "")
	var st serverStatus
	if code != 200 || json.Unmarshal([]byte(body), &st) != nil {
		t.Fatalf("status: %d %s", code, body)
	}
	if st.ProfileRejected != 2 || st.Version != "2" || st.OutboundTrafficPolicy != RegistryOnly || !strings.Contains(st.LastRejection, "conectTimeout") {
		t.Errorf("status %+v", st)
	}
}

// TestTokenFile: the token file is written with mode 0600 (its directory
// 0700 when created), replaced atomically, and read back.
func TestTokenFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	p, err := writeTokenFile(dir, "tok1")
	if err != nil {
		t.Fatal(err)
	}
	for path, mode := range map[string]os.FileMode{p: 0o600, dir: 0o700 | os.ModeDir} {
		fi, err := os.Stat(path)
		if err != nil || fi.Mode() != mode {
			t.Errorf("%s: mode %v (%v), want %v", path, fi.Mode(), err, mode)
		}
	}
	if _, err := writeTokenFile(dir, "tok2"); err != nil {
		t.Fatal(err)
	}
	if tok, err := ReadTokenFile(p); err != nil || tok != "tok2" {
		t.Errorf("read back %q %v", tok, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("state dir holds %d files, want the token only", len(ents))
	}
	a, _ := newToken()
	b, _ := newToken()
	if len(a) != 64 || a == b {
		t.Errorf("tokens %q %q", a, b)
	}
}
