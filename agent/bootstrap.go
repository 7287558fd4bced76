package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	grpccredv3 "github.com/envoyproxy/go-control-plane/envoy/config/grpc_credential/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/bootstrap"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/xdsclient"
)

// xdsCluster is the static cluster that holds the xDS server, as Istio
// names it.
const xdsCluster = "xds-grpc"

// nodeID is Istio's sidecar node id: sidecar~<IP>~<pod>.<ns>~<domain>.
// istiod finds the pod from it.
func (in *Inputs) nodeID() string {
	return fmt.Sprintf("sidecar~%s~%s.%s~%s", in.InstanceIPs[0], in.PodName, in.Namespace, in.Domain)
}

// serviceCluster is the node's cluster as Istio derives it: the app
// label, else the workload name, else istio-proxy, dotted with the
// namespace.
func (in *Inputs) serviceCluster() string {
	name := in.Labels["app"]
	if name == "" {
		name = in.Meta["WORKLOAD_NAME"]
	}
	if name == "" {
		name = "istio-proxy"
	}
	return name + "." + in.Namespace
}

// nodeMetadata is the node metadata: every ISTIO_META_* variable, then
// the typed fields istiod reads (pilot/pkg/model NodeMetadata), in the
// formats it parses (INSTANCE_IPS and POD_PORTS are strings).
func (in *Inputs) nodeMetadata() (*structpb.Struct, error) {
	m := map[string]any{}
	for k, v := range in.Meta {
		m[k] = v
	}
	ips := make([]string, len(in.InstanceIPs))
	for i, ip := range in.InstanceIPs {
		ips[i] = ip.String()
	}
	m["NAME"] = in.PodName
	m["NAMESPACE"] = in.Namespace
	m["INSTANCE_IPS"] = strings.Join(ips, ",")
	m["LABELS"] = anyMap(in.Labels)
	m["INTERCEPTION_MODE"] = in.InterceptionMode
	m["ISTIO_VERSION"] = in.IstioVersion
	m["CLUSTER_ID"] = in.ClusterID
	pc, err := in.ProxyConfig.metadata()
	if err != nil {
		return nil, fmt.Errorf("PROXY_CONFIG: %w", err)
	}
	m["PROXY_CONFIG"] = pc
	m["ENVOY_STATUS_PORT"] = in.ReadinessPort
	m["ENVOY_PROMETHEUS_PORT"] = 15090
	if in.ServiceAccount != "" {
		m["SERVICE_ACCOUNT"] = in.ServiceAccount
	}
	if in.PodPorts != "" {
		m["POD_PORTS"] = in.PodPorts
	}
	if len(in.Annotations) > 0 {
		m["ANNOTATIONS"] = anyMap(in.Annotations)
	}
	return structpb.NewStruct(m)
}

func anyMap(in map[string]string) map[string]any {
	out := make(map[string]any, len(in))
	for k, v := range in {
		out[k] = v
	}
	return out
}

// buildBootstrap builds the proxy's Envoy v3 bootstrap: the node, the admin on
// 127.0.0.1, and (unless NoXDS) ADS over delta gRPC to the discovery
// address through the static cluster xds-grpc, with the LDS/CDS initial
// fetch timeout of 0s Istio uses; then the extra bootstrap merged over it.
func (in *Inputs) buildBootstrap() (*bootstrapv3.Bootstrap, error) {
	meta, err := in.nodeMetadata()
	if err != nil {
		return nil, fmt.Errorf("node metadata: %w", err)
	}
	b := &bootstrapv3.Bootstrap{
		Node:            &corev3.Node{Id: in.nodeID(), Cluster: in.serviceCluster(), Metadata: meta},
		Admin:           &bootstrapv3.Admin{Address: socketAddress("127.0.0.1", in.ProxyConfig.ProxyAdminPort)},
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{},
	}
	if !in.NoXDS {
		xds, err := xdsServerCluster(in.ProxyConfig.DiscoveryAddress)
		if err != nil {
			return nil, err
		}
		if in.XDSTLS != nil {
			if err := secureXDSCluster(xds, in.XDSTLS); err != nil {
				return nil, err
			}
		}
		ads := func() *corev3.ConfigSource {
			return &corev3.ConfigSource{
				ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
				InitialFetchTimeout:   durationpb.New(0),
				ResourceApiVersion:    corev3.ApiVersion_V3,
			}
		}
		b.DynamicResources = &bootstrapv3.Bootstrap_DynamicResources{
			LdsConfig: ads(),
			CdsConfig: ads(),
			AdsConfig: &corev3.ApiConfigSource{
				ApiType:             corev3.ApiConfigSource_DELTA_GRPC,
				TransportApiVersion: corev3.ApiVersion_V3,
				GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
					EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: xdsCluster}}}},
				SetNodeOnFirstMessageOnly: true,
			},
		}
		b.StaticResources.Clusters = append(b.StaticResources.Clusters, xds)
	}
	sds := in.identity != nil && in.identity.mode != IdentityNone
	if sds {
		c, err := sdsServerCluster(in.identity.socket)
		if err != nil {
			return nil, err
		}
		b.StaticResources.Clusters = append(b.StaticResources.Clusters, c)
	}
	if in.Extra != nil {
		for _, c := range in.Extra.GetStaticResources().GetClusters() {
			if c.GetName() == xdsCluster && !in.NoXDS {
				return nil, fmt.Errorf("extra bootstrap %s: static_resources.clusters: %q is generated from the discovery address", in.ExtraPath, xdsCluster)
			}
			if c.GetName() == sdsCluster && sds {
				return nil, fmt.Errorf("extra bootstrap %s: static_resources.clusters: %q is generated from the SDS socket", in.ExtraPath, sdsCluster)
			}
		}
		proto.Merge(b, in.Extra)
	}
	return b, nil
}

