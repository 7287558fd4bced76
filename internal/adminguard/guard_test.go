package adminguard

import (
	"context"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// serve runs Wrap(h, o) on ln and returns a client for it.
func serve(t *testing.T, ln net.Listener, o Options) (*atomic.Int32, *http.Client) {
	t.Helper()
	var hits atomic.Int32
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.WriteString(w, "ok")
	})
	srv := &http.Server{Handler: Wrap(h, o), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	tr := &http.Transport{}
	if ln.Addr().Network() == "unix" {
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", ln.Addr().String())
		}
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &hits, &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

func do(t *testing.T, c *http.Client, method, url, host string, hdr map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(""))
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestCrossOriginMutationRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hits, c := serve(t, ln, Options{CheckHost: true})
	url := "http://" + ln.Addr().String() + "/quitquitquit"
	for _, tc := range []struct {
		name string
		hdr  map[string]string
	}{
		{"form POST from another site", map[string]string{"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}},
		{"old browser, Origin only", map[string]string{"Origin": "http://evil.example"}},
		{"same-site but other origin", map[string]string{"Sec-Fetch-Site": "same-site"}},
	} {
		code, body := do(t, c, http.MethodPost, url, "", tc.hdr)
		if code != http.StatusForbidden || !strings.Contains(body, "cross-origin") {
			t.Errorf("%s: got %d %q, want 403 naming the cross-origin refusal", tc.name, code, body)
		}
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("the handler ran %d times for refused requests", n)
	}
	// curl and meshtun request send no browser headers: allowed.
	if code, _ := do(t, c, http.MethodPost, url, "", nil); code != http.StatusOK {
		t.Fatalf("POST without browser headers: %d, want 200", code)
	}
	// A page may read nothing cross-origin anyway (no CORS headers), and
	// a GET is not a state change: it passes the origin check.
	if code, _ := do(t, c, http.MethodGet, "http://"+ln.Addr().String()+"/stats", "", map[string]string{"Sec-Fetch-Site": "cross-site"}); code != http.StatusOK {
		t.Fatalf("cross-site GET: %d, want 200", code)
	}
}

func TestHostGuardAgainstDNSRebinding(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hits, c := serve(t, ln, Options{CheckHost: true})
	url := "http://" + ln.Addr().String() + "/config_dump"
	for _, host := range []string{"evil.example", "evil.example:15000", "localhost.evil.example", "10.1.2.3:15000", "[::2]:15000"} {
		code, body := do(t, c, http.MethodGet, url, host, nil)
		if code != http.StatusForbidden || !strings.Contains(body, "DNS rebinding") || !strings.Contains(body, host) {
			t.Errorf("Host %q: got %d %q, want 403 naming the host", host, code, body)
		}
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("the handler ran %d times for refused hosts", n)
	}
	for _, host := range []string{"", "localhost", "LOCALHOST:15000", "app.localhost", "127.0.0.1", "127.0.0.2:1", "[::1]:15000", "localhost."} {
		if code, body := do(t, c, http.MethodGet, url, host, nil); code != http.StatusOK {
			t.Errorf("Host %q: got %d %q, want 200", host, code, body)
		}
	}
}

func TestHostGuardOnAWildcardBind(t *testing.T) {
	// Bound to a wildcard, the admin is reached by the address of the
	// interface: that Host is its own. Any other address is not.
	ln, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	_, c := serve(t, ln, Options{CheckHost: true})
	port := ln.Addr().(*net.TCPAddr).Port
	url := "http://127.0.0.1:" + strconv.Itoa(port) + "/ready"
	// The connection arrives on 127.0.0.1: a non-loopback Host that is
	// not the address it arrived on is refused even on a wildcard bind.
	if code, _ := do(t, c, http.MethodGet, url, "192.0.2.1", nil); code != http.StatusForbidden {
		t.Fatalf("Host 192.0.2.1 on a connection to 127.0.0.1: %d, want 403", code)
	}
}

func TestHostGuardOffAndUnixSocket(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, c := serve(t, ln, Options{})
	if code, _ := do(t, c, http.MethodGet, "http://"+ln.Addr().String()+"/healthz/ready", "10.0.0.7:15020", nil); code != http.StatusOK {
		t.Fatalf("CheckHost off (kubelet probing by pod IP): %d, want 200", code)
	}
	ul, err := net.Listen("unix", filepath.Join(t.TempDir(), "admin.sock"))
	if err != nil {
		t.Fatal(err)
	}
	_, uc := serve(t, ul, Options{CheckHost: true})
	if code, _ := do(t, uc, http.MethodGet, "http://admin/ready", "anything.example", nil); code != http.StatusOK {
		t.Fatalf("Unix socket admin: %d, want 200 whatever the Host", code)
	}
	if code, _ := do(t, uc, http.MethodPost, "http://admin/quitquitquit", "", map[string]string{"Sec-Fetch-Site": "cross-site"}); code != http.StatusForbidden {
		t.Fatalf("cross-site POST over a Unix socket: %d, want 403", code)
	}
}
