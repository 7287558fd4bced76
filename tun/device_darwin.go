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
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("tun: %s: %v: %s", strings.Join(c, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}
