package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/controlplane"
)

func runArgs(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestProfileListAndDump(t *testing.T) {
	code, out, _ := runArgs("profile", "list")
	if code != 0 || !strings.Contains(out, "default") || !strings.Contains(out, "demo") {
		t.Fatalf("list: %d %q", code, out)
	}
	code, out, _ = runArgs("profile", "dump")
	if code != 0 || !strings.HasPrefix(out, "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: default\nspec:\n  outboundTrafficPolicy:\n    mode: ALLOW_ANY\n") {
		t.Fatalf("dump: %d\n%s", code, out)
	}
	code, out, _ = runArgs("profile", "dump", "demo")
	if code != 0 || !strings.Contains(out, "accessLogFile: /dev/stdout") {
		t.Fatalf("dump demo: %d\n%s", code, out)
	}
	code, _, errs := runArgs("profile", "dump", "ambient")
	if code != 1 || !strings.Contains(errs, `unknown profile "ambient"; valid choices: default, demo`) {
		t.Fatalf("dump ambient: %d %q", code, errs)
	}
}

func TestProfileBadInvocations(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"profile"}, "usage:"},
		{[]string{"profile", "show"}, `unknown subcommand "show"`},
		{[]string{"profile", "apply"}, "-f FILE is required"},
		{[]string{"profile", "apply", "x.yaml"}, `unexpected argument "x.yaml" (the file goes after -f)`},
		{[]string{"profile", "dump", "demo", "--controlplane", "127.0.0.1:1"}, "give a profile NAME or --controlplane, not both"},
		{[]string{"profile", "dump", "--bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"controlplane", "extra"}, `unexpected argument "extra"`},
		{[]string{"controlplane", "--log-level", "loud"}, `unknown log level "loud"`},
	} {
		code, _, errs := runArgs(tc.args...)
		if code != 2 || !strings.Contains(errs, tc.want) {
			t.Errorf("%v: exit %d, stderr %q, want 2 and %q", tc.args, code, errs, tc.want)
		}
	}
}

// TestProfileApplyAndDumpLive drives `profile apply` and `profile dump
// --controlplane` against the control plane's API: an invalid file is
// refused locally (the API is never called) with the valid choices; a
// valid one is applied; a wrong token is refused.
func TestProfileApplyAndDumpLive(t *testing.T) {
	def, _ := controlplane.BuiltinProfile("default")
	srv := controlplane.NewServer(controlplane.EmptyRegistry(), def, zerolog.Nop())
	api := &controlplane.API{Server: srv, Token: "tok", Log: zerolog.Nop()}
	var calls atomic.Int32
	h := api.Handler()
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { calls.Add(1); h.ServeHTTP(w, r) }))
	defer ts.Close()
	addr := strings.TrimPrefix(ts.URL, "http://")
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "controlplane.token")
	os.WriteFile(tokenFile, []byte("tok\n"), 0o600)
	file := func(name, doc string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(doc), 0o644)
		return p
	}

	typo := file("typo.yaml", "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec:\n  outboundTrafficPolicy:\n    mode: REGISTY_ONLY\n")
	code, _, errs := runArgs("profile", "apply", "-f", typo, "--controlplane", addr, "--token-file", tokenFile)
	if code != 1 || !strings.Contains(errs, typo+`: spec.outboundTrafficPolicy.mode: "REGISTY_ONLY" is not valid; valid choices: ALLOW_ANY, REGISTRY_ONLY`) ||
		!strings.Contains(errs, "nothing was changed") || calls.Load() != 0 {
		t.Fatalf("typo: exit %d, %d API calls, stderr %q", code, calls.Load(), errs)
	}

	strict := file("strict.yaml", "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: strict}\nspec:\n  outboundTrafficPolicy:\n    mode: REGISTRY_ONLY\n")
	code, out, errs := runArgs("profile", "apply", "--controlplane", addr, "-f", strict, "--token-file", tokenFile)
	if code != 0 || !strings.Contains(out, `profile "strict" applied (outboundTrafficPolicy.mode REGISTRY_ONLY): configuration version 2 pushed`) {
		t.Fatalf("apply: %d %q %q", code, out, errs)
	}
	if srv.Profile().Spec.OutboundTrafficPolicy.Mode != controlplane.RegistryOnly {
		t.Fatal("not in force")
	}
	code, out, _ = runArgs("profile", "dump", "--controlplane", addr, "--token-file", tokenFile)
	if code != 0 || !strings.Contains(out, "  name: strict\nspec:\n  outboundTrafficPolicy:\n    mode: REGISTRY_ONLY\n") {
		t.Fatalf("dump live: %d\n%s", code, out)
	}

	wrong := file("wrong.token", "nope\n")
	code, _, errs = runArgs("profile", "dump", "--controlplane", addr, "--token-file", wrong)
	if code != 1 || !strings.Contains(errs, "401 Unauthorized: wrong bearer token") {
		t.Fatalf("wrong token: %d %q", code, errs)
	}
	code, _, errs = runArgs("profile", "dump", "--controlplane", addr, "--token-file", filepath.Join(dir, "missing"))
	if code != 1 || !strings.Contains(errs, "--token-file: open ") {
		t.Fatalf("missing token file: %d %q", code, errs)
	}
}
