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
		if err := runCmd(routeCommand("add", p, cfg.TunName)); err != nil {
			l.cfg.CIDRs = cfg.CIDRs[:i]
			l.Teardown()
			return nil, fmt.Errorf("local capture: %w", err)
		}
	}
	log.Info().Str("tun", cfg.TunName).Interface("cidrs", cfg.CIDRs).Msg("local capture installed")
	return l, nil
}

// Teardown deletes the routes.
func (l *Local) Teardown() error {
	var errs []string
	for _, p := range l.cfg.CIDRs {
		if err := runCmd(routeCommand("delete", p, l.cfg.TunName)); err != nil {
			errs = append(errs, err.Error())
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
	out, err := exec.Command(darwinRoute, "-n", "get", "default").CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("route -n get default: %v: %s (no default route: connect to a network first)", err, strings.TrimSpace(string(out)))
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
