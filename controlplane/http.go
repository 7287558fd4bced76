package controlplane

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	previoushostsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// HTTP ports, as Istio serves them to a sidecar: every HTTP port number
// gets one listener on the wildcard, 0.0.0.0_<port> (flows to any address
// on that port without a listener of their own are handed to it), whose
// http_connection_manager takes its routes over RDS from the route
// configuration named "<port>". That configuration has a virtual host per
// host with the port, matched on the Host header, and a catch-all virtual
// host for every other Host: allow_any (to PassthroughCluster, the
// original destination) under ALLOW_ANY, block_all (a 502) under
// REGISTRY_ONLY.

// Names Istio gives the HTTP pieces.
const (
	hcmName          = "envoy.filters.network.http_connection_manager"
	routerFilterName = "envoy.filters.http.router"
	previousHosts    = "envoy.retry_host_predicates.previous_hosts"

	// defaultRouteName is the route of a host's virtual host.
	defaultRouteName = "default"
	// allowAnyVirtualHost and blockAllVirtualHost are the catch-all
	// virtual hosts (and their routes) of ALLOW_ANY and REGISTRY_ONLY:
	// Istio's util.Passthrough and util.BlackHole.
	allowAnyVirtualHost = "allow_any"
	blockAllVirtualHost = "block_all"

	// defaultRetryOn and the rest of defaultRetryPolicy are Istio's
	// retry.DefaultPolicy.
	defaultRetryOn = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
)

// routeName is the route configuration of HTTP port port.
func routeName(port uint16) string { return strconv.Itoa(int(port)) }

// httpListener is Istio's outbound HTTP listener: one chain, the
// connection manager with RDS. Istio's buildHTTPConnectionManager also
// sets upgrade_configs (websocket), request_id_extension, tracing and the
// telemetry HTTP filters; meshtun's proxy proxies no upgrades and runs no
// telemetry filters, so they are left out rather than accepted and
// ignored. normalize_path and path_with_escaped_slashes_action are Istio's
// (the proxy normalizes the path before routing, as Envoy).
func (g *generator) httpListener(pl *listenerPlan) *listenerv3.Listener {
	l := outboundBase(pl, corev3.SocketAddress_TCP)
	hcm := &hcmv3.HttpConnectionManager{
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		StatPrefix: "outbound_" + l.GetName(),
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			ConfigSource:    adsConfigSource(),
			RouteConfigName: routeName(pl.addr.Port()),
		}},
		HttpFilters: []*hcmv3.HttpFilter{{
			Name:       routerFilterName,
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})},
		}},
		AccessLog:                    g.accessLog(true),
		UseRemoteAddress:             wrapperspb.Bool(false),
		NormalizePath:                wrapperspb.Bool(true),
		PathWithEscapedSlashesAction: hcmv3.HttpConnectionManager_KEEP_UNCHANGED,
		// Istio disables the stream idle timeout: the route timeouts
		// (none by default) govern.
		StreamIdleTimeout: durationpb.New(0),
	}
	l.FilterChains = []*listenerv3.FilterChain{{
		Filters: []*listenerv3.Filter{{
			Name:       hcmName,
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(hcm)},
		}},
	}}
	return l
}

// routeConfiguration is the route configuration "<port>" of an HTTP port,
// as seen from a node of class c: a virtual host per host, sorted by name,
// then the catch-all. A domain already claimed by an earlier virtual host
// is left out (Istio's dedupeDomains), and an alternative short name that
// is another host's full name always goes to that host: the proxy, as
// Envoy, refuses a route configuration with a domain twice.
func (g *generator) routeConfiguration(pl *listenerPlan, c nodeClass) *routev3.RouteConfiguration {
	port := pl.addr.Port()
	routes := append([]route(nil), pl.routes...)
	sort.Slice(routes, func(i, j int) bool { return routes[i].host.Name < routes[j].host.Name })
	fqdns := map[string]bool{}
	for _, rt := range routes {
		fqdns[rt.host.Name] = true
		fqdns[hostPort(rt.host.Name, port)] = true
	}
	used := map[string]bool{}
	rc := &routev3.RouteConfiguration{Name: routeName(port), ValidateClusters: wrapperspb.Bool(false)}
	for _, rt := range routes {
		var domains []string
		for _, d := range virtualHostDomains(rt.host, port, c.ns) {
			if used[d.name] || d.alt && fqdns[d.name] {
				continue
			}
			used[d.name] = true
			domains = append(domains, d.name)
		}
		if len(domains) == 0 {
			continue
		}
		name := hostPort(rt.host.Name, port)
		rc.VirtualHosts = append(rc.VirtualHosts, &routev3.VirtualHost{
			Name:                       name,
			Domains:                    domains,
			Routes:                     []*routev3.Route{defaultRoute(clusterName(port, rt.host.Name), name)},
			IncludeRequestAttemptCount: true,
		})
	}
	rc.VirtualHosts = append(rc.VirtualHosts, g.catchAllVirtualHost())
	return rc
}

