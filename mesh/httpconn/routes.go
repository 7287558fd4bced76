package httpconn

import (
	"errors"
	"fmt"
	"net/http"
	"net/textproto"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshtun/meshtun/mesh/rbac"

	"github.com/meshtun/meshtun/mesh/strmatch"
)

// DefaultRouteTimeout is Envoy's route timeout when route.timeout is unset.
const DefaultRouteTimeout = 15 * time.Second

// Routes is a compiled RouteConfiguration: immutable, shared by every flow
// and stream that uses it. Finding a virtual host and a route allocates
// nothing (except lower-casing a Host header that has upper case).
type Routes struct {
	name string

	exact    map[string]*VirtualHost
	suffixes []wildcardSet // longest first
	prefixes []wildcardSet // longest first
	def      *VirtualHost
	vhosts   []*VirtualHost

	ignorePort     bool
	vhostHeader    string // canonical key; "" uses the authority
	mostSpecific   bool   // most_specific_header_mutations_wins
	reqOps, rspOps *headerOps
	internalOnly   []string
	faults         perFilter
}

// wildcardSet holds the wildcard domains of one length (without the '*').
type wildcardSet struct {
	n int
	m map[string]*VirtualHost
}

// VirtualHost is a compiled route.v3.VirtualHost.
type VirtualHost struct {
	Name           string
	routes         []*Route
	reqOps, rspOps *headerOps
	retry          *retryPolicy
	attemptReq     bool // include_request_attempt_count
	attemptRsp     bool // include_attempt_count_in_response
	faults         perFilter
}

// Route is a compiled route.v3.Route.
type Route struct {
	Name string

	// match
	pathKind      uint8
	path          string
	caseSensitive bool
	re            *regexp.Regexp
	headers       []strmatch.Header
	query         []queryMatcher
	grpc          bool

	// action
	action        uint8
	cluster       string
	clusterHeader string // canonical key
	weighted      []weightedCluster
	totalWeight   uint32
	notFoundCode  int
	prefixRewrite string
	regexRewrite  *regexp.Regexp
	regexSubst    string
	hostRewrite   string
	timeout       time.Duration // 0: none
	timeoutVals   []string      // x-envoy-expected-rq-timeout-ms of timeout, shared (len == cap)
	idleTimeout   time.Duration // -1: the HCM's stream_idle_timeout
	grpcTO        grpcTimeouts  // max_grpc_timeout, max_stream_duration (grpc.go)
	retry         *retryPolicy
	upgrades      upgrades // upgrade_configs (upgrade.go)
	// connectTerminate: the CONNECT upgrade_config has connect_config,
	// so the proxy ends the CONNECT itself and relays its bytes to the
	// cluster over TCP (connect.go); without it a CONNECT is forwarded
	// upstream as a CONNECT (tunnel.go).
	connectTerminate bool
	reqOps, rspOps   *headerOps
	direct           directResponse
	redirect         redirect
	faults           perFilter
}

type weightedCluster struct {
	name           string
	header         string // cluster_header (canonical)
	weight         uint32
	hostRewrite    string
	reqOps, rspOps *headerOps
}

const (
	pathPrefix = iota
	pathExact
	pathRegex
	pathSeparatedPrefix
	// pathConnect is connect_matcher: the route matches CONNECT requests
	// only, and only such routes match CONNECT (a CONNECT has no path).
	pathConnect
)

const (
	actionRoute = iota
	actionRedirect
	actionDirect
)

type directResponse struct {
	status int
	body   string
}

type redirect struct {
	scheme, host, port string
	path, prefix       string
	regex              *regexp.Regexp
	regexSubst         string
	stripQuery         bool
	code               int
}

// Name is the route configuration's name.
func (rt *Routes) Name() string { return rt.name }

