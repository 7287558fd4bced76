// Package controlplane is meshtun's embedded control plane, the istiod of a
// meshtun mesh: it serves every connected sidecar, over ADS (delta and state
// of the world, go-control-plane's server and snapshot cache), the
// configuration Istio would generate for it from a registry of services
// and external hosts and a mesh profile (Istio's MeshConfig).
//
// The pieces, by file:
//
//   - registry.go: the registry file, validated into hosts and a listener
//     plan (every conflict is found here, so generation cannot fail);
//   - profile.go: mesh profiles (MeshConfig / IstioOperator-shaped YAML)
//     and the built-in ones;
//   - decode.go: strict YAML decoding whose errors name the field and the
//     valid choices;
//   - generate.go: Istio-shaped resources: virtualOutbound/virtualInbound,
//     a listener per service address and port (one builder per protocol),
//     outbound|<port>||<host> clusters and their endpoints, and the
//     PassthroughCluster, BlackHoleCluster and InboundPassthroughCluster;
//   - http.go: HTTP ports: one 0.0.0.0_<port> listener per port number
//     with an http_connection_manager over RDS, and the route
//     configuration "<port>" (a virtual host per host, matched on Host,
//     and allow_any or block_all);
//   - workload.go: the registry's workloads (service endpoints by IP: a
//     sidecar, a service account, a peer authentication mode, ports),
//     their SPIFFE IDs and Istio's endpoint metadata;
//   - mtls.go: Istio's mutual TLS shapes for sidecars with a workload
//     identity: auto mTLS transport_socket_matches on service clusters,
//     virtualInbound's chains per PeerAuthentication mode, the SDS
//     references to default and ROOTCA over sds-grpc;
//   - node.go: the sidecar node id, its IPs and namespace, whether it has
//     a workload identity (it came over the TLS port with a token);
//   - server.go: per-node snapshots (shared by nodes of one class: IP
//     families and namespace), ACK/NACK tracking, status;
//   - order.go: the order a change goes out in (new clusters, then the
//     listeners and routes that use them, then removals), which meshtun's
//     strict proxy and go-control-plane's ADS cache both need;
//   - api.go: the token-authenticated HTTP API `meshtun profile` talks to;
//   - watch.go: polling of the files; a bad change is rejected and the
//     previous configuration keeps serving;
//   - secure.go: the TLS port (istiod's 15012): the CA of package
//     controlplane/ca and ADS on one gRPC server, callers authenticated by
//     bearer tokens whose namespace and service account the node must
//     match, as istiod checks them;
//   - run.go: all of it wired together for `meshtun controlplane`.
//
// Why generate what Istio generates: a user who knows `istioctl
// proxy-config` finds the same names, and the proxy is tested against the
// same shapes it would get from istiod.
package controlplane
