package xdstest

import (
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	internalupstreamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/internal_upstream/v3"
	rawbufferv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

// RawBufferSocket is the plaintext transport socket.
func RawBufferSocket() *corev3.TransportSocket {
	return &corev3.TransportSocket{Name: "envoy.transport_sockets.raw_buffer",
		ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: Pack(&rawbufferv3.RawBuffer{})}}
}

// IstioSocketMatches are istiod's two transport_socket_matches of an
// auto-mTLS cluster: tlsMode-istio (ts, its TLS socket:
// testpki.UpstreamSocket) for endpoints labelled IstioTLS,
// tlsMode-disabled (raw_buffer, match {}) for the rest.
func IstioSocketMatches(ts *corev3.TransportSocket) []*clusterv3.Cluster_TransportSocketMatch {
	return []*clusterv3.Cluster_TransportSocketMatch{
		{Name: "tlsMode-istio", Match: mustStruct(map[string]any{"tlsMode": "istio"}), TransportSocket: ts},
		{Name: "tlsMode-disabled", Match: &structpb.Struct{}, TransportSocket: RawBufferSocket()},
	}
}

// HBONEMatch is the match istiod prepends when it sends HBONE (ambient):
// endpoints labelled tunnel=http go through Envoy's internal upstream
// socket to a waypoint/ztunnel tunnel, which meshtun cannot serve.
func HBONEMatch() *clusterv3.Cluster_TransportSocketMatch {
	return &clusterv3.Cluster_TransportSocketMatch{
		Name:  "hbone",
		Match: mustStruct(map[string]any{"tunnel": "http"}),
		TransportSocket: &corev3.TransportSocket{Name: "envoy.transport_sockets.internal_upstream",
			ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: Pack(&internalupstreamv3.InternalUpstreamTransport{
				TransportSocket: RawBufferSocket(),
			})}},
	}
}

// WithTransportSocket sets the cluster's transport_socket.
func WithTransportSocket(ts *corev3.TransportSocket) ClusterOption {
	return func(pb *clusterv3.Cluster) { pb.TransportSocket = ts }
}

// WithSocketMatches sets the cluster's transport_socket_matches.
func WithSocketMatches(ms ...*clusterv3.Cluster_TransportSocketMatch) ClusterOption {
	return func(pb *clusterv3.Cluster) { pb.TransportSocketMatches = ms }
}

func mustStruct(m map[string]any) *structpb.Struct {
	s, err := structpb.NewStruct(m)
	if err != nil {
		panic(err)
	}
	return s
}
