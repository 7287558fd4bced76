package tun

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// PortRange is an inclusive range of ports.
type PortRange struct{ Start, End uint16 }

func (r PortRange) String() string {
	if r.Start == r.End {
		return strconv.Itoa(int(r.Start))
	}
	return fmt.Sprintf("%d-%d", r.Start, r.End)
}

// ParsePorts parses Istio's port list syntax: "80,443, 8000-8100".
// Errors name the offending token.
func ParsePorts(s string) ([]PortRange, error) {
	var out []PortRange
	for _, tok := range strings.Split(s, ",") {
		tok = strings.TrimSpace(tok)
		if tok == "" {
			continue
		}
		lo, hi, isRange := strings.Cut(tok, "-")
		a, err := parsePort(lo)
		if err != nil {
			return nil, fmt.Errorf("port %q: %w", tok, err)
		}
		b := a
		if isRange {
			if b, err = parsePort(hi); err != nil {
				return nil, fmt.Errorf("port range %q: %w", tok, err)
			}
			if b < a {
				return nil, fmt.Errorf("port range %q: end before start", tok)
			}
		}
		out = append(out, PortRange{a, b})
	}
	return out, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("want a port number 1..65535")
	}
	return uint16(n), nil
}

// ParseCIDRs parses Istio's CIDR list syntax: "10.0.0.0/8,fd00::/8". A bare
// address means a single host; "*" means every address of both families.
func ParseCIDRs(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, tok := range strings.Split(s, ",") {
		tok = strings.TrimSpace(tok)
		switch {
		case tok == "":
			continue
		case tok == "*":
			out = append(out, netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0"))
			continue
		case strings.Contains(tok, "/"):
			p, err := netip.ParsePrefix(tok)
			if err != nil {
				return nil, fmt.Errorf("CIDR %q: not an address/prefix-length", tok)
			}
			if p.Addr().Is4In6() {
				return nil, fmt.Errorf("CIDR %q: IPv4-mapped; write it as an IPv4 CIDR", tok)
			}
			out = append(out, p.Masked())
		default:
			a, err := netip.ParseAddr(tok)
			if err != nil {
				return nil, fmt.Errorf("CIDR %q: not an IP address or CIDR", tok)
			}
			a = a.Unmap()
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	return out, nil
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