// CompileRoutes validates and compiles a RouteConfiguration. Errors name
// the field relative to the RouteConfiguration, e.g.
// "virtual_hosts[1].routes[0].route: …".
func CompileRoutes(rc *routev3.RouteConfiguration) (*Routes, error) {
	if rc == nil {
		return nil, errors.New("nil RouteConfiguration")
	}
	if err := rc.ValidateAll(); err != nil {
		return nil, err
	}
	rt := &Routes{
		name:         rc.GetName(),
		exact:        map[string]*VirtualHost{},
		ignorePort:   rc.GetIgnorePortInHostMatching(),
		mostSpecific: rc.GetMostSpecificHeaderMutationsWins(),
	}
	if rc.GetVhds() != nil {
		return nil, fieldf("vhds", "not supported")
	}
	if len(rc.GetClusterSpecifierPlugins()) > 0 {
		return nil, fieldf("cluster_specifier_plugins", "not supported")
	}
	if h := rc.GetVhostHeader(); h != "" {
		rt.vhostHeader = textproto.CanonicalMIMEHeaderKey(h)
	}
	for _, h := range rc.GetInternalOnlyHeaders() {
		rt.internalOnly = append(rt.internalOnly, textproto.CanonicalMIMEHeaderKey(h))
	}
	var err error
	if rt.reqOps, err = compileHeaderOps(rc.GetRequestHeadersToAdd(), rc.GetRequestHeadersToRemove(), "request"); err != nil {
		return nil, err
	}
	if rt.rspOps, err = compileHeaderOps(rc.GetResponseHeadersToAdd(), rc.GetResponseHeadersToRemove(), "response"); err != nil {
		return nil, err
	}
	if rt.faults, err = compilePerFilter(rc.GetTypedPerFilterConfig(), "typed_per_filter_config"); err != nil {
		return nil, err
	}
	suffix, prefix := map[int]map[string]*VirtualHost{}, map[int]map[string]*VirtualHost{}
	seen := map[string]bool{}
	for i, vpb := range rc.GetVirtualHosts() {
		field := fmt.Sprintf("virtual_hosts[%d]", i)
		vh, err := compileVHost(vpb)
		if err != nil {
			return nil, at(field, err)
		}
		rt.vhosts = append(rt.vhosts, vh)
		for j, d := range vpb.GetDomains() {
			d = strings.ToLower(d)
			df := fmt.Sprintf("%s.domains[%d]", field, j)
			if seen[d] {
				return nil, fieldf(df, "only unique values for domains are permitted; duplicate entry of domain %s", d)
			}
			seen[d] = true
			switch {
			case d == "*":
				rt.def = vh
			case d == "":
				return nil, fieldf(df, "empty domain")
			case d[0] == '*':
				addWildcard(suffix, d[1:], vh)
			case d[len(d)-1] == '*':
				addWildcard(prefix, d[:len(d)-1], vh)
			default:
				if strings.Contains(d, "*") {
					return nil, fieldf(df, "%q: a wildcard must be the first or last character", d)
				}
				rt.exact[d] = vh
			}
		}
	}
	rt.suffixes = sortWildcards(suffix)
	rt.prefixes = sortWildcards(prefix)
	return rt, nil
}

func addWildcard(m map[int]map[string]*VirtualHost, s string, vh *VirtualHost) {
	if m[len(s)] == nil {
		m[len(s)] = map[string]*VirtualHost{}
	}
	m[len(s)][s] = vh
}

func sortWildcards(m map[int]map[string]*VirtualHost) []wildcardSet {
	var out []wildcardSet
	for n, set := range m {
		out = append(out, wildcardSet{n: n, m: set})
	}
	slices.SortFunc(out, func(a, b wildcardSet) int { return b.n - a.n })
	return out
}

func compileVHost(v *routev3.VirtualHost) (*VirtualHost, error) {
	vh := &VirtualHost{
		Name:       v.GetName(),
		attemptReq: v.GetIncludeRequestAttemptCount(),
		attemptRsp: v.GetIncludeAttemptCountInResponse(),
	}
	if v.GetMatcher() != nil {
		return nil, fieldf("matcher", "the matching API is not supported (use routes)")
	}
	if v.GetRequireTls() != routev3.VirtualHost_NONE {
		return nil, fieldf("require_tls", "TLS is not supported")
	}
	var err error
	if vh.reqOps, err = compileHeaderOps(v.GetRequestHeadersToAdd(), v.GetRequestHeadersToRemove(), "request"); err != nil {
		return nil, err
	}
	if vh.rspOps, err = compileHeaderOps(v.GetResponseHeadersToAdd(), v.GetResponseHeadersToRemove(), "response"); err != nil {
		return nil, err
	}
	if v.GetRetryPolicy() != nil {
		if vh.retry, err = compileRetry(v.GetRetryPolicy(), "retry_policy"); err != nil {
			return nil, err
		}
	}
	if vh.faults, err = compilePerFilter(v.GetTypedPerFilterConfig(), "typed_per_filter_config"); err != nil {
		return nil, err
	}
	for i, r := range v.GetRoutes() {
		rt, err := compileRoute(r)
		if err != nil {
			return nil, at(fmt.Sprintf("routes[%d]", i), err)
		}
		vh.routes = append(vh.routes, rt)
	}
	return vh, nil
}

