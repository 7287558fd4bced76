package controlplane

import (
	"fmt"
	"strconv"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	httpinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	origdstv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rawbufferv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Istio's mutual TLS, as istiod generates it for a sidecar with a workload
// identity (MTLS.md §2.3–§5):
//
//   - endpoints of workloads with a sidecar carry the metadata
//     envoy.transport_socket_match {tlsMode: istio} (unless their peer
//     authentication is DISABLE), and every service endpoint the istio
//     workload metadata;
//   - with auto mTLS, a service's outbound clusters carry two
//     transport_socket_matches: tlsMode-istio → UpstreamTlsContext (SDS
//     "default" and "ROOTCA" over sds-grpc, the SPIFFE IDs of the
//     service's accounts, SNI outbound_.<port>_._.<host>) and
//     tlsMode-disabled → raw_buffer, so each endpoint gets what it speaks;
//   - virtualInbound gets the chains of the workload's mode, matched on
//     the transport protocol and ALPN the listener filters find, with a
//     DownstreamTlsContext (client certificate required, any SPIFFE ID of
//     the trust domain) on the mTLS ones.
//
// A node without a workload identity (it came over the plaintext port, so
// its agent has no certificate: identity mode none) gets none of this on
// its own clusters and listeners: TLS it cannot do would only fail.

// Names in Istio's TLS shapes.
const (
	tlsTransportSocket     = "envoy.transport_sockets.tls"
	rawBufferSocket        = "envoy.transport_sockets.raw_buffer"
	transportSocketMatch   = "envoy.transport_socket_match"
	istioMetadataKey       = "istio"
	tlsModeKey             = "tlsMode"
	tlsModeIstio           = "istio"
	tlsModeIstioMatch      = "tlsMode-istio"
	tlsModeDisabledMatch   = "tlsMode-disabled"
	sdsClusterName         = "sds-grpc"
	sdsDefaultSecret       = "default"
	sdsRootSecret          = "ROOTCA"
	httpInspector          = "envoy.filters.listener.http_inspector"
	transportTLS           = "tls"
	transportRaw           = "raw_buffer"
	virtualInboundCatchAll = virtualInbound + "-catchall-http"
	tlsInspectorReadBuffer = 512 // Istio's initial_read_buffer_size
	tlsVersionMin          = tlsv3.TlsParameters_TLSv1_2
	tlsVersionMax          = tlsv3.TlsParameters_TLSv1_3
)

// ALPN lists of Istio's builders (pilot/pkg/networking/core/listener.go,
// util.go, authn/utils). The clusters offer istio-peer-exchange as istiod
// writes them; meshtun's proxy never offers or selects it.
var (
	alpnInMeshWithMxc     = []string{"istio-peer-exchange", "istio"}
	alpnDownstreamHTTP    = []string{"h2", "http/1.1"}
	alpnDownstreamWithMxc = []string{"istio-peer-exchange", "h2", "http/1.1"}
	mtlsHTTPALPNs         = []string{"istio-http/1.0", "istio-http/1.1", "istio-h2"}
	allIstioMtlsALPNs     = []string{"istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"}
	mtlsTCPWithMxcALPNs   = []string{"istio-peer-exchange", "istio"}
	plaintextHTTPALPNs    = []string{"http/1.1", "h2c"}
	// inboundCipherSuites are Istio's default TLS 1.2 suites of inbound
	// contexts (meshMTLS.cipherSuites unset).
	inboundCipherSuites = []string{"ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
		"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-GCM-SHA256"}
)

// sdsSecretConfig is Istio's ConstructSdsSecretConfig: the secret name
// over sds-grpc (the agent's SDS socket), never timing out (warming until
// the secret arrives).
func sdsSecretConfig(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{
		Name: name,
		SdsConfig: &corev3.ConfigSource{
			ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: &corev3.ApiConfigSource{
				ApiType:             corev3.ApiConfigSource_GRPC,
				TransportApiVersion: corev3.ApiVersion_V3,
				GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
					EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: sdsClusterName}}}},
				SetNodeOnFirstMessageOnly: true,
			}},
			InitialFetchTimeout: durationpb.New(0),
			ResourceApiVersion:  corev3.ApiVersion_V3,
		},
	}
}

