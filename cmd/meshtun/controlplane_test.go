package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshtun/meshtun/controlplane"
	"github.com/meshtun/meshtun/controlplane/ca"
)

// TestControlPlaneToken: `meshtun controlplane token` prints a token the
// control plane of the same state dir accepts for that identity, with the
// requested lifetime; missing or bad names are errors naming them.
func TestControlPlaneToken(t *testing.T) {
	state := t.TempDir()
	var out, errb bytes.Buffer
	if rc := run([]string{"controlplane", "token", "--namespace", "shop", "--service-account", "cart", "--state-dir", state, "--ttl", "1s"}, &out, &errb); rc != 0 {
		t.Fatalf("rc %d: %s", rc, errb.String())
	}
	tk, err := ca.LoadTokens(filepath.Join(state, controlplane.CADirName))
	if err != nil {
		t.Fatal(err)
	}
	id, err := tk.Verify(strings.TrimSpace(out.String()))
	if err != nil || id != (ca.Identity{Namespace: "shop", ServiceAccount: "cart"}) {
		t.Fatalf("token verifies to %v, %v", id, err)
	}
	time.Sleep(time.Second) // --ttl 1s: expiry is in whole seconds
	if _, err := tk.Verify(strings.TrimSpace(out.String())); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("after --ttl: %v", err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--namespace", "shop"}, "--namespace and --service-account are required"},
		{[]string{"--namespace", "Shop", "--service-account", "cart"}, `namespace "Shop"`},
		{[]string{"--namespace", "shop", "--service-account", "cart", "--ttl", "0s"}, "ttl 0s: must be positive"},
	} {
		errb.Reset()
		run(append([]string{"controlplane", "token", "--state-dir", state}, tc.args...), &out, &errb)
		if !strings.Contains(errb.String(), tc.want) {
			t.Errorf("%v: %q, want %q", tc.args, errb.String(), tc.want)
		}
	}
}