type domain struct {
	name string
	alt  bool // a short form of the host's name, not the name itself
}

// virtualHostDomains are the Host header values of host h on port, each
// with and without the port, as Istio's generateVirtualHostDomains for a
// proxy in namespace ns: the host name; for a service, the short forms a
// client in ns can resolve (<name> only from the same namespace;
// <name>.<namespace> and <name>.<namespace>.svc from any); then the
// addresses (IPv6 ones in brackets).
func virtualHostDomains(h *host, port uint16, ns string) []domain {
	var out []domain
	add := func(name string, alt bool) {
		out = append(out, domain{bracketIPv6(name), alt}, domain{hostPort(name, port), alt})
	}
	add(h.Name, false)
	if !h.External && ns != "" {
		if h.Namespace == ns {
			add(h.Service, true)
		}
		add(h.Service+"."+h.Namespace+".svc", true)
		add(h.Service+"."+h.Namespace, true)
	}
	for _, a := range h.Addresses {
		add(a.String(), false)
	}
	return out
}

// hostPort is Istio's util.DomainName: host:port, IPv6 in brackets.
func hostPort(host string, port uint16) string {
	if ip, err := netip.ParseAddr(host); err == nil {
		return netip.AddrPortFrom(ip, port).String()
	}
	return host + ":" + strconv.Itoa(int(port))
}

func bracketIPv6(host string) string {
	if strings.Contains(host, ":") {
		return "[" + host + "]"
	}
	return host
}

// defaultRoute is Istio's BuildDefaultHTTPOutboundRoute: everything to
// the host's cluster, no timeout, Istio's default retries; the decorator
// names the operation for tracing (accepted, unused by the proxy).
func defaultRoute(cluster, vhost string) *routev3.Route {
	return &routev3.Route{
		Name:  defaultRouteName,
		Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster},
			Timeout:          durationpb.New(0),
			RetryPolicy:      defaultRetryPolicy(),
			MaxGrpcTimeout:   durationpb.New(0), //nolint:staticcheck // Istio still sets it
		}},
		Decorator: &routev3.Decorator{Operation: fmt.Sprintf("%s/*", vhost)},
	}
}

// defaultRetryPolicy is Istio's retry.DefaultPolicy: two retries on
// connection failures, refused streams, gRPC unavailable/cancelled and
// 503, each on another host if there is one.
func defaultRetryPolicy() *routev3.RetryPolicy {
	return &routev3.RetryPolicy{
		RetryOn:    defaultRetryOn,
		NumRetries: wrapperspb.UInt32(2),
		RetryHostPredicate: []*routev3.RetryPolicy_RetryHostPredicate{{
			Name:       previousHosts,
			ConfigType: &routev3.RetryPolicy_RetryHostPredicate_TypedConfig{TypedConfig: mustAny(&previoushostsv3.PreviousHostsPredicate{})},
		}},
		HostSelectionRetryMaxAttempts: 5,
		RetriableStatusCodes:          []uint32{503},
	}
}

// catchAllVirtualHost is Istio's buildCatchAllVirtualHost: under
// ALLOW_ANY a request for a Host no virtual host claims goes to its
// original destination (PassthroughCluster, no timeout); under
// REGISTRY_ONLY it is answered 502.
func (g *generator) catchAllVirtualHost() *routev3.VirtualHost {
	match := &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}}
	if g.mesh.OutboundTrafficPolicy.Mode == RegistryOnly {
		return &routev3.VirtualHost{
			Name:    blockAllVirtualHost,
			Domains: []string{"*"},
			Routes: []*routev3.Route{{
				Name:   blockAllVirtualHost,
				Match:  match,
				Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 502}},
			}},
			IncludeRequestAttemptCount: true,
		}
	}
	return &routev3.VirtualHost{
		Name:    allowAnyVirtualHost,
		Domains: []string{"*"},
		Routes: []*routev3.Route{{
			Name:  allowAnyVirtualHost,
			Match: match,
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{
				ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: passthroughCluster},
				Timeout:          durationpb.New(0),
				MaxGrpcTimeout:   durationpb.New(0), //nolint:staticcheck // Istio still sets it
			}},
		}},
		IncludeRequestAttemptCount: true,
	}
}
