// Package xdsclient takes meshtun's configuration from an xDS control plane the way
// Envoy (istio-proxy) takes it from istiod: over one Aggregated Discovery Service
// stream, in state-of-the-world (GRPC) or incremental (DELTA_GRPC) mode.
//
// The package has three parts, after grpc-go's xDS client:
//
//   - a transport (client.go, session.go, wire.go): the ADS stream, the node on the
//     first message, nonces, subscriptions, reconnection with backoff;
//   - a resource cache (decode.go, resources.go, warming.go): what the server has
//     sent and what was last accepted, with Envoy's ordering (CDS, then EDS, then
//     LDS, then RDS) and warming (a cluster set waits for its endpoints, a listener
//     set for its routes);
//   - one watcher, the Applier (verdict.go): it validates and installs a complete,
//     consistent configuration. Its verdict is the ACK or the NACK; besides
//     decoding, there is no other validation path.
//
// Why the ACK waits for Apply: a control plane reads an ACK as "this proxy runs
// that version" (istiod's proxy-status SYNCED), so the client acknowledges only what
// the mesh installed, and a rejected update leaves the previous configuration
// running.
//
// xdsclient does not know meshtun's mesh package: it hands over Envoy protos.
package xdsclient
