package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshtun/meshtun/controlplane/ca"
)

// fixtureDir is Istio's real output for the pod app-abc (PERMISSIVE, auto
// mTLS), whose services testdata/registry-istio.yaml describes.
const fixtureDir = "../../shared/istio/permissive-allow-any"

// fixture reads one type's DiscoveryResponse of the fixture into msgs,
// by name.
func fixture[T proto.Message](t *testing.T, file string, mk func() T, name func(T) string) map[string]T {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(fixtureDir, file))
	if err != nil {
		t.Fatalf("Istio's fixture: %v", err)
	}
	var resp discoveryv3.DiscoveryResponse
	if err := proto.Unmarshal(data, &resp); err != nil {
		t.Fatal(err)
	}
	out := map[string]T{}
	for _, a := range resp.GetResources() {
		m := mk()
		if err := a.UnmarshalTo(m); err != nil {
			t.Fatal(err)
		}
		out[name(m)] = m
	}
	return out
}

// meshed is a node with a workload identity (it came over the TLS port).
func meshed(t testing.TB, id, instanceIPs string) nodeInfo {
	n := node(t, id, instanceIPs)
	n.Identity = true
	return n
}

func findCluster(r *resources, name string) *clusterv3.Cluster {
	for _, c := range r.Clusters {
		if c.GetName() == name {
			return c
		}
	}
	return nil
}

// chainKey identifies a filter chain by what selects it.
func chainKey(fc *listenerv3.FilterChain) string {
	m := fc.GetFilterChainMatch()
	return fmt.Sprintf("%s port=%d %s %v", fc.GetName(), m.GetDestinationPort().GetValue(), m.GetTransportProtocol(), m.GetApplicationProtocols())
}

