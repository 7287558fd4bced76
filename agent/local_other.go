//go:build !linux

package agent

import "github.com/meshtun/meshtun/tun"

// defaultRoutes is the default route's interface as route(8) reports it
// (tun.DefaultInterface; darwin), its source being that interface's
// address.
func defaultRoutes() ([]defaultRoute, error) {
	idx, err := tun.DefaultInterface()
	if err != nil || idx <= 0 {
		return nil, err
	}
	return []defaultRoute{{ifindex: idx}}, nil
}
