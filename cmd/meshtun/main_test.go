package main

import (
	"bytes"
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
		{[]string{"proxy", "--capture", "iptables"}, `want "sidecar" or "none"`},
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