func socketAddress(host string, port int) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(port)}}}}
}

// sdsCluster is the cluster istiod's TLS contexts name in their sds_config
// (api_config_source GRPC, envoy_grpc.cluster_name "sds-grpc").
const sdsCluster = "sds-grpc"

// sdsServerCluster is Istio's sds-grpc cluster: HTTP/2 to the agent's SDS
// socket (a pipe), so the proxy, or a real Envoy run on this bootstrap,
// fetches `default` and `ROOTCA` from the agent when its configuration
// names them.
func sdsServerCluster(socket string) (*clusterv3.Cluster, error) {
	h2, err := anypb.New(&httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}}}}})
	if err != nil {
		return nil, err
	}
	return &clusterv3.Cluster{
		Name:                 sdsCluster,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(1e9),
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		LoadAssignment: &endpointv3.ClusterLoadAssignment{
			ClusterName: sdsCluster,
			Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{
					Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: socket}}}}}}}}},
		},
		TypedExtensionProtocolOptions: map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2},
	}, nil
}

// xdsServerCluster is Istio's xds-grpc cluster: HTTP/2, breakers out of
// the way, TCP keepalive 300 s; STATIC for an IP, STRICT_DNS for a name.
func xdsServerCluster(addr string) (*clusterv3.Cluster, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("discovery address %q: %w", addr, err)
	}
	port, _ := strconv.Atoi(portStr)
	typ := clusterv3.Cluster_STRICT_DNS
	if _, err := netip.ParseAddr(host); err == nil {
		typ = clusterv3.Cluster_STATIC
	}
	h2, err := anypb.New(&httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}}}}})
	if err != nil {
		return nil, err
	}
	limit := func(p corev3.RoutingPriority) *clusterv3.CircuitBreakers_Thresholds {
		return &clusterv3.CircuitBreakers_Thresholds{Priority: p, MaxConnections: wrapperspb.UInt32(100000),
			MaxPendingRequests: wrapperspb.UInt32(100000), MaxRequests: wrapperspb.UInt32(100000)}
	}
	return &clusterv3.Cluster{
		Name:                 xdsCluster,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		ConnectTimeout:       durationpb.New(1e9),
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		LoadAssignment: &endpointv3.ClusterLoadAssignment{
			ClusterName: xdsCluster,
			Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress(host, port)}}}}}},
		},
		CircuitBreakers: &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{
			limit(corev3.RoutingPriority_DEFAULT), limit(corev3.RoutingPriority_HIGH)}},
		UpstreamConnectionOptions: &clusterv3.UpstreamConnectionOptions{
			TcpKeepalive: &corev3.TcpKeepalive{KeepaliveTime: wrapperspb.UInt32(300)}},
		TypedExtensionProtocolOptions: map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2},
	}, nil
}