func compileRoute(r *routev3.Route) (*Route, error) {
	rt := &Route{Name: r.GetName(), caseSensitive: true, idleTimeout: -1, grpcTO: noGRPCTimeouts}
	m := r.GetMatch()
	if cs := m.GetCaseSensitive(); cs != nil {
		rt.caseSensitive = cs.GetValue()
	}
	switch p := m.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Prefix:
		rt.pathKind, rt.path = pathPrefix, p.Prefix
	case *routev3.RouteMatch_Path:
		rt.pathKind, rt.path = pathExact, p.Path
	case *routev3.RouteMatch_SafeRegex:
		re, err := compileRegex(p.SafeRegex, "match.safe_regex")
		if err != nil {
			return nil, err
		}
		rt.pathKind, rt.re = pathRegex, re
	case *routev3.RouteMatch_PathSeparatedPrefix:
		rt.pathKind, rt.path = pathSeparatedPrefix, p.PathSeparatedPrefix
	case *routev3.RouteMatch_ConnectMatcher_:
		rt.pathKind = pathConnect
	default:
		return nil, fieldf("match", "path specifier %T not supported", p)
	}
	if !rt.caseSensitive {
		rt.path = strings.ToLower(rt.path)
	}
	if m.GetRuntimeFraction() != nil || len(m.GetCookies()) > 0 || m.GetTlsContext() != nil || len(m.GetDynamicMetadata()) > 0 || len(m.GetFilterState()) > 0 {
		return nil, fieldf("match", "runtime_fraction, cookies, tls_context, dynamic_metadata and filter_state are not supported")
	}
	rt.grpc = m.GetGrpc() != nil
	for i, h := range m.GetHeaders() {
		hm, err := compileHeaderMatcher(h, fmt.Sprintf("match.headers[%d]", i))
		if err != nil {
			return nil, err
		}
		rt.headers = append(rt.headers, hm)
	}
	for i, q := range m.GetQueryParameters() {
		qm, err := compileQueryMatcher(q, fmt.Sprintf("match.query_parameters[%d]", i))
		if err != nil {
			return nil, err
		}
		rt.query = append(rt.query, qm)
	}
	var err error
	if rt.reqOps, err = compileHeaderOps(r.GetRequestHeadersToAdd(), r.GetRequestHeadersToRemove(), "request"); err != nil {
		return nil, err
	}
	if rt.rspOps, err = compileHeaderOps(r.GetResponseHeadersToAdd(), r.GetResponseHeadersToRemove(), "response"); err != nil {
		return nil, err
	}
	if rt.faults, err = compilePerFilter(r.GetTypedPerFilterConfig(), "typed_per_filter_config"); err != nil {
		return nil, err
	}
	switch a := r.GetAction().(type) {
	case *routev3.Route_Route:
		rt.action = actionRoute
		if err := rt.compileAction(a.Route); err != nil {
			return nil, at("route", err)
		}
	case *routev3.Route_Redirect:
		rt.action = actionRedirect
		if err := rt.compileRedirect(a.Redirect); err != nil {
			return nil, at("redirect", err)
		}
	case *routev3.Route_DirectResponse:
		rt.action = actionDirect
		rt.direct.status = int(a.DirectResponse.GetStatus())
		body := a.DirectResponse.GetBody()
		switch {
		case body == nil:
		case body.GetFilename() != "" || body.GetEnvironmentVariable() != "":
			return nil, fieldf("direct_response.body", "only inline_string and inline_bytes are supported")
		case body.GetInlineBytes() != nil:
			rt.direct.body = string(body.GetInlineBytes())
		default:
			rt.direct.body = body.GetInlineString()
		}
		if len(rt.direct.body) > 4096 {
			return nil, fieldf("direct_response.body", "larger than max_direct_response_body_size_bytes (4096)")
		}
	default:
		return nil, fieldf("action", "%T not supported (want route, redirect or direct_response)", a)
	}
	return rt, nil
}