// commonTLS is Istio's ApplyToCommonTLSContext: the workload certificate
// and the combined validation context (sans as default context, ROOTCA
// over SDS).
func commonTLS(params *tlsv3.TlsParameters, alpn []string, sans []*matcherv3.StringMatcher) *tlsv3.CommonTlsContext {
	return &tlsv3.CommonTlsContext{
		TlsParams:                      params,
		AlpnProtocols:                  alpn,
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsSecretConfig(sdsDefaultSecret)},
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
			CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
				DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchSubjectAltNames: sans}, //nolint:staticcheck // Istio's sidecar shape
				ValidationContextSdsSecretConfig: sdsSecretConfig(sdsRootSecret),
			},
		},
	}
}

// sni is Istio's BuildDNSSrvSubsetKey for the outbound direction and no
// subset: outbound_.<port>_._.<host>.
func sni(port uint16, host string) string {
	return fmt.Sprintf("outbound_.%d_._.%s", port, host)
}

// upstreamTransportSocketMatches are auto mTLS's two matches of a
// service port's cluster: ISTIO_MUTUAL to endpoints with tlsMode istio,
// plaintext to the others.
func upstreamTransportSocketMatches(h *host, p port, trustDomain string) []*clusterv3.Cluster_TransportSocketMatch {
	var sans []*matcherv3.StringMatcher
	for _, id := range h.serviceAccounts(trustDomain) {
		sans = append(sans, &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}})
	}
	utc := &tlsv3.UpstreamTlsContext{
		CommonTlsContext: commonTLS(&tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsVersionMin, TlsMaximumProtocolVersion: tlsVersionMax},
			alpnInMeshWithMxc, sans),
		Sni: sni(p.Number, h.Name),
	}
	match, _ := structpb.NewStruct(map[string]any{tlsModeKey: tlsModeIstio})
	return []*clusterv3.Cluster_TransportSocketMatch{
		{
			Name:  tlsModeIstioMatch,
			Match: match,
			TransportSocket: &corev3.TransportSocket{Name: tlsTransportSocket,
				ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(utc)}},
		},
		{
			Name:            tlsModeDisabledMatch,
			Match:           &structpb.Struct{},
			TransportSocket: rawBuffer(),
		},
	}
}

func rawBuffer() *corev3.TransportSocket {
	return &corev3.TransportSocket{Name: rawBufferSocket,
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&rawbufferv3.RawBuffer{})}}
}

// downstreamTLS is Istio's BuildInboundTLS: the workload certificate, a
// client certificate required and verified against ROOTCA with any SPIFFE
// ID of the trust domain, TLS 1.2–1.3 with Istio's suites; alpn is what
// the server may select.
func downstreamTLS(alpn []string, trustDomain string) *corev3.TransportSocket {
	prefix := &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://" + trustDomain + "/"}}
	dtc := &tlsv3.DownstreamTlsContext{
		CommonTlsContext: commonTLS(&tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsVersionMin, TlsMaximumProtocolVersion: tlsVersionMax,
			CipherSuites: inboundCipherSuites}, alpn, []*matcherv3.StringMatcher{prefix}),
		RequireClientCertificate: wrapperspb.Bool(true),
	}
	return &corev3.TransportSocket{Name: tlsTransportSocket,
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(dtc)}}
}