// TestIstioFixtureMTLSShapes: for the fixture's pod (a node with an
// identity that is the workload app-abc) under the default profile, the
// generated TLS shapes are istiod's, field by field: every service
// cluster's transport_socket_matches, every endpoint's metadata, and
// virtualInbound's tls_inspector and http_inspector, and each filter
// chain's match, transport socket, kind of filter and cluster; the
// inbound cluster is bound to 127.0.0.6 as istiod's.
func TestIstioFixtureMTLSShapes(t *testing.T) {
	reg := mustRegistry(t, "testdata/registry-istio.yaml")
	r := generate(reg, &defaultMeshPtr().Spec, meshed(t, "sidecar~10.244.0.5~app-abc.default~default.svc.cluster.local", ""))

	clusters := fixture(t, "clusters.pb", func() *clusterv3.Cluster { return &clusterv3.Cluster{} }, (*clusterv3.Cluster).GetName)
	for _, name := range []string{"outbound|80||httpbin.default.svc.cluster.local", "outbound|5432||postgres.default.svc.cluster.local",
		"outbound|8080||app.default.svc.cluster.local"} {
		got, want := findCluster(r, name), clusters[name]
		if got == nil || want == nil {
			t.Fatalf("%s: generated %v, in the fixture %v", name, got != nil, want != nil)
		}
		if len(want.GetTransportSocketMatches()) != 2 || len(got.GetTransportSocketMatches()) != 2 {
			t.Fatalf("%s: %d matches generated, %d in the fixture", name, len(got.GetTransportSocketMatches()), len(want.GetTransportSocketMatches()))
		}
		for i, wm := range want.GetTransportSocketMatches() {
			gm := got.GetTransportSocketMatches()[i]
			if !proto.Equal(gm, wm) {
				t.Errorf("%s: transport_socket_matches[%d] (%s) differs from istiod's:\n got %v\nwant %v", name, i, wm.GetName(), gm, wm)
			}
		}
	}
	if c := findCluster(r, "outbound|8080||app.default.svc.cluster.local"); !proto.Equal(c.GetEdsClusterConfig(), clusters["outbound|8080||app.default.svc.cluster.local"].GetEdsClusterConfig()) {
		t.Errorf("eds_cluster_config differs: %v", c.GetEdsClusterConfig())
	}

	eds := fixture(t, "endpoints.pb", func() *endpointv3.ClusterLoadAssignment { return &endpointv3.ClusterLoadAssignment{} },
		(*endpointv3.ClusterLoadAssignment).GetClusterName)
	metaOf := func(cla *endpointv3.ClusterLoadAssignment) map[string]*corev3.Metadata {
		out := map[string]*corev3.Metadata{}
		for _, l := range cla.GetEndpoints() {
			for _, e := range l.GetLbEndpoints() {
				out[e.GetEndpoint().GetAddress().GetSocketAddress().GetAddress()] = e.GetMetadata()
			}
		}
		return out
	}
	checked := 0
	for _, cla := range r.Endpoints {
		want := metaOf(eds[cla.GetClusterName()])
		for addr, got := range metaOf(cla) {
			if !proto.Equal(got, want[addr]) {
				t.Errorf("%s %s: metadata %v, istiod's %v", cla.GetClusterName(), addr, got, want[addr])
			}
			checked++
		}
	}
	if checked != 4 {
		t.Errorf("%d endpoints compared, want 4", checked)
	}

	listeners := fixture(t, "listeners.pb", func() *listenerv3.Listener { return &listenerv3.Listener{} }, (*listenerv3.Listener).GetName)
	want, got := listeners[virtualInbound], findListener(r, virtualInbound)
	if len(got.GetListenerFilters()) != 3 {
		t.Fatalf("virtualInbound listener filters: %v", got.GetListenerFilters())
	}
	for i := 1; i < 3; i++ { // tls_inspector, http_inspector
		if !proto.Equal(got.GetListenerFilters()[i], want.GetListenerFilters()[i]) {
			t.Errorf("listener_filters[%d]:\n got %v\nwant %v", i, got.GetListenerFilters()[i], want.GetListenerFilters()[i])
		}
	}
	if !proto.Equal(got.GetListenerFiltersTimeout(), want.GetListenerFiltersTimeout()) || got.GetContinueOnListenerFiltersTimeout() != want.GetContinueOnListenerFiltersTimeout() {
		t.Errorf("listener filters timeout %v/%v, istiod's %v/%v", got.GetListenerFiltersTimeout(), got.GetContinueOnListenerFiltersTimeout(),
			want.GetListenerFiltersTimeout(), want.GetContinueOnListenerFiltersTimeout())
	}
	wantChains := map[string]*listenerv3.FilterChain{}
	for _, fc := range want.GetFilterChains() {
		wantChains[chainKey(fc)] = fc
	}
	if len(got.GetFilterChains()) != len(wantChains) {
		t.Errorf("%d chains, istiod has %d", len(got.GetFilterChains()), len(wantChains))
	}
	for _, fc := range got.GetFilterChains() {
		k := chainKey(fc)
		w := wantChains[k]
		if w == nil {
			t.Errorf("chain %s: istiod has no such chain", k)
			continue
		}
		if !proto.Equal(fc.GetFilterChainMatch(), w.GetFilterChainMatch()) {
			t.Errorf("chain %s: match %v, istiod's %v", k, fc.GetFilterChainMatch(), w.GetFilterChainMatch())
		}
		if !proto.Equal(fc.GetTransportSocket(), w.GetTransportSocket()) {
			t.Errorf("chain %s: transport socket\n got %v\nwant %v", k, fc.GetTransportSocket(), w.GetTransportSocket())
		}
		gf, wf := fc.GetFilters()[len(fc.GetFilters())-1], w.GetFilters()[len(w.GetFilters())-1]
		if gf.GetName() != wf.GetName() {
			t.Errorf("chain %s: filter %s, istiod's %s", k, gf.GetName(), wf.GetName())
			continue
		}
		if gf.GetName() == hcmName {
			g, w := hcmAny(t, gf.GetTypedConfig()), hcmAny(t, wf.GetTypedConfig())
			if g.GetStatPrefix() != w.GetStatPrefix() || g.GetForwardClientCertDetails() != w.GetForwardClientCertDetails() ||
				!proto.Equal(g.GetSetCurrentClientCertDetails(), w.GetSetCurrentClientCertDetails()) {
				t.Errorf("chain %s: connection manager %s/%v/%v, istiod's %s/%v/%v", k, g.GetStatPrefix(), g.GetForwardClientCertDetails(),
					g.GetSetCurrentClientCertDetails(), w.GetStatPrefix(), w.GetForwardClientCertDetails(), w.GetSetCurrentClientCertDetails())
			}
			if !proto.Equal(g.GetRouteConfig(), w.GetRouteConfig()) {
				t.Errorf("chain %s: route configuration\n got %v\nwant %v", k, g.GetRouteConfig(), w.GetRouteConfig())
			}
		} else if tcpCluster(t, fc) != tcpCluster(t, w) {
			t.Errorf("chain %s: to %s, istiod's to %s", k, tcpCluster(t, fc), tcpCluster(t, w))
		}
	}

	in, win := findCluster(r, "inbound|8080||"), clusters["inbound|8080||"]
	if in == nil || in.GetType() != win.GetType() || in.GetLbPolicy() != win.GetLbPolicy() || in.GetAltStatName() != win.GetAltStatName() ||
		!proto.Equal(in.GetUpstreamBindConfig(), win.GetUpstreamBindConfig()) {
		t.Errorf("inbound|8080||: %v\nistiod's %v", in, win)
	}
}

func hcmAny(t *testing.T, a *anypb.Any) *hcmv3.HttpConnectionManager {
	t.Helper()
	var h hcmv3.HttpConnectionManager
	if err := a.UnmarshalTo(&h); err != nil {
		t.Fatal(err)
	}
	return &h
}

