package controlplane

import (
	"fmt"
	"net/netip"
	"regexp"
	"sort"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	httprbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// authzPolicySpec is an Istio AuthorizationPolicy as the registry writes
// it (the common fields): it applies to every workload of its namespace
// (the root namespace istio-system: to every workload).
type authzPolicySpec struct {
	Name      string          `json:"name"`
	Namespace string          `json:"namespace"` // default "default"
	Action    string          `json:"action"`    // ALLOW (default), DENY, AUDIT
	DryRun    bool            `json:"dryRun"`    // istio.io/dry-run: shadow rules only
	Rules     []authzRuleSpec `json:"rules"`
}

type authzRuleSpec struct {
	From []struct {
		Source authzSource `json:"source"`
	} `json:"from"`
	To []struct {
		Operation authzOperation `json:"operation"`
	} `json:"to"`
}

type authzSource struct {
	Principals    []string `json:"principals"`
	NotPrincipals []string `json:"notPrincipals"`
	Namespaces    []string `json:"namespaces"`
	NotNamespaces []string `json:"notNamespaces"`
	IPBlocks      []string `json:"ipBlocks"`
	NotIPBlocks   []string `json:"notIpBlocks"`
}

type authzOperation struct {
	Hosts      []string `json:"hosts"`
	NotHosts   []string `json:"notHosts"`
	Ports      []string `json:"ports"`
	NotPorts   []string `json:"notPorts"`
	Methods    []string `json:"methods"`
	NotMethods []string `json:"notMethods"`
	Paths      []string `json:"paths"`
	NotPaths   []string `json:"notPaths"`
}

// rootNamespace is Istio's default root namespace: a policy there
// applies mesh-wide.
const rootNamespace = "istio-system"

// authzPolicy is a validated policy.
type authzPolicy struct {
	authzPolicySpec
	action rbacv3.RBAC_Action
}

func (p *authzPolicySpec) validate(i int) (*authzPolicy, error) {
	field := fmt.Sprintf("authorizationPolicies[%d]", i)
	if p.Name == "" {
		return nil, fieldErr(field+".name", "required")
	}
	if p.Namespace == "" {
		p.Namespace = "default"
	}
	field += " (" + p.Namespace + "/" + p.Name + ")"
	out := &authzPolicy{authzPolicySpec: *p}
	switch p.Action {
	case "", "ALLOW":
		out.action = rbacv3.RBAC_ALLOW
	case "DENY":
		out.action = rbacv3.RBAC_DENY
	case "AUDIT":
		out.action = rbacv3.RBAC_LOG
	default:
		return nil, fieldErr(field+".action", "%s", choiceError(p.Action, []string{"ALLOW", "DENY", "AUDIT"}))
	}
	for j, r := range p.Rules {
		for k, f := range r.From {
			for _, b := range append(append([]string(nil), f.Source.IPBlocks...), f.Source.NotIPBlocks...) {
				if _, err := cidrOf(b); err != nil {
					return nil, fieldErr(fmt.Sprintf("%s.rules[%d].from[%d].source.ipBlocks", field, j, k), "%q: %v", b, err)
				}
			}
		}
		for k, t := range r.To {
			for _, v := range append(append([]string(nil), t.Operation.Ports...), t.Operation.NotPorts...) {
				if n, err := strconv.ParseUint(v, 10, 16); err != nil || n == 0 {
					return nil, fieldErr(fmt.Sprintf("%s.rules[%d].to[%d].operation.ports", field, j, k), "%q is not a port", v)
				}
			}
		}
	}
	return out, nil
}

// policiesFor are the policies that apply to a workload of namespace ns.
func (r *Registry) policiesFor(ns string) []*authzPolicy {
	var out []*authzPolicy
	for _, p := range r.policies {
		if p.Namespace == ns || p.Namespace == rootNamespace {
			out = append(out, p)
		}
	}
	return out
}

// authzRules builds one action's rules and shadow rules as istiod's
// builder does: a policy per rule, keyed ns[<ns>]-policy[<name>]-rule[<i>];
// for TCP, an ALLOW rule with an HTTP-only field is dropped (it could
// never match), a DENY rule loses its HTTP-only fields (it denies more).
// A policy without rules adds no policy: an ALLOW filter of such policies
// alone (rules: {}) allows nothing, as Istio's allow-nothing. nil when no
// policy has that action.
func authzRules(ps []*authzPolicy, action rbacv3.RBAC_Action, forTCP bool) (rules, shadow *rbacv3.RBAC) {
	for _, p := range ps {
		if p.action != action {
			continue
		}
		dst := &rules
		if p.DryRun {
			dst = &shadow
		}
		if *dst == nil {
			*dst = &rbacv3.RBAC{Action: action, Policies: map[string]*rbacv3.Policy{}}
		}
		for i, r := range p.Rules {
			pol, ok := authzPolicyOf(p, r, forTCP)
			if ok {
				(*dst).Policies[fmt.Sprintf("ns[%s]-policy[%s]-rule[%d]", p.Namespace, p.Name, i)] = pol
			}
		}
	}
	for _, r := range []*rbacv3.RBAC{rules, shadow} {
		if r != nil && len(r.Policies) == 0 {
			r.Policies = nil
		}
	}
	return rules, shadow
}

func authzPolicyOf(p *authzPolicy, r authzRuleSpec, forTCP bool) (*rbacv3.Policy, bool) {
	out := &rbacv3.Policy{}
	for _, f := range r.From {
		s := f.Source
		var and []*rbacv3.Principal
		and = appendIDs(and, s.Principals, s.NotPrincipals, principalMatcher)
		and = appendIDs(and, s.Namespaces, s.NotNamespaces, namespaceMatcher)
		and = appendIDs(and, s.IPBlocks, s.NotIPBlocks, ipBlockMatcher)
		out.Principals = append(out.Principals, idAnd(and))
	}
	if len(r.From) == 0 {
		out.Principals = []*rbacv3.Principal{idAnd(nil)}
	}
	for _, t := range r.To {
		o := t.Operation
		httpOnly := len(o.Hosts)+len(o.NotHosts)+len(o.Methods)+len(o.NotMethods)+len(o.Paths)+len(o.NotPaths) > 0
		if forTCP && httpOnly && p.action == rbacv3.RBAC_ALLOW {
			return nil, false
		}
		var and []*rbacv3.Permission
		if !forTCP {
			and = appendPerms(and, o.Hosts, o.NotHosts, hostPerm)
			and = appendPerms(and, o.Methods, o.NotMethods, methodPerm)
			and = appendPerms(and, o.Paths, o.NotPaths, pathPerm)
		}
		and = appendPerms(and, o.Ports, o.NotPorts, portPerm)
		out.Permissions = append(out.Permissions, permAnd(and))
	}
	if len(r.To) == 0 {
		out.Permissions = []*rbacv3.Permission{permAnd(nil)}
	}
	return out, true
}

func appendIDs(and []*rbacv3.Principal, values, notValues []string, mk func(string) *rbacv3.Principal) []*rbacv3.Principal {
	or := func(vs []string) *rbacv3.Principal {
		var ids []*rbacv3.Principal
		for _, v := range vs {
			ids = append(ids, mk(v))
		}
		return &rbacv3.Principal{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: ids}}}
	}
	if len(values) > 0 {
		and = append(and, or(values))
	}
	if len(notValues) > 0 {
		and = append(and, &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: or(notValues)}})
	}
	return and
}

