package rbac

import (
	"fmt"

	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
)

// Filter names and config types as Envoy and istiod write them.
const (
	NetworkName     = "envoy.filters.network.rbac"
	NetworkTypeURL  = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
	HTTPName        = "envoy.filters.http.rbac"
	HTTPTypeURL     = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
	HTTPPerRouteURL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
)

// FromNetwork compiles an envoy.filters.network.rbac config. Its
// counters are "<stat_prefix>rbac.*" (Istio: "tcp.rbac.allowed").
// meshtun evaluates it once, before the tcp_proxy connects upstream,
// which is Envoy's ONE_TIME_ON_FIRST_BYTE without waiting for a byte:
// no byte can reach the upstream of a denied connection.
func FromNetwork(pb *netrbacv3.RBAC) (*Filter, error) {
	if err := pb.ValidateAll(); err != nil {
		return nil, err
	}
	if pb.GetMatcher() != nil {
		return nil, fmt.Errorf("matcher: the unified matcher API is not supported (use rules)")
	}
	if pb.GetShadowMatcher() != nil {
		return nil, fmt.Errorf("shadow_matcher: the unified matcher API is not supported (use shadow_rules)")
	}
	if pb.GetDelayDeny() != nil {
		return nil, fmt.Errorf("delay_deny: not supported")
	}
	return NewFilter(pb.GetRules(), pb.GetShadowRules(), pb.GetStatPrefix()+"rbac.", pb.GetShadowRulesStatPrefix())
}

// FromHTTP compiles an envoy.filters.http.rbac config inside the
// connection manager whose stat_prefix is hcmPrefix: its counters are
// "http.<hcmPrefix>.rbac.<rules_stat_prefix>*".
func FromHTTP(pb *httprbacv3.RBAC, hcmPrefix string) (*Filter, error) {
	if err := pb.ValidateAll(); err != nil {
		return nil, err
	}
	if pb.GetMatcher() != nil {
		return nil, fmt.Errorf("matcher: the unified matcher API is not supported (use rules)")
	}
	if pb.GetShadowMatcher() != nil {
		return nil, fmt.Errorf("shadow_matcher: the unified matcher API is not supported (use shadow_rules)")
	}
	return NewFilter(pb.GetRules(), pb.GetShadowRules(), "http."+hcmPrefix+".rbac."+pb.GetRulesStatPrefix(), pb.GetShadowRulesStatPrefix())
}
