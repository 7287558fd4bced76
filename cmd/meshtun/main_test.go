package main

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/admin"
	"github.com/meshtun/meshtun/mesh/bootstrap"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/proxy"
)

func TestBadInvocationsNameTheProblem(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"bogus"}, `unknown command "bogus"`},
		{[]string{"proxy", "--mark", "0"}, "-mark"},
		{[]string{"proxy", "--exclude-outbound-ports", "80,abc"}, `port "abc"`},
		{[]string{"proxy", "--exclude-outbound-cidrs", "10.0.0.0/33"}, `CIDR "10.0.0.0/33"`},
		{[]string{"proxy", "--pod-ips", "10.0.0.300"}, `"10.0.0.300" is not an IP address`},
		{[]string{"proxy", "--capture", "iptables"}, `want "sidecar", "local" or "none"`},
		{[]string{"proxy", "--capture", "local"}, "needs at least one -capture-cidr"},
		{[]string{"proxy", "--capture-cidr", "10.96.0.0/12"}, "applies to -capture local only"},
		{[]string{"proxy", "--capture", "local", "--capture-cidr", "10.96.0.1/12"}, `host bits set (did you mean 10.96.0.0/12?)`},
		{[]string{"proxy", "--log-level", "loud"}, `unknown log level "loud"`},
		{[]string{"proxy", "--log-format", "xml"}, `unknown log format "xml"`},
		{[]string{"proxy", "extra"}, `unexpected argument "extra"`},
		{[]string{"proxy", "--concurrency", "-1"}, "-concurrency: want 0 or more"},
	} {
		var out, errb bytes.Buffer
		code := run(tc.args, &out, &errb)
		if code != 2 {
			t.Errorf("%v: exit %d, want 2", tc.args, code)
		}
		if !strings.Contains(errb.String(), tc.want) {
			t.Errorf("%v: stderr %q does not mention %q", tc.args, errb.String(), tc.want)
		}
	}
}

func TestHelpAndVersion(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"help"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "proxy") {
		t.Fatalf("help: exit %d, %q", code, out.String())
	}
	out.Reset()
	if code := run([]string{"version"}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "meshtun ") {
		t.Fatalf("version: exit %d, %q", code, out.String())
	}
}

func TestRequest(t *testing.T) {
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/listeners" && r.Method == http.MethodGet:
			io.WriteString(w, "virtualOutbound::0.0.0.0:15001\n")
		case r.URL.Path == "/drain_listeners" && r.Method == http.MethodPost:
			io.WriteString(w, "OK\n")
		default:
			w.WriteHeader(http.StatusNotFound)
			io.WriteString(w, "admin commands are:\n")
		}
	}))
	defer ts.Close()
	addr := strings.TrimPrefix(ts.URL, "http://")
	var out, errb bytes.Buffer
	if code := run([]string{"request", "--admin-address", addr, "GET", "/listeners"}, &out, &errb); code != 0 || out.String() != "virtualOutbound::0.0.0.0:15001\n" {
		t.Fatalf("GET /listeners: exit %d, out %q, err %q", code, out.String(), errb.String())
	}
	out.Reset()
	if code := run([]string{"request", "--admin-address", addr, "post", "drain_listeners"}, &out, &errb); code != 0 || out.String() != "OK\n" {
		t.Fatalf("POST drain_listeners: exit %d, %q", code, out.String())
	}
	out.Reset()
	errb.Reset()
	if code := run([]string{"request", "--admin-address", addr, "GET", "/nope"}, &out, &errb); code != 1 || out.Len() != 0 || !strings.Contains(errb.String(), "unsuccessful status code 404") {
		t.Fatalf("GET /nope: exit %d, out %q, err %q", code, out.String(), errb.String())
	}
	if code := run([]string{"request", "FETCH", "/x"}, &out, &errb); code != 2 {
		t.Fatalf("bad method: exit %d", code)
	}
	if code := run([]string{"request", "--admin-address", "127.0.0.1:1", "GET", "/x"}, &out, &errb); code != 1 {
		t.Fatalf("unreachable admin: exit %d", code)
	}
}

// TestRequestUnixAdmin: the admin API on a Unix socket (bootstrap admin
// address pipe, opened as the proxy opens it, over a stale socket file
// left by a previous run) answers `meshtun request --admin-address
// unix:/path` and `meshtun request --bootstrap FILE`, which finds the pipe
// in the bootstrap: /listeners with Envoy's lines, /help with every
// endpoint, a GET of a mutating endpoint refused with Envoy's 405.
func TestRequestUnixAdmin(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "admin.sock")
	b, err := bootstrap.Load("../../examples/sidecar-bootstrap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	b.Admin.Address = &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: sock}}}
	js, err := protojson.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	bsFile := filepath.Join(dir, "bootstrap.json")
	if err := os.WriteFile(bsFile, js, 0o644); err != nil {
		t.Fatal(err)
	}
	// A stale socket file, as a killed proxy leaves it.
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()

	b, err = bootstrap.Load(bsFile)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := proxy.ListenAdmin(b.GetAdmin().GetAddress())
	if err != nil {
		t.Fatalf("admin on pipe %s: %v", sock, err)
	}
	defer ln.Close()
	sr := b.GetStaticResources()
	snap, err := mesh.Build("1", sr.GetListeners(), sr.GetClusters(), nil,
		mesh.BuildOptions{Roles: mesh.IstioRoles, Cluster: cluster.Options{Dialer: &upstream.Dialer{}}})
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Retire(nil)
	d := &mesh.Dispatcher{}
	d.Swap(snap)
	go (&admin.Server{D: d, Start: time.Now()}).Serve(ln)

	const listeners = "virtualOutbound::0.0.0.0:15001\nvirtualInbound::0.0.0.0:15006\n10.96.0.20_9080::10.96.0.20:9080\n"
	for _, via := range [][]string{{"--admin-address", "unix:" + sock}, {"--bootstrap", bsFile}} {
		var out, errb bytes.Buffer
		if code := run(append(append([]string{"request"}, via...), "GET", "/listeners"), &out, &errb); code != 0 || out.String() != listeners {
			t.Errorf("request %v GET /listeners: exit %d, out %q, err %q; want %q", via, code, out.String(), errb.String(), listeners)
		}
		out.Reset()
		errb.Reset()
		if code := run(append(append([]string{"request"}, via...), "GET", "/help"), &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "admin commands are:\n") {
			t.Errorf("request %v GET /help: exit %d, out %q, err %q", via, code, out.String(), errb.String())
		}
		for _, p := range []string{"/clusters", "/config_dump", "/listeners", "/ready", "/reset_counters", "/stats", "/stats/prometheus", "/quitquitquit"} {
			if !strings.Contains(out.String(), "\n  "+p+": ") {
				t.Errorf("/help lacks %s:\n%s", p, out.String())
			}
		}
		out.Reset()
		errb.Reset()
		if code := run(append(append([]string{"request"}, via...), "GET", "/reset_counters"), &out, &errb); code != 1 || out.Len() != 0 ||
			!strings.Contains(errb.String(), "unsuccessful status code 405") {
			t.Errorf("request %v GET /reset_counters: exit %d, out %q, err %q; want 405", via, code, out.String(), errb.String())
		}
	}
}