func appendPerms(and []*rbacv3.Permission, values, notValues []string, mk func(string) *rbacv3.Permission) []*rbacv3.Permission {
	or := func(vs []string) *rbacv3.Permission {
		var rs []*rbacv3.Permission
		for _, v := range vs {
			rs = append(rs, mk(v))
		}
		return &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: rs}}}
	}
	if len(values) > 0 {
		and = append(and, or(values))
	}
	if len(notValues) > 0 {
		and = append(and, &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: or(notValues)}})
	}
	return and
}

func idAnd(ids []*rbacv3.Principal) *rbacv3.Principal {
	if len(ids) == 0 {
		ids = []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}}
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: ids}}}
}

func permAnd(rs []*rbacv3.Permission) *rbacv3.Permission {
	if len(rs) == 0 {
		rs = []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}}
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: rs}}}
}

func authenticated(m *matcherv3.StringMatcher) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: m}}}
}

func regexMatcher(re string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: re}}}
}

// principalMatcher: "td/ns/x/sa/y" is spiffe://td/ns/x/sa/y exactly;
// "*" any principal; "p*" a prefix, "*s" a suffix (Istio's matcher).
func principalMatcher(v string) *rbacv3.Principal {
	const spiffe = "spiffe://"
	switch {
	case v == "*":
		return authenticated(regexMatcher(".+"))
	case strings.HasPrefix(v, "*"):
		return authenticated(regexMatcher(spiffe + ".*" + regexp.QuoteMeta(v[1:])))
	case strings.HasSuffix(v, "*"):
		return authenticated(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: spiffe + strings.TrimSuffix(v, "*")}})
	}
	return authenticated(&matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: spiffe + v}})
}

// namespaceMatcher: any principal whose SPIFFE ID is in namespace v
// ("*" in v matches any characters).
func namespaceMatcher(v string) *rbacv3.Principal {
	parts := strings.Split(v, "*")
	for i := range parts {
		parts[i] = regexp.QuoteMeta(parts[i])
	}
	return authenticated(regexMatcher(fmt.Sprintf(".*/ns/%s/.*", strings.Join(parts, ".*"))))
}

