// Package rbac is Envoy's role-based access control engine, shared by the
// envoy.filters.network.rbac and envoy.filters.http.rbac filters, which
// istiod generates from AuthorizationPolicy (one filter per action, in
// the order LOG, DENY, ALLOW; dry-run policies as shadow_rules).
//
// A config is compiled once per snapshot into a tree of matchers
// (Compile, NewFilter); evaluating it on a connection or request (Input)
// allocates nothing. Matchers meshtun cannot evaluate (metadata from a
// JWT filter meshtun does not run, CEL conditions, filter_state) are a
// compile error naming the field, so the config is NACKed rather than a
// policy silently matching or not.
package rbac

import (
	"fmt"
	"net/http"
	"net/netip"
	"sort"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	uritemplatev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/path/match/uri_template/v3"

	"github.com/meshtun/meshtun/mesh/tlsctx"

	"github.com/meshtun/meshtun/mesh/strmatch"
)

// Peer is the verified peer certificate of a TLS downstream, as the TLS
// termination reports it: its URI SANs, DNS SANs and subject are what
// authenticated.principal_name is matched against.
type Peer = tlsctx.Peer

// Input is what the policies are evaluated on: the connection's facts
// and, for the HTTP filter, the request's. The zero value of a field is
// "absent" (an HTTP field on a TCP connection, no TLS peer).
type Input struct {
	// DirectRemote is the downstream connection's peer address
	// (direct_remote_ip, and source_ip: meshtun has no PROXY protocol).
	DirectRemote netip.Addr
	// Remote is the client address after x-forwarded-for as the HCM
	// settings take it (remote_ip); DirectRemote when not HTTP.
	Remote netip.Addr
	Local  netip.AddrPort // the original destination (destination_ip/_port)
	SNI    string         // requested_server_name
	Peer   *Peer          // nil: no TLS, authenticated never matches

	Method, Authority, Path, Scheme string      // pseudo-headers; Path with its query
	Header                          http.Header // other request headers, canonical keys
}

// Action is what a policy set does when one of its policies matches.
type Action uint8

// The actions of envoy.config.rbac.v3.RBAC.
const (
	Allow Action = iota // ALLOW: a match allows, no match denies
	Deny                // DENY: a match denies
	Log                 // LOG: a match marks the request for the access log
)

func (a Action) String() string {
	switch a {
	case Deny:
		return "DENY"
	case Log:
		return "LOG"
	}
	return "ALLOW"
}

// Engine is a compiled envoy.config.rbac.v3.RBAC: immutable, shared by
// every connection of its filter.
type Engine struct {
	action   Action
	policies []policy // by name, as Envoy's ordered map
}

type policy struct {
	name        string
	permissions []permission // any matches
	principals  []principal  // any matches
}

// Compile compiles an RBAC config. field prefixes errors ("rules").
func Compile(pb *rbacv3.RBAC, field string) (*Engine, error) {
	e := &Engine{}
	switch pb.GetAction() {
	case rbacv3.RBAC_ALLOW:
		e.action = Allow
	case rbacv3.RBAC_DENY:
		e.action = Deny
	case rbacv3.RBAC_LOG:
		e.action = Log
	default:
		return nil, fmt.Errorf("%s.action: %v is not supported", field, pb.GetAction())
	}
	if pb.GetAuditLoggingOptions() != nil {
		// Audit loggers are extensions meshtun does not have; ignoring
		// them would silently lose an audit trail.
		return nil, fmt.Errorf("%s.audit_logging_options: not supported", field)
	}
	names := make([]string, 0, len(pb.GetPolicies()))
	for n := range pb.GetPolicies() {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		p := pb.GetPolicies()[n]
		pf := fmt.Sprintf("%s.policies[%q]", field, n)
		if p.GetCondition() != nil || p.GetCheckedCondition() != nil {
			return nil, fmt.Errorf("%s.condition: CEL conditions are not supported", pf)
		}
		if len(p.GetPermissions()) == 0 {
			return nil, fmt.Errorf("%s.permissions: empty", pf)
		}
		if len(p.GetPrincipals()) == 0 {
			return nil, fmt.Errorf("%s.principals: empty", pf)
		}
		cp := policy{name: n}
		for i, pm := range p.GetPermissions() {
			c, err := compilePermission(pm, fmt.Sprintf("%s.permissions[%d]", pf, i))
			if err != nil {
				return nil, err
			}
			cp.permissions = append(cp.permissions, c)
		}
		for i, pr := range p.GetPrincipals() {
			c, err := compilePrincipal(pr, fmt.Sprintf("%s.principals[%d]", pf, i))
			if err != nil {
				return nil, err
			}
			cp.principals = append(cp.principals, c)
		}
		e.policies = append(e.policies, cp)
	}
	return e, nil
}

