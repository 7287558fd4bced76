package rbac

import (
	"fmt"
	"net/netip"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/meshtun/meshtun/mesh/strmatch"
)

// matchHeader evaluates m on the request's headers (Envoy's
// HeaderUtility, shared with routes). A header with several values is
// matched on the values joined by ",", as Envoy; only that rare case
// allocates.
func matchHeader(m *strmatch.Header, in *Input) bool {
	return m.Match(in.header(m.Name))
}

// header returns a header's value: pseudo-headers from the request line,
// others from Header (values joined by ",").
func (in *Input) header(name string) (string, bool) {
	switch name {
	case ":method":
		return in.Method, in.Method != ""
	case ":authority":
		return in.Authority, in.Authority != ""
	case ":path":
		return in.Path, in.Path != ""
	case ":scheme":
		return in.Scheme, in.Scheme != ""
	}
	vs, ok := in.Header[name]
	switch {
	case !ok || len(vs) == 0:
		return "", false
	case len(vs) == 1:
		return vs[0], true
	}
	return strings.Join(vs, ","), true
}

func compileCIDR(c *corev3.CidrRange, field string) (netip.Prefix, error) {
	a, err := netip.ParseAddr(c.GetAddressPrefix())
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%s.address_prefix: %w", field, err)
	}
	// An absent prefix_len is 0, as in Envoy: the range holds every
	// address of the family.
	bits := int(c.GetPrefixLen().GetValue())
	p, err := a.Unmap().Prefix(bits)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%s.prefix_len: %w", field, err)
	}
	return p, nil
}

// pathOnly is :path without its query and fragment, what url_path and
// uri_template match.
func pathOnly(p string) string {
	if i := strings.IndexAny(p, "?#"); i >= 0 {
		return p[:i]
	}
	return p
}
