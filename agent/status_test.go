package agent

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestStatusServer: readiness follows Ready and fails once draining; the
// scrape merges the agent's metrics and the proxy's; /quitquitquit wants
// POST.
func TestStatusServer(t *testing.T) {
	var notReady atomic.Value
	notReady.Store("")
	quit := make(chan struct{}, 1)
	proxyUp := atomic.Bool{}
	s := &statusServer{
		Ready: func(context.Context) error {
			if m := notReady.Load().(string); m != "" {
				return errors.New(m)
			}
			return nil
		},
		AgentMetrics: func(w io.Writer) { metric(w, "meshtun_agent_proxy_restarts_total", "counter", "restarts", 2) },
		ProxyMetrics: func(context.Context) ([]byte, error) {
			if !proxyUp.Load() {
				return nil, errors.New("down")
			}
			return []byte("# TYPE envoy_server_live gauge\nenvoy_server_live 1"), nil
		},
		Quit: func() { quit <- struct{}{} },
		Log:  zerolog.Nop(),
	}
	st := httptest.NewServer(s.StatusHandler())
	defer st.Close()
	rd := httptest.NewServer(s.ReadinessHandler())
	defer rd.Close()

	if code, _ := get(t, rd.URL+"/healthz/ready"); code != 200 {
		t.Errorf("ready: %d", code)
	}
	notReady.Store("config not received")
	if code, body := get(t, rd.URL+"/healthz/ready"); code != 503 || !strings.Contains(body, "config not received") {
		t.Errorf("not ready: %d %q", code, body)
	}
	if code, _ := get(t, rd.URL+"/stats/prometheus"); code != 404 {
		t.Errorf("the readiness port serves metrics: %d", code)
	}
	if code, body := get(t, st.URL+"/healthz/live"); code != 200 || body != "LIVE\n" {
		t.Errorf("live: %d %q", code, body)
	}
	_, body := get(t, st.URL+"/stats/prometheus")
	if body != "# HELP meshtun_agent_proxy_restarts_total restarts\n# TYPE meshtun_agent_proxy_restarts_total counter\nmeshtun_agent_proxy_restarts_total 2\n" {
		t.Errorf("scrape without the proxy: %q", body)
	}
	proxyUp.Store(true)
	if _, body := get(t, st.URL+"/stats/prometheus"); !strings.Contains(body, "meshtun_agent_proxy_restarts_total 2\n") ||
		!strings.HasSuffix(body, "envoy_server_live 1\n") {
		t.Errorf("merged scrape: %q", body)
	}
	if code, _ := get(t, st.URL+"/quitquitquit"); code != http.StatusMethodNotAllowed {
		t.Errorf("GET /quitquitquit: %d", code)
	}
	resp, err := http.Post(st.URL+"/quitquitquit", "", nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("POST /quitquitquit: %v %v", resp, err)
	}
	resp.Body.Close()
	select {
	case <-quit:
	case <-time.After(5 * time.Second):
		t.Fatal("Quit not called")
	}
	notReady.Store("")
	s.SetDraining()
	if code, body := get(t, rd.URL+"/healthz/ready"); code != 503 || !strings.Contains(body, "draining") {
		t.Errorf("draining: %d %q", code, body)
	}
}