// Action returns the engine's action.
func (e *Engine) Action() Action { return e.action }

// Match returns the name of the first policy (by name) that matches in,
// or "" and false.
func (e *Engine) Match(in *Input) (string, bool) {
	for i := range e.policies {
		p := &e.policies[i]
		if anyPermission(p.permissions, in) && anyPrincipal(p.principals, in) {
			return p.name, true
		}
	}
	return "", false
}

// Allowed evaluates the engine as a filter does: ALLOW allows on a
// match, DENY denies on one, LOG always allows and reports the match in
// logged. policy names the matched policy ("" if none).
func (e *Engine) Allowed(in *Input) (allowed, logged bool, policy string) {
	name, ok := e.Match(in)
	switch e.action {
	case Deny:
		return !ok, false, name
	case Log:
		return true, ok, name
	}
	return ok, false, name
}

func anyPermission(ps []permission, in *Input) bool {
	for i := range ps {
		if ps[i].match(in) {
			return true
		}
	}
	return false
}

func anyPrincipal(ps []principal, in *Input) bool {
	for i := range ps {
		if ps[i].match(in) {
			return true
		}
	}
	return false
}

// permission is a compiled Permission: a node of kind with its operands.
type permission struct {
	kind  uint8
	sub   []permission     // and/or/not (not: one)
	str   strmatch.Matcher // url_path, requested_server_name
	hdr   strmatch.Header
	cidr  netip.Prefix
	lo    uint32 // destination_port; range [lo, hi)
	hi    uint32
	regex *regexpT // uri_template
}

const (
	pAny = iota
	pAnd
	pOr
	pNot
	pHeader
	pURLPath
	pDstIP
	pDstPort
	pDstPortRange
	pSNI
	pURITemplate
)