// chainsOf lists virtualInbound's chains: name, port, transport, ALPNs
// matched, then "mTLS[<ALPNs selectable>]" or "-", and the filter.
func chainsOf(t *testing.T, l *listenerv3.Listener) []string {
	t.Helper()
	var out []string
	for _, fc := range l.GetFilterChains() {
		term := "-"
		if ts := fc.GetTransportSocket(); ts != nil {
			var d tlsv3.DownstreamTlsContext
			if err := ts.GetTypedConfig().UnmarshalTo(&d); err != nil {
				t.Fatal(err)
			}
			sans := d.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchSubjectAltNames() //nolint:staticcheck // Istio's shape
			if !d.GetRequireClientCertificate().GetValue() || len(sans) != 1 || sans[0].GetPrefix() != "spiffe://cluster.local/" ||
				d.GetCommonTlsContext().GetTlsCertificateSdsSecretConfigs()[0].GetName() != "default" {
				t.Errorf("chain %s: not Istio's inbound mTLS context: %v", chainKey(fc), &d)
			}
			term = fmt.Sprintf("mTLS%v", d.GetCommonTlsContext().GetAlpnProtocols())
		}
		filter := "tcp→" + tcpClusterOrHCM(t, fc)
		out = append(out, fmt.Sprintf("%s %s %s", chainKey(fc), term, filter))
	}
	return out
}

func tcpClusterOrHCM(t *testing.T, fc *listenerv3.FilterChain) string {
	f := fc.GetFilters()[len(fc.GetFilters())-1]
	if f.GetName() == hcmName {
		return "hcm " + hcmAny(t, f.GetTypedConfig()).GetRouteConfig().GetName()
	}
	return tcpCluster(t, fc)
}

func listenerFilterNames(l *listenerv3.Listener) string {
	var out []string
	for _, f := range l.GetListenerFilters() {
		out = append(out, f.GetName())
	}
	return strings.Join(out, ",")
}