// secureXDSCluster makes c speak istiod's TLS port: an UpstreamTlsContext
// trusting the root file (by name, so a rotated istio-ca-root-cert is read
// on the next connection) with the SNI istiod's certificate carries, and
// the bearer token as Envoy's file-based call credentials in the
// cluster's metadata (see xdsclient.FileMetadataKey), re-read per stream.
//
// Istio's own bootstrap points xds-grpc at pilot-agent's XDS proxy on the
// UDS ./etc/istio/proxy/XDS, and the agent adds TLS and token upstream.
// meshtun's proxy instead talks to istiod directly: one hop less, no
// second copy of every xDS message in the agent, and the proxy's own xDS
// client already reconnects with backoff; the agent then needs no
// long-lived state about the proxy's xDS stream.
func secureXDSCluster(c *clusterv3.Cluster, t *XDSTLS) error {
	utc, err := anypb.New(&tlsv3.UpstreamTlsContext{
		Sni: t.ServerName,
		CommonTlsContext: &tlsv3.CommonTlsContext{
			AlpnProtocols: []string{"h2"},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: t.RootFile}}}},
		},
	})
	if err != nil {
		return err
	}
	tok, err := anypb.New(&grpccredv3.FileBasedMetadataConfig{
		SecretData:   &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: t.TokenFile}},
		HeaderKey:    "authorization",
		HeaderPrefix: "Bearer ",
	})
	if err != nil {
		return err
	}
	c.TransportSocket = &corev3.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: utc}}
	c.Metadata = &corev3.Metadata{TypedFilterMetadata: map[string]*anypb.Any{xdsclient.FileMetadataKey: tok}}
	return nil
}

// marshal renders b as the proxy reads it: JSON with Envoy's snake_case
// field names, indented, byte-for-byte stable (protojson's own output
// varies its whitespace on purpose; it is normalized here), so the file
// can be diffed and a golden file compared.
func marshal(b *bootstrapv3.Bootstrap) ([]byte, error) {
	js, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(b)
	if err != nil {
		return nil, err
	}
	var compact, out bytes.Buffer
	if err := json.Compact(&compact, js); err != nil {
		return nil, err
	}
	if err := json.Indent(&out, compact.Bytes(), "", "  "); err != nil {
		return nil, err
	}
	out.WriteByte('\n')
	return out.Bytes(), nil
}

// validate reads the rendered bootstrap back through the proxy's own
// readers — mesh/bootstrap.Parse, xdsclient.FromBootstrap, mesh.Build —
// so a bootstrap the agent writes is one the proxy accepts. name is used
// in errors.
func validate(js []byte, name string) (*bootstrapv3.Bootstrap, error) {
	b, err := bootstrap.Parse(js, name, false)
	if err != nil {
		return nil, err
	}
	if b.GetDynamicResources().GetAdsConfig() != nil {
		if _, err := xdsclient.FromBootstrap(b); err != nil {
			return nil, fmt.Errorf("bootstrap %s: %w", name, err)
		}
	}
	sr := b.GetStaticResources()
	snap, err := mesh.Build("validate", sr.GetListeners(), sr.GetClusters(), nil, mesh.BuildOptions{
		Roles:   mesh.IstioRoles,
		Cluster: cluster.Options{Dialer: &upstream.Dialer{}, Log: zerolog.Nop(), Resolver: noResolver{}},
	})
	if err != nil {
		return nil, fmt.Errorf("bootstrap %s: %w", name, err)
	}
	snap.Retire(nil)
	return b, nil
}

// noResolver keeps validation off the network: STRICT_DNS clusters are
// checked, not resolved.
type noResolver struct{}

func (noResolver) LookupNetIP(context.Context, string, string) ([]netip.Addr, error) {
	return nil, errors.New("not resolved while validating")
}

// render builds, renders and validates the bootstrap.
func (in *Inputs) render() ([]byte, *bootstrapv3.Bootstrap, error) {
	b, err := in.buildBootstrap()
	if err != nil {
		return nil, nil, err
	}
	js, err := marshal(b)
	if err != nil {
		return nil, nil, fmt.Errorf("rendering the bootstrap: %w", err)
	}
	pb, err := validate(js, "generated")
	if err != nil {
		return nil, nil, err
	}
	return js, pb, nil
}

// writeFile replaces path with data atomically (a temporary file in the
// same directory, renamed), so the proxy never reads half a bootstrap.
// The file is readable by everyone: it holds no secret.
func writeFile(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("bootstrap output: %w", err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("bootstrap output: %w", err)
	}
	tmp := f.Name()
	_, werr := f.Write(data)
	cerr := f.Close()
	if err := errors.Join(werr, cerr, os.Chmod(tmp, 0o644)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("bootstrap output: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("bootstrap output: %w", err)
	}
	return nil
}

// AdminAddress is where the bootstrap puts the proxy's admin API:
// host:port, or unix:/path for a pipe (the form `meshtun request` takes).
func AdminAddress(b *bootstrapv3.Bootstrap) string {
	a := b.GetAdmin().GetAddress()
	if p := a.GetPipe(); p != nil {
		return "unix:" + p.GetPath()
	}
	if sa := a.GetSocketAddress(); sa != nil {
		return net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue())))
	}
	return "127.0.0.1:15000"
}

// hasADS reports whether the bootstrap configures the proxy over xDS.
func hasADS(b *bootstrapv3.Bootstrap) bool {
	return b.GetDynamicResources().GetAdsConfig() != nil
}