func compilePermission(pb *rbacv3.Permission, field string) (permission, error) {
	var p permission
	switch r := pb.GetRule().(type) {
	case *rbacv3.Permission_Any:
		if !r.Any {
			return p, fmt.Errorf("%s.any: must be true", field)
		}
		p.kind = pAny
	case *rbacv3.Permission_AndRules:
		p.kind = pAnd
		for i, s := range r.AndRules.GetRules() {
			c, err := compilePermission(s, fmt.Sprintf("%s.and_rules.rules[%d]", field, i))
			if err != nil {
				return p, err
			}
			p.sub = append(p.sub, c)
		}
	case *rbacv3.Permission_OrRules:
		p.kind = pOr
		for i, s := range r.OrRules.GetRules() {
			c, err := compilePermission(s, fmt.Sprintf("%s.or_rules.rules[%d]", field, i))
			if err != nil {
				return p, err
			}
			p.sub = append(p.sub, c)
		}
	case *rbacv3.Permission_NotRule:
		c, err := compilePermission(r.NotRule, field+".not_rule")
		if err != nil {
			return p, err
		}
		p.kind, p.sub = pNot, []permission{c}
	case *rbacv3.Permission_Header:
		h, err := strmatch.CompileHeader(field+".header", r.Header)
		if err != nil {
			return p, err
		}
		p.kind, p.hdr = pHeader, h
	case *rbacv3.Permission_UrlPath:
		s, err := strmatch.Compile(field+".url_path.path", r.UrlPath.GetPath())
		if err != nil {
			return p, err
		}
		p.kind, p.str = pURLPath, s
	case *rbacv3.Permission_DestinationIp:
		c, err := compileCIDR(r.DestinationIp, field+".destination_ip")
		if err != nil {
			return p, err
		}
		p.kind, p.cidr = pDstIP, c
	case *rbacv3.Permission_DestinationPort:
		p.kind, p.lo = pDstPort, r.DestinationPort
	case *rbacv3.Permission_DestinationPortRange:
		p.kind, p.lo, p.hi = pDstPortRange, uint32(r.DestinationPortRange.GetStart()), uint32(r.DestinationPortRange.GetEnd())
	case *rbacv3.Permission_RequestedServerName:
		s, err := strmatch.Compile(field+".requested_server_name", r.RequestedServerName)
		if err != nil {
			return p, err
		}
		p.kind, p.str = pSNI, s
	case *rbacv3.Permission_UriTemplate:
		var cfg uritemplatev3.UriTemplateMatchConfig
		if err := r.UriTemplate.GetTypedConfig().UnmarshalTo(&cfg); err != nil {
			return p, fmt.Errorf("%s.uri_template.typed_config: want envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig: %w", field, err)
		}
		re, err := compileURITemplate(cfg.GetPathTemplate())
		if err != nil {
			return p, fmt.Errorf("%s.uri_template.path_template: %w", field, err)
		}
		p.kind, p.regex = pURITemplate, re
	case *rbacv3.Permission_Metadata:
		return p, fmt.Errorf("%s.metadata (filter %q): dynamic metadata is not available: meshtun runs no %s filter to produce it", field, r.Metadata.GetFilter(), metadataSource(r.Metadata.GetFilter()))
	case *rbacv3.Permission_SourcedMetadata:
		return p, fmt.Errorf("%s.sourced_metadata: dynamic metadata is not available in meshtun", field)
	case *rbacv3.Permission_Matcher:
		return p, fmt.Errorf("%s.matcher: extension matchers are not supported", field)
	default:
		return p, fmt.Errorf("%s: no rule", field)
	}
	return p, nil
}

func metadataSource(filter string) string {
	if filter == "" {
		return "metadata-producing"
	}
	return filter
}

func (p *permission) match(in *Input) bool {
	switch p.kind {
	case pAny:
		return true
	case pAnd:
		for i := range p.sub {
			if !p.sub[i].match(in) {
				return false
			}
		}
		return true
	case pOr:
		return anyPermission(p.sub, in)
	case pNot:
		return !p.sub[0].match(in)
	case pHeader:
		return matchHeader(&p.hdr, in)
	case pURLPath:
		return in.Path != "" && p.str.Match(pathOnly(in.Path))
	case pDstIP:
		return in.Local.IsValid() && p.cidr.Contains(in.Local.Addr().Unmap())
	case pDstPort:
		return in.Local.IsValid() && uint32(in.Local.Port()) == p.lo
	case pDstPortRange:
		port := uint32(in.Local.Port())
		return in.Local.IsValid() && port >= p.lo && port < p.hi
	case pSNI:
		return p.str.Match(in.SNI)
	case pURITemplate:
		return in.Path != "" && p.regex.MatchString(pathOnly(in.Path))
	}
	return false
}

// principal is a compiled Principal.
type principal struct {
	kind uint8
	sub  []principal
	str  strmatch.Matcher // authenticated (hasStr false: any authenticated peer), url_path
	has  bool
	hdr  strmatch.Header
	cidr netip.Prefix
}

const (
	idAny = iota
	idAnd
	idOr
	idNot
	idAuthenticated
	idSourceIP
	idDirectRemoteIP
	idRemoteIP
	idHeader
	idURLPath
)

