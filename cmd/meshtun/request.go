package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/meshtun/meshtun/mesh/bootstrap"
)

// runRequest is `pilot-agent request`: send METHOD PATH [BODY] to the local
// admin API and print the body. The output is only the body, as istioctl
// parses it; a non-2xx status exits non-zero.
func runRequest(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("meshtun request", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("admin-address", "", "admin address: host:port or unix:/path (default: the bootstrap's admin, else 127.0.0.1:15000)")
	bs := fs.String("bootstrap", "", "read the admin address from this bootstrap")
	timeout := fs.Duration("timeout", 60*time.Second, "request timeout")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: meshtun request [flags] <METHOD> <PATH> [BODY]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() < 2 || fs.NArg() > 3 {
		fs.Usage()
		return 2
	}
	method, path := strings.ToUpper(fs.Arg(0)), fs.Arg(1)
	switch method {
	case http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete, http.MethodHead:
	default:
		fmt.Fprintf(stderr, "meshtun request: method %q: want GET, POST, PUT, DELETE or HEAD\n", fs.Arg(0))
		return 2
	}
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	target := *addr
	if target == "" && *bs != "" {
		b, err := bootstrap.Load(*bs)
		if err != nil {
			fmt.Fprintf(stderr, "meshtun request: %v\n", err)
			return 2
		}
		if p := b.GetAdmin().GetAddress().GetPipe(); p != nil {
			target = "unix:" + p.GetPath()
		} else if sa := b.GetAdmin().GetAddress().GetSocketAddress(); sa != nil {
			target = net.JoinHostPort(sa.GetAddress(), fmt.Sprint(sa.GetPortValue()))
		}
	}
	if target == "" {
		target = "127.0.0.1:15000"
	}
	network, dialAddr := "tcp", target
	if p, ok := strings.CutPrefix(target, "unix:"); ok {
		network, dialAddr = "unix", p
	}
	client := &http.Client{Timeout: *timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, dialAddr)
		},
	}}
	var body io.Reader
	if fs.NArg() == 3 {
		body = strings.NewReader(fs.Arg(2))
	}
	req, err := http.NewRequest(method, "http://localhost"+path, body)
	if err != nil {
		fmt.Fprintf(stderr, "meshtun request: %v\n", err)
		return 2
	}
	resp, err := client.Do(req)
	if err != nil {
		fmt.Fprintf(stderr, "meshtun request: %s %s via %s: %v\n", method, path, target, err)
		return 1
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		fmt.Fprintf(stderr, "meshtun request: reading the response: %v\n", err)
		return 1
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		fmt.Fprintf(stderr, "meshtun request: received unsuccessful status code %d: %s", resp.StatusCode, out)
		return 1
	}
	stdout.Write(out)
	return 0
}