func cidrOf(v string) (*corev3.CidrRange, error) {
	p, err := netip.ParsePrefix(v)
	if err != nil {
		a, err2 := netip.ParseAddr(v)
		if err2 != nil {
			return nil, err
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	return &corev3.CidrRange{AddressPrefix: p.Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(p.Bits()))}, nil
}

func ipBlockMatcher(v string) *rbacv3.Principal {
	c, _ := cidrOf(v) // validated
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_DirectRemoteIp{DirectRemoteIp: c}}
}

// stringMatch is Istio's value matcher: "*" present, "p*" prefix, "*s"
// suffix, else exact.
func stringMatch(v string, ignoreCase bool) *matcherv3.StringMatcher {
	m := &matcherv3.StringMatcher{IgnoreCase: ignoreCase}
	switch {
	case v == "*":
		m.MatchPattern = &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: ".+"}}
		m.IgnoreCase = false
	case strings.HasPrefix(v, "*"):
		m.MatchPattern = &matcherv3.StringMatcher_Suffix{Suffix: v[1:]}
	case strings.HasSuffix(v, "*"):
		m.MatchPattern = &matcherv3.StringMatcher_Prefix{Prefix: strings.TrimSuffix(v, "*")}
	default:
		m.MatchPattern = &matcherv3.StringMatcher_Exact{Exact: v}
	}
	return m
}

func headerPerm(name string, m *matcherv3.StringMatcher) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{Name: name,
		HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: m}}}}
}

func hostPerm(v string) *rbacv3.Permission   { return headerPerm(":authority", stringMatch(v, true)) }
func methodPerm(v string) *rbacv3.Permission { return headerPerm(":method", stringMatch(v, false)) }

func pathPerm(v string) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{
		Rule: &matcherv3.PathMatcher_Path{Path: stringMatch(v, false)}}}}
}

func portPerm(v string) *rbacv3.Permission {
	n, _ := strconv.ParseUint(v, 10, 16) // validated
	return &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPort{DestinationPort: uint32(n)}}
}

// authzOrder is istiod's filter order: AUDIT (LOG), DENY, ALLOW.
var authzOrder = []rbacv3.RBAC_Action{rbacv3.RBAC_LOG, rbacv3.RBAC_DENY, rbacv3.RBAC_ALLOW}

// shadowPrefix is the shadow_rules_stat_prefix istiod sets: the DENY
// prefix only on a DENY filter that has shadow rules.
func shadowPrefix(a rbacv3.RBAC_Action, shadow *rbacv3.RBAC) string {
	if a == rbacv3.RBAC_DENY && shadow != nil {
		return "istio_dry_run_deny_"
	}
	return "istio_dry_run_allow_"
}

// networkRBAC is the envoy.filters.network.rbac filters of a workload's
// TCP chains, in istiod's order (stat_prefix "tcp.").
func networkRBAC(ps []*authzPolicy) []*listenerv3.Filter {
	var out []*listenerv3.Filter
	for _, a := range authzOrder {
		rules, shadow := authzRules(ps, a, true)
		if rules == nil && shadow == nil {
			continue
		}
		out = append(out, &listenerv3.Filter{Name: "envoy.filters.network.rbac", ConfigType: &listenerv3.Filter_TypedConfig{
			TypedConfig: mustAny(&netrbacv3.RBAC{Rules: rules, ShadowRules: shadow, StatPrefix: "tcp.", ShadowRulesStatPrefix: shadowPrefix(a, shadow)})}})
	}
	return out
}

// httpRBAC is the envoy.filters.http.rbac filters of a workload's
// inbound connection managers, in istiod's order.
func httpRBAC(ps []*authzPolicy) []*hcmv3.HttpFilter {
	var out []*hcmv3.HttpFilter
	for _, a := range authzOrder {
		rules, shadow := authzRules(ps, a, false)
		if rules == nil && shadow == nil {
			continue
		}
		out = append(out, &hcmv3.HttpFilter{Name: "envoy.filters.http.rbac", ConfigType: &hcmv3.HttpFilter_TypedConfig{
			TypedConfig: mustAny(&httprbacv3.RBAC{Rules: rules, ShadowRules: shadow, ShadowRulesStatPrefix: shadowPrefix(a, shadow)})}})
	}
	return out
}

// sortedPolicies keeps policies in a stable order (namespace, name).
func sortedPolicies(ps []*authzPolicy) {
	sort.SliceStable(ps, func(i, j int) bool {
		if ps[i].Namespace != ps[j].Namespace {
			return ps[i].Namespace < ps[j].Namespace
		}
		return ps[i].Name < ps[j].Name
	})
}