// endpointMetadata is what istiod's EndpointBuilder puts on a service
// endpoint: the workload, and tlsMode istio when it has a sidecar whose
// peer authentication is not DISABLE (Istio's mtlsChecker).
func endpointMetadata(h *host, e *endpoint, mesh *MeshConfig) *corev3.Metadata {
	fm := map[string]*structpb.Struct{}
	istio, _ := structpb.NewStruct(map[string]any{"workload": workloadMetadata(h, e)})
	fm[istioMetadataKey] = istio
	mode := e.Mode
	if mode == "" {
		mode = mesh.peerAuth()
	}
	if e.Sidecar && mode != Disable {
		tm, _ := structpb.NewStruct(map[string]any{tlsModeKey: tlsModeIstio})
		fm[transportSocketMatch] = tm
	}
	return &corev3.Metadata{FilterMetadata: fm}
}

// inboundClusterName is Istio's inbound cluster of a workload port.
func inboundClusterName(port uint32) string {
	return "inbound|" + strconv.FormatUint(uint64(port), 10) + "||"
}

// inboundCluster is Istio's inbound|<port>|| cluster: the original
// destination (the workload's own port), from 127.0.0.6 as
// InboundPassthroughCluster.
func (g *generator) inboundCluster(c nodeClass, port uint32) *clusterv3.Cluster {
	cl := g.inboundPassthroughCluster(c)
	cl.Name = inboundClusterName(port)
	cl.AltStatName = cl.Name + statDelimiter
	cl.CommonLbConfig = &clusterv3.Cluster_CommonLbConfig{}
	return cl
}

// inboundChain is one chain of the mTLS-aware virtualInbound.
type inboundChain struct {
	name      string
	port      uint32 // destination_port; 0 for the catch-all chains
	transport string // tls or raw_buffer
	alpn      []string
	http      bool     // http_connection_manager, else tcp_proxy
	mtls      []string // terminate mTLS, selecting from these ALPNs; nil: no termination
	cluster   string
	host      *host // the per-port chains' service, for the route's decorator
}

// inboundChains lists the chains of MTLS.md §5 for a workload (nil: only
// the catch-all) in mode: per port of the workload by its protocol, then
// the catch-all (Istio's AUTO port, sniffed).
func inboundChains(w *workload, mode PeerAuthMode, wildcard string) []inboundChain {
	var out []inboundChain
	if w != nil {
		for _, p := range w.Ports {
			name := fmt.Sprintf("%s_%d", wildcard, p.Number)
			cl := inboundClusterName(p.Number)
			http := p.Protocol == protocolHTTP
			alpn := alpnDownstreamWithMxc
			if http {
				alpn = alpnDownstreamHTTP
			}
			switch mode {
			case Permissive:
				out = append(out, inboundChain{name: name, port: p.Number, transport: transportTLS, alpn: allIstioMtlsALPNs, http: http, mtls: alpn, cluster: cl, host: p.Host})
				if !http {
					out = append(out, inboundChain{name: name, port: p.Number, transport: transportTLS, cluster: cl, host: p.Host})
				}
				out = append(out, inboundChain{name: name, port: p.Number, transport: transportRaw, http: http, cluster: cl, host: p.Host})
			case Strict:
				out = append(out, inboundChain{name: name, port: p.Number, transport: transportTLS, http: http, mtls: alpn, cluster: cl, host: p.Host})
			case Disable:
				out = append(out, inboundChain{name: name, port: p.Number, transport: transportRaw, http: http, cluster: cl, host: p.Host})
			}
		}
	}
	pt := inboundPassthroughCluster
	switch mode {
	case Permissive:
		out = append(out,
			inboundChain{name: virtualInboundCatchAll, transport: transportTLS, alpn: mtlsHTTPALPNs, http: true, mtls: alpnDownstreamHTTP, cluster: pt},
			inboundChain{name: virtualInboundCatchAll, transport: transportRaw, alpn: plaintextHTTPALPNs, http: true, cluster: pt},
			inboundChain{name: virtualInbound, transport: transportTLS, alpn: mtlsTCPWithMxcALPNs, mtls: alpnDownstreamWithMxc, cluster: pt},
			inboundChain{name: virtualInbound, transport: transportRaw, cluster: pt},
			inboundChain{name: virtualInbound, transport: transportTLS, cluster: pt})
	case Strict:
		out = append(out,
			inboundChain{name: virtualInboundCatchAll, transport: transportTLS, alpn: mtlsHTTPALPNs, http: true, mtls: alpnDownstreamHTTP, cluster: pt},
			inboundChain{name: virtualInbound, transport: transportTLS, mtls: alpnDownstreamWithMxc, cluster: pt})
	case Disable:
		out = append(out, inboundChain{name: virtualInbound, transport: transportRaw, cluster: pt})
	}
	return out
}

