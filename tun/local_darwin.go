package tun

import (
	"fmt"
	"net"
	"os/exec"
	"strings"

	"github.com/rs/zerolog"
)

// Local is laptop-mode capture in force (darwin: routes through utun,
// set with route(8), the tool every macOS has).
type Local struct {
	cfg LocalConfig
	log zerolog.Logger
}

// SetupLocal routes cfg.CIDRs into the utun device. Open gave the device
// its addresses and brought it up; SetupLocal makes sure it is up (a route
// to a down utun carries nothing). The proxy's own sockets are pinned to
// the outgoing interface (see DefaultInterface), so they never follow
// these routes.
func SetupLocal(cfg LocalConfig, log zerolog.Logger) (*Local, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if err := configureDevice(cfg.TunName, nil); err != nil {
		return nil, fmt.Errorf("local capture: %w", err)
	}
	l := &Local{cfg: cfg, log: log}
	for i, p := range cfg.CIDRs {
		c := routeCommand("add", p, cfg.TunName)
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			l.cfg.CIDRs = cfg.CIDRs[:i]
			l.Teardown()
			return nil, fmt.Errorf("local capture: route add %v -interface %s: %v: %s", p, cfg.TunName, err, strings.TrimSpace(string(out)))
		}
	}
	log.Info().Str("tun", cfg.TunName).Interface("cidrs", cfg.CIDRs).Msg("local capture installed")
	return l, nil
}

// Teardown deletes the routes.
func (l *Local) Teardown() error {
	var errs []string
	for _, p := range l.cfg.CIDRs {
		c := routeCommand("delete", p, l.cfg.TunName)
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Sprintf("%v: %v: %s", p, err, strings.TrimSpace(string(out))))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("local capture: route delete: %s", strings.Join(errs, "; "))
	}
	return nil
}

// DefaultInterface is the index of the interface of the default route,
// which laptop mode pins the proxy's upstream sockets to.
func DefaultInterface() (int, error) {
	out, err := exec.Command(darwinRoute, "-n", "get", "default").Output()
	if err != nil {
		return 0, fmt.Errorf("route get default: %w", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if name, ok := strings.CutPrefix(strings.TrimSpace(line), "interface:"); ok {
			ifi, err := net.InterfaceByName(strings.TrimSpace(name))
			if err != nil {
				return 0, err
			}
			return ifi.Index, nil
		}
	}
	return 0, fmt.Errorf("route get default: no interface in %q", out)
}
