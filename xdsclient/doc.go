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
//   - one watcher, the Applier (verdict.go, repair.go): it validates and installs
//     a complete, consistent configuration. Its verdict is the ACK or the NACK;
//     besides decoding, there is no other validation path.
//
// Why the ACK waits for Apply: a control plane reads an ACK as "this proxy runs
// that version" (istiod's proxy-status SYNCED), so the client acknowledges only what
// the mesh installed.
//
// Rejection is per resource (gRFC A46, Envoy): the Applier names the invalid
// resources (ResourceErrors), the client applies the update without them, each at
// its last accepted version, and NACKs the responses of their type naming each one.
// A rejected resource is then forgotten from what the client holds of the server's
// view: a later update of other resources is judged on its own instead of failing
// again on the rejected one until the server happens to resend it. An error that
// names no resource rejects the update as a whole, and the previous configuration
// keeps running.
//
// SDS secrets named with `ads: {}` ride the same stream outside the lanes
// (secrets.go): the proxy names them (WatchSecrets) and takes them as they come
// (SecretApplier), each judged alone; the listeners and clusters that use them
// warm in the proxy, not here, since Envoy ACKs a resource that waits for its
// secret.
//
// xdsclient does not know meshtun's mesh package: it hands over Envoy protos.
package xdsclient
