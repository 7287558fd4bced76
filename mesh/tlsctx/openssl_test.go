package tlsctx

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/testpki"
)

// openssl is the openssl binary: these tests check the handshakes against
// a TLS stack that is not Go's.
func openssl(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("openssl")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("openssl missing: CI must install it")
		}
		t.Skip("openssl not installed")
	}
	return p
}

// files writes a leaf's chain and key and the CA, returning their paths.
func files(t *testing.T, ca *testpki.CA, l *testpki.Leaf) (cert, key, caFile string) {
	dir := t.TempDir()
	cert, key, caFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "ca.pem")
	for p, b := range map[string][]byte{cert: l.ChainPEM, key: l.KeyPEM, caFile: ca.CertPEM} {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return cert, key, caFile
}

// TestOpenSSLClient: openssl s_client against istiod's inbound context:
// with a mesh certificate it completes, verifying the server's chain; a
// client offering only istio-peer-exchange gets no ALPN (not an abort);
// without a certificate the server refuses it.
func TestOpenSSLClient(t *testing.T) {
	bin := openssl(t)
	ca := testpki.NewCA(t)
	sv := newSide(t, ca, serverID)
	cert, key, caFile := files(t, ca, ca.Leaf(t, clientID, testpki.LeafOpts{}))
	for _, tc := range []struct {
		name     string
		args     []string
		wantOut  string
		wantPeer string // "" : the server refuses
	}{
		{"peer exchange only", []string{"-cert", cert, "-key", key, "-alpn", "istio-peer-exchange"}, "No ALPN negotiated", clientID},
		{"istio", []string{"-cert", cert, "-key", key, "-alpn", "istio-peer-exchange,istio"}, "No ALPN negotiated", clientID},
		{"h2", []string{"-cert", cert, "-key", key, "-alpn", "istio-h2,istio,h2"}, "ALPN protocol: h2", clientID},
		{"no certificate", []string{"-alpn", "istio"}, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var st Stats
			d := mustDown(t, sv.store, istioDown("istio-peer-exchange", "h2", "http/1.1"), &st)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			type res struct {
				peer string
				err  error
			}
			ch := make(chan res, 1)
			go func() {
				raw, err := ln.Accept()
				if err != nil {
					ch <- res{err: err}
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				c, err := d.Handshake(ctx, raw)
				if err != nil {
					ch <- res{err: err}
					return
				}
				defer c.Close()
				p, _ := PeerOf(c.ConnectionState())
				c.Write([]byte("hello\n"))
				ch <- res{peer: strings.Join(p.URISANs, ",")}
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			args := append([]string{"s_client", "-connect", ln.Addr().String(), "-CAfile", caFile, "-verify_return_error",
				"-servername", "outbound_.80_._.server.default.svc.cluster.local"}, tc.args...)
			cmd := exec.CommandContext(ctx, bin, args...)
			cmd.Stdin = strings.NewReader("")
			out, _ := cmd.CombinedOutput()
			r := <-ch
			if tc.wantPeer == "" {
				if r.err == nil {
					t.Fatalf("server accepted openssl without a client certificate")
				}
				wantStats(t, "server", &st, map[string]uint64{"fail_verify_no_cert": 1, "handshake": 0})
				return
			}
			if r.err != nil || r.peer != tc.wantPeer {
				t.Fatalf("server: peer %q, %v\nopenssl:\n%s", r.peer, r.err, out)
			}
			if !bytes.Contains(out, []byte(tc.wantOut)) || !bytes.Contains(out, []byte("Verify return code: 0 (ok)")) {
				t.Errorf("openssl output lacks %q or a verified chain:\n%s", tc.wantOut, out)
			}
		})
	}
}

// TestOpenSSLServer: an openssl s_server with a CA-issued certificate as
// the upstream of istiod's outbound context: the handshake completes with
// ALPN istio and the server's SAN checked; a SAN list that does not name it
// refuses it.
func TestOpenSSLServer(t *testing.T) {
	bin := openssl(t)
	ca := testpki.NewCA(t)
	cl := newSide(t, ca, clientID)
	cert, key, caFile := files(t, ca, ca.Leaf(t, serverID, testpki.LeafOpts{}))
	for _, tc := range []struct {
		san    string
		wantOK bool
	}{{serverID, true}, {"spiffe://cluster.local/ns/default/sa/other", false}} {
		var st Stats
		u := mustUp(t, cl.store, istioUp("outbound_.443_._.server", tc.san), &st)
		probe, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := probe.Addr().(*net.TCPAddr)
		probe.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		cmd := exec.CommandContext(ctx, bin, "s_server", "-accept", addr.String(), "-naccept", "1",
			"-cert", cert, "-key", key, "-CAfile", caFile, "-Verify", "1", "-verify_return_error", "-alpn", "istio")
		var out lockedBuffer
		cmd.Stdout, cmd.Stderr = &out, &out
		// s_server closes the connection when its stdin ends: hold it open.
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var raw net.Conn
		for raw == nil {
			if raw, err = net.Dial("tcp", addr.String()); err != nil {
				if ctx.Err() != nil {
					t.Fatalf("s_server never listened: %s", out.String())
				}
				raw = nil
				time.Sleep(20 * time.Millisecond)
			}
		}
		c, err := u.Secure(ctx, raw, "")
		if tc.wantOK {
			if err != nil {
				t.Errorf("SAN %s: %v\nopenssl:\n%s", tc.san, err, out.String())
			} else {
				if got := c.(*tls.Conn).ConnectionState().NegotiatedProtocol; got != "istio" {
					t.Errorf("ALPN %q, want istio", got)
				}
				c.Close()
			}
		} else {
			var he *HandshakeError
			if !errors.As(err, &he) || !strings.HasPrefix(he.Reason, "verify SAN") {
				t.Errorf("SAN %s: err %v, want a SAN refusal", tc.san, err)
			}
			wantStats(t, "client", &st, map[string]uint64{"fail_verify_san": 1})
		}
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
		cancel()
	}
}

// lockedBuffer is a bytes.Buffer a running command writes while the test
// may read it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