func (rt *Route) compileAction(a *routev3.RouteAction) error {
	switch s := a.GetClusterSpecifier().(type) {
	case *routev3.RouteAction_Cluster:
		rt.cluster = s.Cluster
	case *routev3.RouteAction_ClusterHeader:
		rt.clusterHeader = textproto.CanonicalMIMEHeaderKey(s.ClusterHeader)
	case *routev3.RouteAction_WeightedClusters:
		wc := s.WeightedClusters
		if wc.GetHeaderName() != "" || wc.GetRuntimeKeyPrefix() != "" {
			return fieldf("weighted_clusters", "header_name and runtime_key_prefix are not supported")
		}
		for i, c := range wc.GetClusters() {
			f := fmt.Sprintf("weighted_clusters.clusters[%d]", i)
			w := weightedCluster{name: c.GetName(), weight: c.GetWeight().GetValue(), hostRewrite: c.GetHostRewriteLiteral()}
			if c.GetClusterHeader() != "" {
				w.header = textproto.CanonicalMIMEHeaderKey(c.GetClusterHeader())
			}
			var err error
			if w.reqOps, err = compileHeaderOps(c.GetRequestHeadersToAdd(), c.GetRequestHeadersToRemove(), f+".request"); err != nil {
				return err
			}
			if w.rspOps, err = compileHeaderOps(c.GetResponseHeadersToAdd(), c.GetResponseHeadersToRemove(), f+".response"); err != nil {
				return err
			}
			if w.weight == 0 {
				continue
			}
			rt.weighted = append(rt.weighted, w)
			rt.totalWeight += w.weight
		}
		if rt.totalWeight == 0 {
			return fieldf("weighted_clusters", "total weight is 0")
		}
	default:
		return fieldf("cluster_specifier", "%T not supported", s)
	}
	switch a.GetClusterNotFoundResponseCode() {
	case routev3.RouteAction_NOT_FOUND:
		rt.notFoundCode = http.StatusNotFound
	case routev3.RouteAction_INTERNAL_SERVER_ERROR:
		rt.notFoundCode = http.StatusInternalServerError
	default:
		rt.notFoundCode = http.StatusServiceUnavailable
	}
	rt.prefixRewrite = a.GetPrefixRewrite()
	if rr := a.GetRegexRewrite(); rr != nil {
		re, err := regexp.Compile(rr.GetPattern().GetRegex())
		if err != nil {
			return at("regex_rewrite.pattern.regex", err)
		}
		rt.regexRewrite, rt.regexSubst = re, rewriteSubst(rr.GetSubstitution())
	}
	if a.GetPathRewritePolicy() != nil {
		return fieldf("path_rewrite_policy", "not supported")
	}
	switch h := a.GetHostRewriteSpecifier().(type) {
	case nil:
	case *routev3.RouteAction_HostRewriteLiteral:
		rt.hostRewrite = h.HostRewriteLiteral
	case *routev3.RouteAction_AutoHostRewrite:
		// Needs the endpoint's hostname; accepted and not applied.
	default:
		return fieldf("host_rewrite_specifier", "%T not supported", h)
	}
	rt.timeout = DefaultRouteTimeout
	if a.GetTimeout() != nil {
		rt.timeout = a.GetTimeout().AsDuration() // 0 disables
	}
	rt.timeoutVals = []string{strconv.FormatInt(rt.timeout.Milliseconds(), 10)}
	if a.GetIdleTimeout() != nil {
		rt.idleTimeout = a.GetIdleTimeout().AsDuration()
	}
	if a.GetRetryPolicy() != nil {
		p, err := compileRetry(a.GetRetryPolicy(), "retry_policy")
		if err != nil {
			return err
		}
		rt.retry = p
	}
	rt.grpcTO = parseGRPCTimeouts(a)
	u, terminate, err := parseRouteUpgrades(a.GetUpgradeConfigs())
	if err != nil {
		return err
	}
	rt.upgrades, rt.connectTerminate = u, terminate
	if a.GetRetryPolicyTypedConfig() != nil {
		return fieldf("retry_policy_typed_config", "not supported")
	}
	if a.GetInternalRedirectPolicy() != nil || a.GetInternalRedirectAction() != routev3.RouteAction_PASS_THROUGH_INTERNAL_REDIRECT {
		return fieldf("internal_redirect_policy", "not supported")
	}
	return nil
}