// TestInboundChainsPerMode: virtualInbound of a workload with an HTTP and
// a TCP port has the chains of MTLS.md §5 for each mode: PERMISSIVE mTLS
// chains (HTTP ALPNs to the connection manager, istio ALPNs to
// tcp_proxy), plaintext chains and the TLS passthrough chain; STRICT only
// the mTLS ones; DISABLE only plaintext ones, without tls_inspector. A
// workload's own mode overrides the profile's; a node with an identity
// that is no workload gets only the catch-all; a node without identity
// keeps the plaintext catch-all it always had.
func TestInboundChainsPerMode(t *testing.T) {
	const doc = `services:
- name: shop
  vip: 10.96.1.1
  ports: [{name: http, port: 80, targetPort: 8080, protocol: HTTP}, {name: db, port: 5432, protocol: TCP}]
  endpoints: [{address: 10.0.0.7, sidecar: true, serviceAccount: shop%s}]
`
	const id = "sidecar~10.0.0.7~shop-1.default~default.svc.cluster.local"
	const (
		bh       = "virtualInbound-blackhole port=15006  [] - tcp→BlackHoleCluster"
		tcpMTLS  = "mTLS[istio-peer-exchange h2 http/1.1]"
		httpMTLS = "mTLS[h2 http/1.1]"
	)
	permissive := []string{bh,
		"0.0.0.0_5432 port=5432 tls [istio istio-peer-exchange istio-http/1.0 istio-http/1.1 istio-h2] " + tcpMTLS + " tcp→inbound|5432||",
		"0.0.0.0_5432 port=5432 tls [] - tcp→inbound|5432||",
		"0.0.0.0_5432 port=5432 raw_buffer [] - tcp→inbound|5432||",
		"0.0.0.0_8080 port=8080 tls [istio istio-peer-exchange istio-http/1.0 istio-http/1.1 istio-h2] " + httpMTLS + " tcp→hcm inbound|8080||",
		"0.0.0.0_8080 port=8080 raw_buffer [] - tcp→hcm inbound|8080||",
		"virtualInbound-catchall-http port=0 tls [istio-http/1.0 istio-http/1.1 istio-h2] " + httpMTLS + " tcp→hcm InboundPassthroughCluster",
		"virtualInbound-catchall-http port=0 raw_buffer [http/1.1 h2c] - tcp→hcm InboundPassthroughCluster",
		"virtualInbound port=0 tls [istio-peer-exchange istio] " + tcpMTLS + " tcp→InboundPassthroughCluster",
		"virtualInbound port=0 raw_buffer [] - tcp→InboundPassthroughCluster",
		"virtualInbound port=0 tls [] - tcp→InboundPassthroughCluster",
	}
	strict := []string{bh,
		"0.0.0.0_5432 port=5432 tls [] " + tcpMTLS + " tcp→inbound|5432||",
		"0.0.0.0_8080 port=8080 tls [] " + httpMTLS + " tcp→hcm inbound|8080||",
		"virtualInbound-catchall-http port=0 tls [istio-http/1.0 istio-http/1.1 istio-h2] " + httpMTLS + " tcp→hcm InboundPassthroughCluster",
		"virtualInbound port=0 tls [] " + tcpMTLS + " tcp→InboundPassthroughCluster",
	}
	disable := []string{bh,
		"0.0.0.0_5432 port=5432 raw_buffer [] - tcp→inbound|5432||",
		"0.0.0.0_8080 port=8080 raw_buffer [] - tcp→hcm inbound|8080||",
		"virtualInbound port=0 raw_buffer [] - tcp→InboundPassthroughCluster",
	}
	const all = "envoy.filters.listener.original_dst,envoy.filters.listener.tls_inspector,envoy.filters.listener.http_inspector"
	const tlsOnly = "envoy.filters.listener.original_dst,envoy.filters.listener.tls_inspector"
	const none = "envoy.filters.listener.original_dst"
	for _, tc := range []struct {
		name, mesh, workload string
		node                 nodeInfo
		chains               []string
		filters              string
	}{
		{"mesh PERMISSIVE", "PERMISSIVE", "", meshed(t, id, ""), permissive, all},
		{"mesh STRICT", "STRICT", "", meshed(t, id, ""), strict, tlsOnly},
		{"mesh DISABLE", "DISABLE", "", meshed(t, id, ""), disable, none},
		{"workload STRICT over mesh PERMISSIVE", "PERMISSIVE", "STRICT", meshed(t, id, ""), strict, tlsOnly},
		{"workload PERMISSIVE over mesh DISABLE", "DISABLE", "PERMISSIVE", meshed(t, id, ""), permissive, all},
		{"identity, no workload", "STRICT", "", meshed(t, "sidecar~10.0.0.99~other.default~default.svc.cluster.local", ""), []string{bh,
			"virtualInbound-catchall-http port=0 tls [istio-http/1.0 istio-http/1.1 istio-h2] " + httpMTLS + " tcp→hcm InboundPassthroughCluster",
			"virtualInbound port=0 tls [] " + tcpMTLS + " tcp→InboundPassthroughCluster"}, tlsOnly},
		{"no identity", "STRICT", "", node(t, id, ""), []string{bh, "virtualInbound-catchall-tcp port=0  [] - tcp→InboundPassthroughCluster"}, none},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wl := ""
			if tc.workload != "" {
				wl = ", peerAuthentication: " + tc.workload
			}
			reg, err := parseRegistry("r.yaml", []byte(fmt.Sprintf(doc, wl)))
			if err != nil {
				t.Fatal(err)
			}
			p := mustProfile(t, "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec:\n  peerAuthentication: "+tc.mesh+"\n")
			r := generate(reg, &p.Spec, tc.node)
			l := findListener(r, virtualInbound)
			got := chainsOf(t, l)
			if strings.Join(got, "\n") != strings.Join(tc.chains, "\n") {
				t.Errorf("chains:\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(tc.chains, "\n  "))
			}
			if f := listenerFilterNames(l); f != tc.filters {
				t.Errorf("listener filters %s, want %s", f, tc.filters)
			}
			for _, port := range []uint32{8080, 5432} {
				c := findCluster(r, inboundClusterName(port))
				if (c != nil) != (tc.node.Identity && tc.node.IPs[0].String() == "10.0.0.7") {
					t.Errorf("cluster %s present: %v", inboundClusterName(port), c != nil)
				}
			}
		})
	}
}