// virtualInboundMTLS is virtualInbound of a node with a workload
// identity: original_dst, then tls_inspector (unless DISABLE, whose chains
// are all plaintext and need not wait for the client's first bytes) and,
// where a chain matches plaintext HTTP, http_inspector, off on the
// declared ports whose protocol is known; the chains of inboundChains.
func (g *generator) virtualInboundMTLS(c nodeClass, w *workload, mode PeerAuthMode) *listenerv3.Listener {
	l := &listenerv3.Listener{
		Name:             virtualInbound,
		Address:          socketAddress(corev3.SocketAddress_TCP, c.wildcard(), proxyInboundListenPort),
		TrafficDirection: corev3.TrafficDirection_INBOUND,
		ListenerFilters: []*listenerv3.ListenerFilter{{
			Name:       originalDst,
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&origdstv3.OriginalDst{})},
		}},
		FilterChains: []*listenerv3.FilterChain{{
			Name:             virtualInbound + "-blackhole",
			FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(proxyInboundListenPort)},
			Filters:          []*listenerv3.Filter{g.tcpProxy(blackHoleCluster)},
		}},
	}
	chains := inboundChains(w, mode, c.wildcard().String())
	needTLS, needHTTP := false, false
	for _, ch := range chains {
		needTLS = needTLS || ch.transport == transportTLS
		needHTTP = needHTTP || ch.transport == transportRaw && len(ch.alpn) > 0
	}
	self := portRange(proxyInboundListenPort)
	if needTLS {
		l.ListenerFilters = append(l.ListenerFilters, &listenerv3.ListenerFilter{
			Name: tlsInspector,
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&tlsinspectorv3.TlsInspector{
				InitialReadBufferSize: wrapperspb.UInt32(tlsInspectorReadBuffer)})},
			FilterDisabled: self,
		})
	}
	if needHTTP {
		off := []*listenerv3.ListenerFilterChainMatchPredicate{}
		if w != nil {
			for _, p := range w.Ports {
				off = append(off, portRange(p.Number))
			}
		}
		off = append(off, self)
		disabled := self // an or_match needs two rules at least
		if len(off) > 1 {
			disabled = &listenerv3.ListenerFilterChainMatchPredicate{Rule: &listenerv3.ListenerFilterChainMatchPredicate_OrMatch{
				OrMatch: &listenerv3.ListenerFilterChainMatchPredicate_MatchSet{Rules: off}}}
		}
		l.ListenerFilters = append(l.ListenerFilters, &listenerv3.ListenerFilter{
			Name:           httpInspector,
			ConfigType:     &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&httpinspectorv3.HttpInspector{})},
			FilterDisabled: disabled,
		})
	}
	if needTLS || needHTTP {
		// Istio's protocolDetectionTimeout (0s: wait for the client's
		// first bytes) and continue_on_listener_filters_timeout.
		l.ListenerFiltersTimeout = durationpb.New(0)
		l.ContinueOnListenerFiltersTimeout = true
	}
	var policies []*authzPolicy
	if w != nil {
		policies = g.reg.policiesFor(w.Namespace)
	}
	for _, ch := range chains {
		fc := &listenerv3.FilterChain{
			Name:             ch.name,
			FilterChainMatch: &listenerv3.FilterChainMatch{TransportProtocol: ch.transport, ApplicationProtocols: ch.alpn},
		}
		if ch.port != 0 {
			fc.FilterChainMatch.DestinationPort = wrapperspb.UInt32(ch.port)
		}
		if ch.http {
			fc.Filters = []*listenerv3.Filter{g.inboundHCM(ch, httpRBAC(policies))}
		} else {
			fc.Filters = append(networkRBAC(policies), g.tcpProxy(ch.cluster))
		}
		if ch.mtls != nil {
			fc.TransportSocket = downstreamTLS(ch.mtls, g.trustDomain)
		}
		l.FilterChains = append(l.FilterChains, fc)
	}
	return l
}

