package agent

import (
	"net"
	"os"
	"strings"
)

// LocalEnviron fills in, for laptop mode, what the sidecar injector would
// have set: POD_NAME (the host name), POD_NAMESPACE ("default") and
// INSTANCE_IP (the first global IPv4 address of an interface that is up).
// Values already set are kept: a developer can pose as any workload.
func LocalEnviron(env []string) []string {
	have := map[string]bool{}
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		have[k] = true
	}
	out := append([]string(nil), env...)
	if !have[EnvPodName] {
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
		out = append(out, EnvPodName+"="+h)
	}
	if !have[EnvPodNamespace] {
		out = append(out, EnvPodNamespace+"=default")
	}
	if !have[EnvInstanceIP] && !have[EnvInstanceIPs] {
		if ip := hostIP(); ip != "" {
			out = append(out, EnvInstanceIP+"="+ip)
		}
	}
	return out
}

func hostIP() string {
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