// TestAutoMTLSClusters: with auto mTLS a node with an identity gets the
// two transport_socket_matches on every service port's cluster (SANs: the
// distinct SPIFFE IDs of the service's accounts, in the CA's trust
// domain; SNI outbound_.<port>_._.<host>), none on external hosts'; a node
// without identity, or enableAutoMtls false, gets none. Endpoints carry
// tlsMode istio when they have a sidecar and their mode is not DISABLE.
func TestAutoMTLSClusters(t *testing.T) {
	const doc = `services:
- name: api
  namespace: shop
  vip: 10.96.1.1
  ports: [{name: grpc, port: 9000, protocol: TCP}]
  endpoints:
  - {address: 10.0.0.1, sidecar: true, serviceAccount: api}
  - {address: 10.0.0.2, sidecar: true, serviceAccount: api-canary}
  - {address: 10.0.0.3, sidecar: true, serviceAccount: api, peerAuthentication: DISABLE}
  - {address: 10.0.0.4}
- name: dns
  namespace: shop
  vip: 10.96.1.2
  ports: [{name: dns, port: 53, protocol: UDP}]
  endpoints: [{address: 10.0.0.5, sidecar: true}]
externalHosts:
- hosts: [db.example.com]
  addresses: [240.0.0.1]
  ports: [{name: pg, port: 5432, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.1}]
`
	reg, err := parseRegistry("r.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	const svc = "outbound|9000||api.shop.svc.cluster.local"
	def := defaultMeshPtr()
	g := newGenerator(reg, &def.Spec, "example.org")
	r := g.forClass(meshed(t, "sidecar~10.9.0.1~c.shop~shop.svc.cluster.local", "").class(reg))
	m := findCluster(r, svc).GetTransportSocketMatches()
	if len(m) != 2 || m[0].GetName() != "tlsMode-istio" || m[1].GetName() != "tlsMode-disabled" ||
		m[0].GetMatch().GetFields()["tlsMode"].GetStringValue() != "istio" || len(m[1].GetMatch().GetFields()) != 0 ||
		m[1].GetTransportSocket().GetName() != "envoy.transport_sockets.raw_buffer" {
		t.Fatalf("matches: %v", m)
	}
	var utc tlsv3.UpstreamTlsContext
	if err := m[0].GetTransportSocket().GetTypedConfig().UnmarshalTo(&utc); err != nil {
		t.Fatal(err)
	}
	var sans []string
	for _, s := range utc.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchSubjectAltNames() { //nolint:staticcheck // Istio's shape
		sans = append(sans, s.GetExact())
	}
	if got := strings.Join(sans, " "); got != "spiffe://example.org/ns/shop/sa/api spiffe://example.org/ns/shop/sa/api-canary spiffe://example.org/ns/shop/sa/default" {
		t.Errorf("SANs %s", got)
	}
	if utc.GetSni() != "outbound_.9000_._.api.shop.svc.cluster.local" {
		t.Errorf("sni %s", utc.GetSni())
	}
	cc := utc.GetCommonTlsContext()
	if strings.Join(cc.GetAlpnProtocols(), ",") != "istio-peer-exchange,istio" || cc.GetTlsParams().GetTlsMinimumProtocolVersion() != tlsv3.TlsParameters_TLSv1_2 ||
		cc.GetTlsParams().GetTlsMaximumProtocolVersion() != tlsv3.TlsParameters_TLSv1_3 {
		t.Errorf("common context %v", cc)
	}
	for _, sc := range []*tlsv3.SdsSecretConfig{cc.GetTlsCertificateSdsSecretConfigs()[0], cc.GetCombinedValidationContext().GetValidationContextSdsSecretConfig()} {
		src := sc.GetSdsConfig()
		if src.GetApiConfigSource().GetGrpcServices()[0].GetEnvoyGrpc().GetClusterName() != "sds-grpc" || src.GetInitialFetchTimeout().AsDuration() != 0 ||
			src.GetInitialFetchTimeout() == nil || src.GetApiConfigSource().GetApiType() != corev3.ApiConfigSource_GRPC {
			t.Errorf("secret %s: sds_config %v", sc.GetName(), src)
		}
	}
	if cc.GetTlsCertificateSdsSecretConfigs()[0].GetName() != "default" || cc.GetCombinedValidationContext().GetValidationContextSdsSecretConfig().GetName() != "ROOTCA" {
		t.Errorf("secrets %v", cc)
	}
	if ext := findCluster(r, "outbound|5432||db.example.com"); ext == nil || ext.GetTransportSocketMatches() != nil {
		t.Errorf("external host: %v", ext)
	}
	if udp := findCluster(r, "outbound|53||dns.shop.svc.cluster.local"); udp == nil || udp.GetTransportSocketMatches() != nil {
		t.Errorf("UDP service: %v", udp)
	}
	for _, e := range r.Endpoints {
		for _, l := range e.GetEndpoints() {
			for _, lb := range l.GetLbEndpoints() {
				addr := lb.GetEndpoint().GetAddress().GetSocketAddress().GetAddress()
				tm := lb.GetMetadata().GetFilterMetadata()["envoy.transport_socket_match"].GetFields()["tlsMode"].GetStringValue()
				want := map[string]string{"10.0.0.1": "istio", "10.0.0.2": "istio", "10.0.0.5": "istio"}[addr]
				if tm != want {
					t.Errorf("%s: tlsMode %q, want %q", addr, tm, want)
				}
				if e.GetClusterName() == svc && lb.GetMetadata().GetFilterMetadata()["istio"].GetFields()["workload"].GetStringValue() != "api;shop;api;;Kubernetes" {
					t.Errorf("%s: istio metadata %v", addr, lb.GetMetadata())
				}
				if e.GetClusterName() == "outbound|5432||db.example.com" && lb.GetMetadata() != nil {
					t.Errorf("external endpoint %s has metadata %v", addr, lb.GetMetadata())
				}
			}
		}
	}
	// Mesh-wide DISABLE: no endpoint advertises mTLS.
	dis := mustProfile(t, "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec:\n  peerAuthentication: DISABLE\n")
	for _, e := range generate(reg, &dis.Spec, node(t, "sidecar~10.9.0.1~c.shop~shop.svc.cluster.local", "")).Endpoints {
		for _, l := range e.GetEndpoints() {
			for _, lb := range l.GetLbEndpoints() {
				if _, ok := lb.GetMetadata().GetFilterMetadata()["envoy.transport_socket_match"]; ok {
					t.Errorf("DISABLE: %v still has tlsMode", lb.GetEndpoint().GetAddress())
				}
			}
		}
	}
	for name, r := range map[string]*resources{
		"no identity":          generate(reg, &def.Spec, node(t, "sidecar~10.9.0.1~c.shop~shop.svc.cluster.local", "")),
		"enableAutoMtls false": generate(reg, &mustProfile(t, "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec:\n  enableAutoMtls: false\n").Spec, meshed(t, "sidecar~10.9.0.1~c.shop~shop.svc.cluster.local", "")),
	} {
		if m := findCluster(r, svc).GetTransportSocketMatches(); m != nil {
			t.Errorf("%s: matches %v", name, m)
		}
	}
	// The shared clusters are not changed by the copy with matches.
	if m := g.clusters[0].GetTransportSocketMatches(); m != nil {
		t.Errorf("the generator's own cluster got matches")
	}
}

// TestRegistryWorkloadErrors: a workload's fields are validated, and the
// entries of one IP must agree on its identity; errors name the entry and
// the field.
func TestRegistryWorkloadErrors(t *testing.T) {
	const head = "services:\n- name: a\n  vip: 10.96.0.1\n  ports: [{port: 80, protocol: TCP}]\n  endpoints: [{address: 10.0.0.1%s}]\n"
	const second = "- name: b\n  vip: 10.96.0.2\n  ports: [{port: 81, protocol: TCP}]\n  endpoints: [{address: 10.0.0.1%s}]\n"
	for _, tc := range []struct{ doc, want string }{
		{fmt.Sprintf(head, ", peerAuthentication: strict"), `services[0] (a.default): endpoints[0].peerAuthentication: "strict" is not valid; valid choices: PERMISSIVE, STRICT, DISABLE`},
		{fmt.Sprintf(head, ", serviceAccount: Bad_SA"), `services[0] (a.default): endpoints[0].serviceAccount: "Bad_SA" is not a Kubernetes name`},
		{fmt.Sprintf(head, ", name: -x"), `services[0] (a.default): endpoints[0].name: "-x" is not a Kubernetes name`},
		{fmt.Sprintf(head, ", sidecar: maybe"), `endpoints[0].sidecar`},
		{fmt.Sprintf(head, ", sidecar: true") + fmt.Sprintf(second, ""),
			`services[1] (b.default): endpoints[0] (10.0.0.1): sidecar: false, but the same workload is true as services[0] (a.default): endpoints[0] (10.0.0.1)`},
		{fmt.Sprintf(head, ", serviceAccount: sa-x") + fmt.Sprintf(second, ", serviceAccount: sa-y"),
			`services[1] (b.default): endpoints[0] (10.0.0.1): serviceAccount: sa-y, but the same workload is sa-x as services[0]`},
		{fmt.Sprintf(head, ", peerAuthentication: STRICT") + fmt.Sprintf(second, ""),
			`services[1] (b.default): endpoints[0] (10.0.0.1): peerAuthentication: unset (the profile's), but the same workload is STRICT`},
		{fmt.Sprintf(head, "") + strings.Replace(fmt.Sprintf(second, ""), "vip: 10.96.0.2", "namespace: other\n  vip: 10.96.0.2", 1),
			`services[1] (b.other): endpoints[0] (10.0.0.1): namespace: other, but the same workload is default`},
		{"externalHosts:\n- hosts: [x.example.com]\n  ports: [{port: 80, protocol: TCP}]\n  resolution: STATIC\n  endpoints: [{address: 192.0.2.1, sidecar: true}]\n",
			`externalHosts[0] (x.example.com): endpoints[0]: name, sidecar, serviceAccount and peerAuthentication describe a workload of the mesh`},
	} {
		_, err := parseRegistry("r.yaml", []byte(tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s\nerror %v\nwant %s", tc.doc, err, tc.want)
		}
	}
	// Agreeing entries make one workload with both services' ports.
	reg, err := parseRegistry("r.yaml", []byte(fmt.Sprintf(head, ", sidecar: true, serviceAccount: x")+fmt.Sprintf(second, ", sidecar: true, serviceAccount: x")))
	if err != nil {
		t.Fatal(err)
	}
	if w := reg.workloadOf(node(t, "sidecar~10.0.0.2~p.default~default.svc.cluster.local", "").IPs); w != nil {
		t.Fatalf("10.0.0.2 is no workload: %+v", w)
	}
	w := reg.workloadOf(node(t, "sidecar~10.0.0.1~p.default~default.svc.cluster.local", "").IPs)
	if w == nil || len(w.Ports) != 2 || w.Ports[0].Number != 80 || w.Ports[1].Number != 81 || w.ServiceAccount != "x" || !w.Sidecar {
		t.Errorf("workload %+v", w)
	}
}

// TestIdentityNodeGetsMTLSAndProfileFlip: over the real TLS port, a node
// with a token gets virtualInbound's PERMISSIVE mTLS chains and a node on
// the plaintext port the plaintext catch-all; a profile flip to STRICT
// reaches the first node in the next push with only mTLS chains.
func TestIdentityNodeGetsMTLSAndProfileFlip(t *testing.T) {
	state := t.TempDir()
	sec, err := newSecure(Options{StateDir: state, TrustDomain: "cluster.local", SecureAddress: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	reg, err := parseRegistry("r.yaml", []byte("services:\n- name: shop\n  vip: 10.96.1.1\n  ports: [{name: http, port: 80, protocol: HTTP}]\n  endpoints: [{address: 10.0.0.7, sidecar: true, serviceAccount: shop}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(reg, defaultMeshPtr(), zerolog.Nop())
	plain, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	secLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.serve(ctx, plain, grpcPort{lis: secLis, opts: sec.opts, register: sec.ca.Register})
	}()
	defer func() { cancel(); <-done }()

	rootPEM, err := os.ReadFile(sec.roots)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(rootPEM)
	secConn, err := grpc.NewClient(secLis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: ca.DNSNames[0]})))
	if err != nil {
		t.Fatal(err)
	}
	defer secConn.Close()
	plainConn, err := grpc.NewClient(plain.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer plainConn.Close()
	tok, err := sec.ca.Tokens.Mint(ca.Identity{Namespace: "default", ServiceAccount: "shop"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}

	// listeners opens a SotW listener stream and returns a function that
	// receives the next virtualInbound (ACKing the previous response).
	listeners := func(conn *grpc.ClientConn, token, id string) func() *listenerv3.Listener {
		sctx := ctx
		if token != "" {
			sctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
		}
		st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(sctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.ListenerType, Node: &corev3.Node{Id: id}}); err != nil {
			t.Fatal(err)
		}
		return func() *listenerv3.Listener {
			resp, err := st.Recv()
			if err != nil {
				t.Fatal(err)
			}
			st.Send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.ListenerType, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
			for _, a := range resp.GetResources() {
				var l listenerv3.Listener
				if err := a.UnmarshalTo(&l); err != nil {
					t.Fatal(err)
				}
				if l.GetName() == virtualInbound {
					return &l
				}
			}
			t.Fatal("no virtualInbound")
			return nil
		}
	}
	meshedNext := listeners(secConn, tok, "sidecar~10.0.0.7~shop-1.default~default.svc.cluster.local")
	plainNext := listeners(plainConn, "", "sidecar~10.0.0.8~client.default~default.svc.cluster.local")

	count := func(l *listenerv3.Listener) (mtls, plain int) {
		for _, fc := range l.GetFilterChains() {
			if fc.GetTransportSocket() != nil {
				mtls++
			} else if fc.GetFilterChainMatch().GetDestinationPort().GetValue() != proxyInboundListenPort {
				plain++
			}
		}
		return
	}
	if m, p := count(meshedNext()); m != 3 || p != 4 {
		t.Errorf("PERMISSIVE, node with a token: %d mTLS and %d plaintext chains, want 3 and 4 (per port: 1+1; catch-all: 2+3)", m, p)
	}
	if m, p := count(plainNext()); m != 0 || p != 1 {
		t.Errorf("node on the plaintext port: %d mTLS and %d plaintext chains, want 0 and the catch-all", m, p)
	}
	srv.setProfile(mustProfile(t, "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nspec:\n  peerAuthentication: STRICT\n"))
	if m, p := count(meshedNext()); m != 3 || p != 0 {
		t.Errorf("after the flip to STRICT: %d mTLS and %d plaintext chains, want 3 and 0", m, p)
	}
	st := srv.status()
	if st.PeerAuthentication != Strict || len(st.Nodes) != 2 || !st.Nodes[0].Identity || st.Nodes[1].Identity {
		t.Errorf("status: %s, nodes %+v; want STRICT, the first node with an identity, the second without", st.PeerAuthentication, st.Nodes)
	}
}

// TestOrderInboundClusters: for a node with an identity that is a
// workload, a port added to the workload brings its inbound|<port>||
// cluster first and virtualInbound's chains to it once the node ACKed the
// clusters; a port removed loses its chains first and its cluster once the
// node ACKed the listeners. At every step each chain's cluster is served.
func TestOrderInboundClusters(t *testing.T) {
	reg := func(ports string) *Registry {
		r, err := parseRegistry("r.yaml", []byte("services:\n- name: shop\n  vip: 10.96.1.1\n  ports: ["+ports+"]\n  endpoints: [{address: 10.0.0.7, sidecar: true}]\n"))
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	const http, tcp = "{name: http, port: 80, targetPort: 8080, protocol: HTTP}", "{name: tcp, port: 9000, protocol: TCP}"
	s := NewServer(reg(http), defaultMeshPtr(), zerolog.Nop())
	s.stepWait = time.Hour
	n := meshed(t, "sidecar~10.0.0.7~shop-1.default~default.svc.cluster.local", "")
	e := &nodeEntry{node: n, clusters: 1, listeners: 1, routes: 1}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nodes[n.ID] = e
	s.changes.note(n.class(s.reg), 1, s.snapshot(n.class(s.reg)))
	check := func(version string, chain9000, cluster9000 bool) {
		t.Helper()
		r := s.served(n.class(s.reg))
		have := map[string]bool{}
		for _, c := range r.Clusters {
			have[c.GetName()] = true
		}
		var chain bool
		for _, fc := range findListener(r, virtualInbound).GetFilterChains() {
			cl := tcpClusterOrHCM(t, fc)
			cl = strings.TrimPrefix(cl, "hcm ")
			if !have[cl] {
				t.Errorf("version %s: chain %s names %s, which is not served", version, chainKey(fc), cl)
			}
			chain = chain || fc.GetFilterChainMatch().GetDestinationPort().GetValue() == 9000
		}
		if s.versionString() != version || chain != chain9000 || have["inbound|9000||"] != cluster9000 {
			t.Fatalf("version %s: chain to 9000 %v, cluster inbound|9000|| %v; want %s, %v, %v (pending: %s)",
				s.versionString(), chain, have["inbound|9000||"], version, chain9000, cluster9000, s.seq.describe())
		}
	}
	check("1", false, false)
	s.reg = reg(http + ", " + tcp)
	s.rebuild()
	check("2", false, true)
	e.clusters = 2
	if !s.step() {
		t.Fatal("no step after the node ACKed the clusters")
	}
	check("3", true, true)
	e.listeners, e.routes = 3, 3
	s.step()
	s.reg = reg(http)
	s.rebuild()
	check("4", false, true) // the chains go first, the cluster stays
	if s.step() {
		t.Fatal("dropped the cluster before the node ACKed the listeners")
	}
	e.clusters, e.listeners, e.routes = 4, 4, 4
	if !s.step() {
		t.Fatal("the unused cluster is never dropped")
	}
	check("5", false, false)
}

// TestTrustDomainFromCA: the control plane's trust domain (the CA's,
// --trust-domain) is the one in the generated SANs: the servers' exact
// SPIFFE IDs upstream, the accepted prefix inbound.
func TestTrustDomainFromCA(t *testing.T) {
	reg, err := parseRegistry("r.yaml", []byte("services:\n- name: shop\n  vip: 10.96.1.1\n  ports: [{name: tcp, port: 9000, protocol: TCP}]\n  endpoints: [{address: 10.0.0.7, sidecar: true, serviceAccount: shop}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(reg, defaultMeshPtr(), zerolog.Nop())
	s.setTrustDomain("corp.example")
	s.mu.Lock()
	r := s.served(meshed(t, "sidecar~10.0.0.7~shop-1.default~default.svc.cluster.local", "").class(reg))
	s.mu.Unlock()
	var utc tlsv3.UpstreamTlsContext
	if err := findCluster(r, "outbound|9000||shop.default.svc.cluster.local").GetTransportSocketMatches()[0].GetTransportSocket().GetTypedConfig().UnmarshalTo(&utc); err != nil {
		t.Fatal(err)
	}
	if san := utc.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchSubjectAltNames()[0].GetExact(); san != "spiffe://corp.example/ns/default/sa/shop" { //nolint:staticcheck // Istio's shape
		t.Errorf("upstream SAN %s", san)
	}
	var dtc tlsv3.DownstreamTlsContext
	for _, fc := range findListener(r, virtualInbound).GetFilterChains() {
		if fc.GetTransportSocket() != nil {
			if err := fc.GetTransportSocket().GetTypedConfig().UnmarshalTo(&dtc); err != nil {
				t.Fatal(err)
			}
			break
		}
	}
	if p := dtc.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchSubjectAltNames()[0].GetPrefix(); p != "spiffe://corp.example/" { //nolint:staticcheck // Istio's shape
		t.Errorf("inbound SAN prefix %s", p)
	}
}
