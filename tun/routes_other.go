//go:build !linux

package tun

// DefaultRoutes is the IPv4 default route's interface, as DefaultInterface
// finds it (route(8) on darwin); no source, no metric. IPv6: none.
func DefaultRoutes(v6 bool) ([]DefaultRoute, error) {
	if v6 {
		return nil, nil
	}
	idx, err := DefaultInterface()
	if err != nil || idx <= 0 {
		return nil, err
	}
	return []DefaultRoute{{Ifindex: idx}}, nil
}
