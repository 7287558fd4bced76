//go:build linux

package proxy

import (
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// TestNewFindsPodAddrs: New resolves the pod's addresses as capture will
// use them, before Run, so the data path is built whole; a bad bootstrap
// is reported before a pod that cannot be found.
func TestNewFindsPodAddrs(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.json")
	writeFile(t, good, obj{"node": obj{"id": "n", "cluster": "c"}})
	bad := filepath.Join(dir, "bad.json")
	writeFile(t, bad, []byte("{not json"))
	pod := netip.MustParseAddr("10.1.2.3")
	cfg := func(capture, bootstrap, iface string, ips ...netip.Addr) Config {
		return Config{Capture: capture, Bootstrap: bootstrap, PodInterface: iface, PodIPs: ips, TUNFD: -1, Log: zerolog.Nop()}
	}

	for _, tc := range []struct {
		name      string
		cfg       Config
		wantIface string
		wantIPs   []netip.Addr
		wantErr   string
	}{
		{"sidecar, given", cfg(CaptureSidecar, good, "lo", pod), "lo", []netip.Addr{pod}, ""},
		{"sidecar, no bootstrap", cfg(CaptureSidecar, "", "lo", pod), "lo", []netip.Addr{pod}, ""},
		{"sidecar, discovered", cfg(CaptureSidecar, good, "lo"), "", nil, "lo has no global unicast address"},
		{"sidecar, no such interface", cfg(CaptureSidecar, good, "meshtun-none0", pod), "", nil, `pod interface "meshtun-none0"`},
		{"bad bootstrap first", cfg(CaptureSidecar, bad, "meshtun-none0", pod), "", nil, bad},
		{"no capture", cfg(CaptureNone, good, "", pod), "", []netip.Addr{pod}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := New(tc.cfg)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("New: %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.pod.iface != tc.wantIface || !slices.Equal(p.pod.ips, tc.wantIPs) {
				t.Errorf("pod = %q %v, want %q %v", p.pod.iface, p.pod.ips, tc.wantIface, tc.wantIPs)
			}
			if p.gate == nil || (tc.cfg.Bootstrap != "") != (p.dispatcher != nil && p.srv != nil && p.src.srv == p.srv) {
				t.Errorf("data path not built whole: gate %v dispatcher %v srv %v", p.gate, p.dispatcher, p.srv)
			}
		})
	}
}