// portRange is a listener filter predicate matching one destination port.
func portRange(port uint32) *listenerv3.ListenerFilterChainMatchPredicate {
	return &listenerv3.ListenerFilterChainMatchPredicate{Rule: &listenerv3.ListenerFilterChainMatchPredicate_DestinationPortRange{
		DestinationPortRange: &typev3.Int32Range{Start: int32(port), End: int32(port) + 1}}}
}

// inboundHCM is Istio's inbound http_connection_manager: an inline route
// configuration sending everything to the chain's cluster (no timeout,
// retried only if reset before the request went out), the peer's
// certificate forwarded to the application in x-forwarded-client-cert
// (APPEND_FORWARD with subject, URI and DNS, as Istio).
func (g *generator) inboundHCM(ch inboundChain, authz []*hcmv3.HttpFilter) *listenerv3.Filter {
	port := ch.port
	statPrefix := "inbound_0.0.0.0_" + strconv.FormatUint(uint64(port), 10) + statDelimiter
	rcName, vhName, op := ch.cluster, "inbound|http|"+strconv.FormatUint(uint64(port), 10), ":0/*"
	if ch.host != nil {
		op = fmt.Sprintf("%s:%d/*", ch.host.Name, port)
	}
	if port == 0 {
		statPrefix = inboundPassthroughCluster + statDelimiter
	}
	hcm := &hcmv3.HttpConnectionManager{
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		StatPrefix: statPrefix,
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
			Name: rcName,
			VirtualHosts: []*routev3.VirtualHost{{
				Name:    vhName,
				Domains: []string{"*"},
				Routes: []*routev3.Route{{
					Name:  defaultRouteName,
					Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
					Action: &routev3.Route_Route{Route: &routev3.RouteAction{
						ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: ch.cluster},
						Timeout:          durationpb.New(0),
						RetryPolicy:      &routev3.RetryPolicy{RetryOn: "reset-before-request", NumRetries: wrapperspb.UInt32(2)},
						MaxStreamDuration: &routev3.RouteAction_MaxStreamDuration{
							MaxStreamDuration: durationpb.New(0), GrpcTimeoutHeaderMax: durationpb.New(0)},
					}},
					Decorator: &routev3.Decorator{Operation: op},
				}},
			}},
			ValidateClusters: wrapperspb.Bool(false),
		}},
		HttpFilters: append(authz, &hcmv3.HttpFilter{
			Name:       routerFilterName,
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})},
		}),
		AccessLog:                    g.accessLog(true),
		UseRemoteAddress:             wrapperspb.Bool(false),
		ForwardClientCertDetails:     hcmv3.HttpConnectionManager_APPEND_FORWARD,
		SetCurrentClientCertDetails:  &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Subject: wrapperspb.Bool(true), Dns: true, Uri: true},
		NormalizePath:                wrapperspb.Bool(true),
		PathWithEscapedSlashesAction: hcmv3.HttpConnectionManager_KEEP_UNCHANGED,
		StreamIdleTimeout:            durationpb.New(0),
	}
	return &listenerv3.Filter{Name: hcmName, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(hcm)}}
}