func compilePrincipal(pb *rbacv3.Principal, field string) (principal, error) {
	var p principal
	var err error
	switch r := pb.GetIdentifier().(type) {
	case *rbacv3.Principal_Any:
		if !r.Any {
			return p, fmt.Errorf("%s.any: must be true", field)
		}
		p.kind = idAny
	case *rbacv3.Principal_AndIds:
		p.kind = idAnd
		for i, s := range r.AndIds.GetIds() {
			c, err := compilePrincipal(s, fmt.Sprintf("%s.and_ids.ids[%d]", field, i))
			if err != nil {
				return p, err
			}
			p.sub = append(p.sub, c)
		}
	case *rbacv3.Principal_OrIds:
		p.kind = idOr
		for i, s := range r.OrIds.GetIds() {
			c, err := compilePrincipal(s, fmt.Sprintf("%s.or_ids.ids[%d]", field, i))
			if err != nil {
				return p, err
			}
			p.sub = append(p.sub, c)
		}
	case *rbacv3.Principal_NotId:
		c, err := compilePrincipal(r.NotId, field+".not_id")
		if err != nil {
			return p, err
		}
		p.kind, p.sub = idNot, []principal{c}
	case *rbacv3.Principal_Authenticated_:
		p.kind = idAuthenticated
		if m := r.Authenticated.GetPrincipalName(); m != nil {
			p.has = true
			if p.str, err = strmatch.Compile(field+".authenticated.principal_name", m); err != nil {
				return p, err
			}
		}
	case *rbacv3.Principal_SourceIp:
		p.kind = idSourceIP
		p.cidr, err = compileCIDR(r.SourceIp, field+".source_ip")
	case *rbacv3.Principal_DirectRemoteIp:
		p.kind = idDirectRemoteIP
		p.cidr, err = compileCIDR(r.DirectRemoteIp, field+".direct_remote_ip")
	case *rbacv3.Principal_RemoteIp:
		p.kind = idRemoteIP
		p.cidr, err = compileCIDR(r.RemoteIp, field+".remote_ip")
	case *rbacv3.Principal_Header:
		p.kind = idHeader
		p.hdr, err = strmatch.CompileHeader(field+".header", r.Header)
	case *rbacv3.Principal_UrlPath:
		p.kind = idURLPath
		p.str, err = strmatch.Compile(field+".url_path.path", r.UrlPath.GetPath())
	case *rbacv3.Principal_Metadata:
		return p, fmt.Errorf("%s.metadata (filter %q): dynamic metadata is not available: meshtun runs no %s filter to produce it (requestPrincipals need JWT authentication)", field, r.Metadata.GetFilter(), metadataSource(r.Metadata.GetFilter()))
	case *rbacv3.Principal_FilterState:
		return p, fmt.Errorf("%s.filter_state (key %q): filter state is not available in meshtun", field, r.FilterState.GetKey())
	case *rbacv3.Principal_SourcedMetadata:
		return p, fmt.Errorf("%s.sourced_metadata: dynamic metadata is not available in meshtun", field)
	case *rbacv3.Principal_Custom:
		return p, fmt.Errorf("%s.custom: extension principals are not supported", field)
	default:
		return p, fmt.Errorf("%s: no identifier", field)
	}
	return p, err
}

func (p *principal) match(in *Input) bool {
	switch p.kind {
	case idAny:
		return true
	case idAnd:
		for i := range p.sub {
			if !p.sub[i].match(in) {
				return false
			}
		}
		return true
	case idOr:
		return anyPrincipal(p.sub, in)
	case idNot:
		return !p.sub[0].match(in)
	case idAuthenticated:
		return p.authenticated(in.Peer)
	case idSourceIP, idDirectRemoteIP:
		return in.DirectRemote.IsValid() && p.cidr.Contains(in.DirectRemote.Unmap())
	case idRemoteIP:
		a := in.Remote
		if !a.IsValid() {
			a = in.DirectRemote
		}
		return a.IsValid() && p.cidr.Contains(a.Unmap())
	case idHeader:
		return matchHeader(&p.hdr, in)
	case idURLPath:
		return in.Path != "" && p.str.Match(pathOnly(in.Path))
	}
	return false
}

// authenticated is Envoy's AuthenticatedMatcher: no TLS peer never
// matches; no principal_name matches any peer; else any URI SAN, then
// any DNS SAN, then the subject.
func (p *principal) authenticated(peer *Peer) bool {
	if peer == nil {
		return false
	}
	if !p.has {
		return true
	}
	for _, s := range peer.URISANs {
		if p.str.Match(s) {
			return true
		}
	}
	for _, s := range peer.DNSSANs {
		if p.str.Match(s) {
			return true
		}
	}
	return p.str.Match(peer.Subject)
}
