package main

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
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