// TestProber: Live is the admin /ready; Ready with xDS also needs both
// LDS and CDS update_success above 0.
func TestProber(t *testing.T) {
	var cds, lds atomic.Int64
	var live, waiting atomic.Bool
	admin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ready":
			if waiting.Load() {
				w.WriteHeader(503)
				io.WriteString(w, "INITIALIZING\nwaiting for secret ROOTCA from sds-grpc\n")
				return
			}
			if !live.Load() {
				w.WriteHeader(503)
				io.WriteString(w, "PRE_INITIALIZING\n")
				return
			}
			io.WriteString(w, "LIVE\n")
		case "/stats":
			if _, ok := r.URL.Query()["usedonly"]; !ok || r.URL.Query().Get("filter") != xdsStatsFilter {
				w.WriteHeader(400)
				return
			}
			io.WriteString(w, "cluster_manager.cds.update_rejected: 0\ncluster_manager.cds.update_success: "+itoa(cds.Load())+
				"\nlistener_manager.lds.update_rejected: 1\nlistener_manager.lds.update_success: "+itoa(lds.Load())+"\n")
		}
	}))
	defer admin.Close()
	addr := strings.TrimPrefix(admin.URL, "http://")
	ctx := context.Background()
	static, xds := newProber(addr, false), newProber(addr, true)
	if err := static.Live(ctx); err == nil || !strings.Contains(err.Error(), "PRE_INITIALIZING") {
		t.Errorf("not live: %v", err)
	}
	// meshtun's proxy says what its configuration waits for: one line.
	waiting.Store(true)
	if err := static.Live(ctx); err == nil || err.Error() != "proxy admin /ready: 503 INITIALIZING: waiting for secret ROOTCA from sds-grpc" {
		t.Errorf("warming on a secret: %v", err)
	}
	waiting.Store(false)
	live.Store(true)
	if err := static.Ready(ctx); err != nil {
		t.Errorf("static ready: %v", err)
	}
	if err := xds.Ready(ctx); err == nil || !strings.Contains(err.Error(), "config not received") || !strings.Contains(err.Error(), "1 rejected") {
		t.Errorf("xds without config: %v", err)
	}
	cds.Store(1)
	if err := xds.Ready(ctx); err == nil {
		t.Error("ready with CDS only")
	}
	lds.Store(2)
	if err := xds.Ready(ctx); err != nil {
		t.Errorf("xds ready: %v", err)
	}
	if err := newProber("127.0.0.1:1", false).Live(ctx); err == nil {
		t.Error("a closed port is live")
	}
}

func itoa(v int64) string { return strconv.FormatInt(v, 10) }

// TestWait is agent test 5 at unit level: Wait returns once the URL says
// 200, and on timeout returns what it last answered.
func TestWait(t *testing.T) {
	var ok atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !ok.Load() {
			http.Error(w, "proxy starting", 503)
			return
		}
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := Wait(ctx, srv.URL, 50*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "503 proxy starting") {
		t.Errorf("wait on 503: %v", err)
	}
	if d := time.Since(start); d < 250*time.Millisecond || d > 2*time.Second {
		t.Errorf("timed out after %v", d)
	}
	time.AfterFunc(200*time.Millisecond, func() { ok.Store(true) })
	ctx2, cancel2 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel2()
	if err := Wait(ctx2, srv.URL, 50*time.Millisecond); err != nil {
		t.Errorf("wait: %v", err)
	}
}

// TestWatcher: a file's change, a Kubernetes-style ..data symlink swap in
// a directory, and a file's appearance are reported; nothing else is.
func TestWatcher(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "proxyconfig.yaml")
	certs := filepath.Join(dir, "certs")
	for _, d := range []string{"..v1", "..v2"} {
		if err := os.MkdirAll(filepath.Join(certs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(filepath.Join(certs, "..v1", "cert.pem"), []byte("one"), 0o644))
	must(os.WriteFile(filepath.Join(certs, "..v2", "cert.pem"), []byte("two"), 0o644))
	must(os.Symlink("..v1", filepath.Join(certs, "..data")))
	must(os.Symlink("..data/cert.pem", filepath.Join(certs, "cert.pem")))
	must(os.WriteFile(file, []byte("drainDuration: 5s\n"), 0o644))
	later := filepath.Join(dir, "later")

	changes := make(chan []string, 10)
	w := &watcher{Paths: []string{file, certs, later}, Interval: 20 * time.Millisecond, OnChange: func(c []string) { changes <- c }}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	expect := func(want string) {
		t.Helper()
		select {
		case c := <-changes:
			if strings.Join(c, ",") != want {
				t.Errorf("changed %v, want %s", c, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no change reported for %s", want)
		}
	}
	time.Sleep(60 * time.Millisecond)
	select {
	case c := <-changes:
		t.Fatalf("change reported with nothing changed: %v", c)
	default:
	}
	must(os.WriteFile(file, []byte("drainDuration: 6s\n"), 0o644))
	expect(file)
	// Kubernetes' atomic update: a new ..data link renamed over the old.
	must(os.Symlink("..v2", filepath.Join(certs, "..data_tmp")))
	must(os.Rename(filepath.Join(certs, "..data_tmp"), filepath.Join(certs, "..data")))
	expect(certs)
	must(os.WriteFile(later, []byte("x"), 0o644))
	expect(later)
}
