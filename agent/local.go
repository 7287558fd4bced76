package agent

import (
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/meshtun/meshtun/tun"
)

// LocalEnviron fills in, for laptop mode, what the sidecar injector would
// have set: POD_NAME (the host name), POD_NAMESPACE ("default") and
// INSTANCE_IP (the IPv4 source address of the default route — the address
// the host's connections leave from; see hostIP). Values already set are
// kept: a developer can pose as any workload.
func LocalEnviron(env []string) []string {
	have := map[string]bool{}
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		have[k] = true
	}
	out := append([]string(nil), env...)
	if !have[envPodName] {
		h, _ := os.Hostname()
		h = strings.ToLower(strings.Split(h, ".")[0])
		h = strings.Map(func(r rune) rune {
			if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' {
				return r
			}
			return '-'
		}, h)
		if h == "" {
			h = "laptop"
		}
		out = append(out, envPodName+"="+h)
	}
	if !have[envPodNamespace] {
		out = append(out, envPodNamespace+"=default")
	}
	if !have[envInstanceIP] && !have[envInstanceIPs] {
		if ip := hostIP(); ip != "" {
			out = append(out, envInstanceIP+"="+ip)
		}
	}
	return out
}

// hostIP is the IPv4 address the host's traffic leaves from: the preferred
// source of the default route with the lowest metric, else the first
// global IPv4 address of that route's interface. Only without a default
// route (a laptop offline) is it the first global IPv4 address of any
// interface that is up.
func hostIP() string {
	routes, _ := tun.DefaultRoutes(false)
	if ip := chooseHostIP(routes, interfaceIPv4s); ip.IsValid() {
		return ip.String()
	}
	return firstUpIPv4()
}

func chooseHostIP(routes []tun.DefaultRoute, addrs func(ifindex int) []netip.Addr) netip.Addr {
	routes = slices.Clone(routes)
	slices.SortStableFunc(routes, func(a, b tun.DefaultRoute) int { return a.Metric - b.Metric })
	for _, r := range routes {
		if r.Src.Is4() && r.Src.IsGlobalUnicast() {
			return r.Src
		}
		if r.Ifindex <= 0 {
			continue
		}
		for _, a := range addrs(r.Ifindex) {
			if a.Is4() && a.IsGlobalUnicast() {
				return a
			}
		}
	}
	return netip.Addr{}
}

// interfaceIPv4s lists the IPv4 addresses of an interface, in the order
// the OS reports them (the primary address first).
func interfaceIPv4s(ifindex int) []netip.Addr {
	ifi, err := net.InterfaceByIndex(ifindex)
	if err != nil {
		return nil
	}
	addrs, _ := ifi.Addrs()
	var out []netip.Addr
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP.To4()); ok {
				out = append(out, ip)
			}
		}
	}
	return out
}

func firstUpIPv4() string {
	ifs, err := net.Interfaces()
	if err != nil {
		return ""
	}
	for _, ifi := range ifs {
		if ifi.Flags&net.FlagUp == 0 || ifi.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := ifi.Addrs()
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && n.IP.IsGlobalUnicast() {
				return n.IP.String()
			}
		}
	}
	return ""
}
