package tun

import (
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
)

// configureDevice gives the new utun its addresses and brings it up
// (utunUpCommands), as Linux's configure does over netlink.
func configureDevice(name string, addrs []netip.Prefix) error {
	cmds, err := utunUpCommands(name, addrs)
	if err != nil {
		return err
	}
	for _, c := range cmds {
		if err := runCmd(c); err != nil {
			return fmt.Errorf("tun: %w", err)
		}
	}
	return nil
}

// runCmd runs one of route(8)'s or ifconfig(8)'s command lines; its error
// carries the command, the tool's own words and what usually fixes it.
func runCmd(c []string) error {
	out, err := exec.Command(c[0], c[1:]...).CombinedOutput()
	if err == nil {
		return nil
	}
	msg := strings.TrimSpace(string(out))
	hint := ""
	switch {
	case strings.Contains(msg, "ermission denied") || strings.Contains(msg, "not permitted"):
		hint = " (run as root: sudo meshtun agent --mode local …)"
	case strings.Contains(msg, "File exists"):
		hint = " (a route for it exists already, another VPN's? see: route -n get <address>)"
	}
	return fmt.Errorf("%s: %v: %s%s", strings.Join(c, " "), err, msg, hint)
}