// rewriteSubst turns Envoy's \1 back-references into Go's ${1}.
func rewriteSubst(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) && s[i+1] >= '0' && s[i+1] <= '9' {
			b.WriteString("${" + string(s[i+1]) + "}")
			i++
			continue
		}
		if s[i] == '$' {
			b.WriteString("$$")
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func (rt *Route) compileRedirect(r *routev3.RedirectAction) error {
	rd := redirect{host: r.GetHostRedirect(), stripQuery: r.GetStripQuery()}
	if r.GetHttpsRedirect() {
		rd.scheme = "https"
	} else if s := r.GetSchemeRedirect(); s != "" {
		rd.scheme = strings.ToLower(s)
	}
	if p := r.GetPortRedirect(); p != 0 {
		rd.port = fmt.Sprint(p)
	}
	switch p := r.GetPathRewriteSpecifier().(type) {
	case *routev3.RedirectAction_PathRedirect:
		rd.path = p.PathRedirect
	case *routev3.RedirectAction_PrefixRewrite:
		rd.prefix = p.PrefixRewrite
		if rd.prefix == "" {
			rd.prefix = "\x00" // rewrite the prefix to nothing
		}
	case *routev3.RedirectAction_RegexRewrite:
		re, err := regexp.Compile(p.RegexRewrite.GetPattern().GetRegex())
		if err != nil {
			return at("regex_rewrite.pattern.regex", err)
		}
		rd.regex, rd.regexSubst = re, rewriteSubst(p.RegexRewrite.GetSubstitution())
	}
	switch r.GetResponseCode() {
	case routev3.RedirectAction_FOUND:
		rd.code = http.StatusFound
	case routev3.RedirectAction_SEE_OTHER:
		rd.code = http.StatusSeeOther
	case routev3.RedirectAction_TEMPORARY_REDIRECT:
		rd.code = http.StatusTemporaryRedirect
	case routev3.RedirectAction_PERMANENT_REDIRECT:
		rd.code = http.StatusPermanentRedirect
	default:
		rd.code = http.StatusMovedPermanently
	}
	rt.redirect = rd
	return nil
}

// perFilter holds the typed_per_filter_config entries this engine uses
// (fault and RBAC overrides), by filter name.
type perFilter []perFilterEntry

type perFilterEntry struct {
	name   string
	fault  *faultConfig // nil: the filter is disabled on this route
	isRBAC bool
	rbac   *rbac.Filter // RBACPerRoute; nil: disabled on this route
}

func compilePerFilter(m map[string]*anypb.Any, field string) (perFilter, error) {
	var out perFilter
	for name, a := range m {
		rf, ok, err := parsePerFilterRBAC(a)
		if err != nil {
			return nil, at(fmt.Sprintf("%s[%q]", field, name), err)
		}
		if ok {
			out = append(out, perFilterEntry{name: name, isRBAC: true, rbac: rf})
			continue
		}
		f, ok, err := parsePerFilterFault(a)
		if err != nil {
			return nil, at(fmt.Sprintf("%s[%q]", field, name), err)
		}
		if ok {
			out = append(out, perFilterEntry{name: name, fault: f})
		}
	}
	return out, nil
}

func (p perFilter) lookup(name string) (*faultConfig, bool) {
	if e := p.entry(name); e != nil && !e.isRBAC {
		return e.fault, true
	}
	return nil, false
}

func (p perFilter) entry(name string) *perFilterEntry {
	for i := range p {
		if p[i].name == name {
			return &p[i]
		}
	}
	return nil
}

// findVHost is Envoy's RouteMatcher::findVirtualHost: exact domain, then
// the longest suffix wildcard, then the longest prefix wildcard, then "*".
// A wildcard matches at least one character. The port is part of the
// value unless ignore_port_in_host_matching is set (Istio lists domains
// with and without the port).
func (rt *Routes) findVHost(r *http.Request) *VirtualHost {
	if len(rt.exact) == 0 && len(rt.suffixes) == 0 && len(rt.prefixes) == 0 {
		return rt.def
	}
	host := r.Host
	if rt.vhostHeader != "" {
		vs := r.Header[rt.vhostHeader]
		if len(vs) == 0 || vs[0] == "" {
			return nil
		}
		host = vs[0]
	}
	if rt.ignorePort {
		host = stripPort(host)
	}
	return rt.lookupHost(lowerASCII(host))
}

func (rt *Routes) lookupHost(host string) *VirtualHost {
	if vh, ok := rt.exact[host]; ok {
		return vh
	}
	for _, w := range rt.suffixes {
		if w.n < len(host) {
			if vh, ok := w.m[host[len(host)-w.n:]]; ok {
				return vh
			}
		}
	}
	for _, w := range rt.prefixes {
		if w.n < len(host) {
			if vh, ok := w.m[host[:w.n]]; ok {
				return vh
			}
		}
	}
	return rt.def
}

// stripPort removes a trailing :port (IPv6 literals keep their brackets).
func stripPort(h string) string {
	i := strings.LastIndexByte(h, ':')
	if i < 0 || strings.IndexByte(h[i:], ']') >= 0 {
		return h
	}
	if strings.Count(h, ":") > 1 && !strings.HasPrefix(h, "[") {
		return h // a bare IPv6 address
	}
	return h[:i]
}

func lowerASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(s)
		}
	}
	return s
}

