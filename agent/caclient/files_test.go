package caclient

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// TestFileSource: the file-mounted mode serves the files' identity (root
// from root-cert.pem), picks up a new certificate written over them, keeps
// the previous one when a change is inconsistent (a key from another
// certificate) and names the file in the error.
func TestFileSource(t *testing.T) {
	c := newTestCA(t)
	c.start()
	cl := newClient(t, c.options(c.tokenFile("shop", "cart")))
	issue := func() *Identity {
		id, err := cl.Fetch(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	dir := t.TempDir()
	fs := &FileSource{CertChainFile: filepath.Join(dir, "cert-chain.pem"), KeyFile: filepath.Join(dir, "key.pem"),
		RootCertFile: filepath.Join(dir, "root-cert.pem"), Interval: 10 * time.Millisecond, Log: zerolog.Nop()}
	// Each file is replaced whole (a temporary file renamed over it), as a
	// Kubernetes secret volume swaps its files: the poller never reads a
	// half-written one.
	put := func(path string, data []byte) {
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	write := func(id *Identity, key []byte) {
		put(fs.CertChainFile, id.ChainPEM)
		put(fs.KeyFile, key)
		put(fs.RootCertFile, id.RootPEM)
	}
	if err := fs.Load(); err == nil || !strings.Contains(err.Error(), fs.CertChainFile) {
		t.Errorf("no files: %v", err)
	}
	a := issue()
	write(a, a.KeyPEM)
	ch, unsub := fs.Subscribe()
	defer unsub()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); fs.Run(ctx) }()
	defer func() { cancel(); <-done }()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("files not loaded")
	}
	if cur := fs.Current(); cur.Serial != a.Serial || cur.SPIFFEID != "spiffe://cluster.local/ns/shop/sa/cart" || string(cur.RootPEM) != string(a.RootPEM) {
		t.Fatalf("loaded %+v", cur)
	}
	b := issue()
	write(b, b.KeyPEM)
	if !waitFor(5*time.Second, func() bool { return fs.Current().Serial == b.Serial }) {
		t.Fatal("a new certificate in the files was not picked up")
	}
	write(a, b.KeyPEM) // inconsistent: a's chain with b's key
	if !waitFor(5*time.Second, func() bool { err := fs.Err(); return err != nil && strings.Contains(err.Error(), "does not match") }) {
		t.Fatalf("an inconsistent change was not rejected: %v", fs.Err())
	}
	if err := fs.Err(); !strings.Contains(err.Error(), "does not match") || !strings.Contains(err.Error(), fs.KeyFile) {
		t.Errorf("error %v", err)
	}
	if fs.Current().Serial != b.Serial {
		t.Error("the previous certificate stopped serving after a bad change")
	}
}
