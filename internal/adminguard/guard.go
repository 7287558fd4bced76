// Package adminguard protects the local HTTP control endpoints (the
// proxy's admin API, the agent's status port) from being driven by a web
// page in a browser on the same machine, the laptop-mode exposure Envoy's
// admin has too:
//
//   - A cross-origin form POST (or fetch) to a mutating endpoint such as
//     /quitquitquit is refused: browsers mark such requests with
//     Sec-Fetch-Site or an Origin that does not match the Host, and
//     net/http's CrossOriginProtection rejects them. curl, istioctl and
//     the agent send neither header and are unaffected.
//   - A request whose Host is neither a loopback name or address nor the
//     address the request arrived on is refused (DNS rebinding: a page at
//     evil.example whose name resolves to 127.0.0.1 reads /config_dump
//     with Host: evil.example:15000).
package adminguard

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
)

// Options say what to check.
type Options struct {
	// CheckHost refuses Host headers that are not loopback or the local
	// address of the connection. Off for a port that kubelet probes by the
	// pod's IP under names it chooses (the agent's status port).
	CheckHost bool
}

// Wrap returns h behind the guards of o.
func Wrap(h http.Handler, o Options) http.Handler {
	cop := http.NewCrossOriginProtection()
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "cross-origin request refused: the admin endpoints accept state changes only from non-browser clients (curl, meshtun request)", http.StatusForbidden)
	}))
	inner := cop.Handler(h)
	if !o.CheckHost {
		return inner
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := checkHost(r); err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		inner.ServeHTTP(w, r)
	})
}

// checkHost accepts a Host that is "localhost" (or a subdomain of it, RFC
// 6761), a loopback IP, or the IP the connection was accepted on. Requests
// over a Unix socket are accepted whatever their Host: no browser reaches
// one.
func checkHost(r *http.Request) error {
	local, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if local != nil && local.Network() == "unix" {
		return nil
	}
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return nil
	}
	if ip, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		ip = ip.Unmap()
		if ip.IsLoopback() {
			return nil
		}
		if ta, ok := local.(*net.TCPAddr); ok {
			if la, ok := netip.AddrFromSlice(ta.IP); ok && la.Unmap() == ip {
				return nil
			}
		}
	}
	return fmt.Errorf("Host %q refused: the admin answers only to a loopback name or address, or the address it was reached on (DNS rebinding guard)", r.Host)
}