// match returns the first route of vh that matches r (nil if none). path
// is the request target (path and query).
func (vh *VirtualHost) match(r *http.Request, path string) *Route {
	for _, rt := range vh.routes {
		if rt.matches(r, path) {
			return rt
		}
	}
	return nil
}

func (rt *Route) matches(r *http.Request, target string) bool {
	if (rt.pathKind == pathConnect) != isConnect(r) {
		return false
	}
	path, query, _ := strings.Cut(target, "?")
	switch rt.pathKind {
	case pathPrefix:
		// Envoy compares the prefix with the whole :path (query included).
		if !hasPrefixFold(target, rt.path, rt.caseSensitive) {
			return false
		}
	case pathExact:
		if rt.caseSensitive {
			if path != rt.path {
				return false
			}
		} else if !strings.EqualFold(path, rt.path) {
			return false
		}
	case pathRegex:
		if !rt.re.MatchString(path) {
			return false
		}
	case pathSeparatedPrefix:
		if !hasPrefixFold(path, rt.path, rt.caseSensitive) ||
			(len(path) > len(rt.path) && path[len(rt.path)] != '/') {
			return false
		}
	}
	if rt.grpc && !isGRPC(r) {
		return false
	}
	for i := range rt.headers {
		if !matchHeader(&rt.headers[i], r) {
			return false
		}
	}
	for i := range rt.query {
		if !rt.query[i].match(query) {
			return false
		}
	}
	return true
}

func hasPrefixFold(s, prefix string, caseSensitive bool) bool {
	if caseSensitive {
		return strings.HasPrefix(s, prefix)
	}
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}

// isConnect reports a CONNECT request (HTTP/1.1, or HTTP/2 without
// :protocol): an RFC 8441 extended CONNECT is an upgrade with a path and
// matches routes as the HTTP/1.1 upgrade it stands for.
func isConnect(r *http.Request) bool {
	return r.Method == http.MethodConnect && len(r.Header[":protocol"]) == 0
}

func isGRPC(r *http.Request) bool {
	ct := r.Header["Content-Type"]
	return len(ct) > 0 && strings.HasPrefix(ct[0], "application/grpc")
}

// Match finds the virtual host and route for a request, as the engine
// does; exported for tests and tools (nil, nil when no virtual host).
func (rt *Routes) Match(r *http.Request) (*VirtualHost, *Route) {
	vh := rt.findVHost(r)
	if vh == nil {
		return nil, nil
	}
	target := r.RequestURI
	if target == "" || target[0] != '/' {
		target = r.URL.RequestURI()
	}
	return vh, vh.match(r, target)
}
