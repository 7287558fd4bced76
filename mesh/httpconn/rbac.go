package httpconn

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"

	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshtun/meshtun/mesh/rbac"
)

// rbacFilter is one envoy.filters.http.rbac in the HCM, by name (the key
// of its typed_per_filter_config overrides).
type rbacFilter struct {
	name string
	f    *rbac.Filter
}

func parseRBACFilter(f *hcmv3.HttpFilter, hcmPrefix, field string) (rbacFilter, error) {
	var pb httprbacv3.RBAC
	if f.GetTypedConfig() != nil {
		if err := unmarshalConfig(f.GetTypedConfig(), &pb); err != nil {
			return rbacFilter{}, fieldf(field, "typed_config: %w", err)
		}
	}
	rf, err := rbac.FromHTTP(&pb, hcmPrefix)
	if err != nil {
		return rbacFilter{}, fieldf(field, "%w", err)
	}
	return rbacFilter{name: f.GetName(), f: rf}, nil
}

// parsePerFilterRBAC reads a typed_per_filter_config value if it is an
// RBACPerRoute (ok=false for other filters' configs). An RBACPerRoute
// without rbac disables the filter on the route (nil filter), as Envoy.
// Its counters are the HCM filter's (the snapshot gives it that block).
func parsePerFilterRBAC(a *anypb.Any) (*rbac.Filter, bool, error) {
	if typeURLOf(a) != rbac.HTTPPerRouteURL {
		return nil, false, nil
	}
	var pb httprbacv3.RBACPerRoute
	if err := unmarshalConfig(a, &pb); err != nil {
		return nil, false, err
	}
	if pb.GetRbac() == nil {
		return nil, true, nil
	}
	f, err := rbac.FromHTTP(pb.GetRbac(), "")
	if err != nil {
		return nil, false, fmt.Errorf("rbac: %w", err)
	}
	return f, true, nil
}

// RBACFilters returns the connection manager's RBAC filters, for the
// snapshot to give them their counters.
func (c *Config) RBACFilters() []*rbac.Filter {
	out := make([]*rbac.Filter, 0, len(c.filters.rbac))
	for _, r := range c.filters.rbac {
		out = append(out, r.f)
	}
	return out
}

// authorize runs the RBAC filters in order on the request, each with
// its most specific per-route override. A denial answers 403 "RBAC:
// access denied" with response code details naming the policy, as
// Envoy; the request never reaches the router.
func (s *stream) authorize(rt *Route, vh *VirtualHost, routes *Routes) bool {
	if len(s.cfg.filters.rbac) == 0 {
		return true
	}
	r := s.r
	peer := s.h.info.Peer.Addr()
	in := rbac.Input{
		DirectRemote: peer,
		Remote:       s.cfg.remoteAddr(r.Header, peer),
		Local:        s.h.info.Local,
		SNI:          s.h.info.SNI,
		Peer:         s.h.info.TLSPeer,
		Method:       r.Method,
		Authority:    r.Host,
		Path:         s.target,
		Scheme:       "http",
		Header:       r.Header,
	}
	if s.h.info.TLS != nil {
		in.Scheme = "https"
	}
	for i := range s.cfg.filters.rbac {
		rf := &s.cfg.filters.rbac[i]
		f := rf.f
		if pf, ok := perRouteRBAC(rf.name, rt, vh, routes); ok {
			if pf == nil {
				continue // disabled on this route
			}
			f = pf
		}
		// A route's override counts into the filter's counters, as in
		// Envoy (the stats belong to the filter, not its config).
		if d := f.EvaluateInto(&in, rf.f); !d.Allowed {
			s.localReply(http.StatusForbidden, "RBAC: access denied", d.Details())
			return false
		}
	}
	return true
}

// remoteAddr is Envoy's downstream remote address as remote_ip sees it:
// the trusted client address of the XFF rules (see mutateForwarded,
// which has already run: with use_remote_address the peer is appended).
func (c *Config) remoteAddr(h http.Header, peer netip.Addr) netip.Addr {
	n := int(c.xffTrustedHops)
	if c.useRemoteAddress {
		if n == 0 {
			return peer
		}
		if !c.skipXFFAppend {
			n++
		}
	} else {
		n++
	}
	var xff string
	switch vs := h["X-Forwarded-For"]; len(vs) {
	case 0:
		return peer
	case 1:
		xff = vs[0]
	default:
		xff = strings.Join(vs, ",")
	}
	if s, ok := xffFromRight(xff, n); ok {
		if a, err := netip.ParseAddr(strings.TrimSpace(s)); err == nil {
			return a
		}
	}
	return peer
}

// perRouteRBAC finds the most specific RBACPerRoute of a filter: nil
// with ok means disabled on the route.
func perRouteRBAC(name string, rt *Route, vh *VirtualHost, routes *Routes) (*rbac.Filter, bool) {
	if rt != nil {
		if e := rt.faults.entry(name); e != nil && e.isRBAC {
			return e.rbac, true
		}
	}
	if vh != nil {
		if e := vh.faults.entry(name); e != nil && e.isRBAC {
			return e.rbac, true
		}
	}
	if routes != nil {
		if e := routes.faults.entry(name); e != nil && e.isRBAC {
			return e.rbac, true
		}
	}
	return nil, false
}
