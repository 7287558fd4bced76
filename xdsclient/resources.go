package xdsclient

import (
	"context"
	"fmt"
	"maps"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
)

// Type URLs of the resources the client subscribes to; they key Resources.Versions.
const (
	ClusterType  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	EndpointType = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
	ListenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	RouteType    = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
	// SecretType is SDS over ADS (`sds_config: {ads: {}}`, Istio's
	// kubernetes:// credentials): subscribed by name (Client.WatchSecrets)
	// and handed to the Applier's ApplySecrets, outside the configuration
	// lanes.
	SecretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
)

// Resources is the complete configuration after an update (state of the world, also
// in delta mode). A Resources handed to Apply is never modified afterwards, and maps
// of kinds an update did not change are shared with the previous Resources: treat
// all of it as read-only. A resource that did not change keeps its pointer from one
// Resources to the next, so a consumer can find what changed by pointer comparison.
type Resources struct {
	Clusters map[string]*clusterv3.Cluster
	// Endpoints is keyed by cluster_name (the EDS service name). It holds exactly the
	// assignments the EDS clusters in Clusters refer to; an assignment that did not
	// arrive within the initial fetch timeout is present and empty, as in Envoy.
	Endpoints map[string]*endpointv3.ClusterLoadAssignment
	Listeners map[string]*listenerv3.Listener
	// Routes holds exactly the route configurations the listeners' RDS references
	// name; one that did not arrive within the initial fetch timeout is present and
	// empty (every request gets 404, as in Envoy).
	Routes map[string]*routev3.RouteConfiguration
	// Versions maps a type URL to the version_info of the last accepted update of that
	// type (in delta mode the system_version_info, "" if the server sent none). An
	// update NACKed because some of its resources were rejected leaves the version of
	// its type as it was, though its valid resources are in force (Envoy's NACK
	// carries the last accepted version too).
	Versions map[string]string
}

// Applier validates and installs a configuration. Apply is called from one goroutine
// at a time, only with a consistent set (every EDS cluster has its assignment, every
// RDS listener its route configuration). A call that returns an error must leave the
// configuration in force unchanged.
//
// Resources are judged one by one, as Envoy and gRPC's xDS clients do (gRFC A46):
// Apply returns ResourceErrors naming every invalid resource. The client then calls
// Apply again with each of them replaced by its accepted version (left out if it has
// none; an empty assignment or route configuration if a cluster or listener still
// refers to it), for as long as the Applier names resources it had not named before
// (a few rounds at most). The responses of a type with rejected resources are NACKed
// with their errors as error_detail and keep the type's previous version_info; the
// other types of the update are ACKed; the rejected resources block no later update.
// Any other error rejects the whole update: everything it carried is NACKed with the
// error text and the previous Resources stay the accepted state.
//
// The accepted state (Client.Accepted) is always exactly the Resources of the last
// Apply that returned nil.
type Applier interface {
	Apply(ctx context.Context, r *Resources) error
}

// ApplierFunc adapts a function to Applier.
type ApplierFunc func(ctx context.Context, r *Resources) error

// Apply calls f(ctx, r).
func (f ApplierFunc) Apply(ctx context.Context, r *Resources) error { return f(ctx, r) }

// kind indexes the four resource types. The order is Envoy's ADS order: a request
// of a lower kind goes out before one of a higher kind.
type kind int

const (
	kindCluster kind = iota
	kindEndpoint
	kindListener
	kindRoute
	kindSecret // not a lane's: see secrets.go
	numKinds
)

// kindInfo is what the client knows about one resource type: its wire identity,
// how to decode and name a resource, and which resources of the dependent type it
// refers to.
type kindInfo struct {
	url  string
	noun string // for error messages: `cluster "x": ...`
	new  func() proto.Message
	name func(proto.Message) string
	// refs returns the names of dependent resources (EDS for clusters, RDS for
	// listeners) the resource needs before it can be used. Nil for dependent kinds.
	refs func(proto.Message) ([]string, error)
	// empty builds the resource Envoy uses when a dependent resource is missing.
	empty func(name string) proto.Message
	// intern, if set, replaces the strings of a decoded resource that
	// repeat across resources by their canonical copies (decode.go).
	intern func(proto.Message)
	// share, if set, replaces the sub-messages of a decoded resource that
	// equal ones of the resources decoded before it by their first copy
	// (share.go).
	// share replaces intern when the resource's encoding is at hand.
	share func(s *sharer, m proto.Message, wire []byte)
}

var kinds = [numKinds]kindInfo{
	kindCluster: {
		url:   ClusterType,
		noun:  "cluster",
		new:   func() proto.Message { return new(clusterv3.Cluster) },
		name:  func(m proto.Message) string { return m.(*clusterv3.Cluster).GetName() },
		refs:  clusterRefs,
		share: shareCluster,
	},
	kindEndpoint: {
		url:  EndpointType,
		noun: "cluster_load_assignment",
		new:  func() proto.Message { return new(endpointv3.ClusterLoadAssignment) },
		name: func(m proto.Message) string { return m.(*endpointv3.ClusterLoadAssignment).GetClusterName() },
		empty: func(name string) proto.Message {
			return &endpointv3.ClusterLoadAssignment{ClusterName: name}
		},
		intern: internAssignment,
		share:  shareAssignment,
	},
	kindListener: {
		url:    ListenerType,
		noun:   "listener",
		new:    func() proto.Message { return new(listenerv3.Listener) },
		name:   func(m proto.Message) string { return m.(*listenerv3.Listener).GetName() },
		refs:   listenerRefs,
		intern: internListener,
		share:  shareListener,
	},
	kindRoute: {
		url:  RouteType,
		noun: "route_configuration",
		new:  func() proto.Message { return new(routev3.RouteConfiguration) },
		name: func(m proto.Message) string { return m.(*routev3.RouteConfiguration).GetName() },
		empty: func(name string) proto.Message {
			return &routev3.RouteConfiguration{Name: name}
		},
	},
	kindSecret: {
		url:  SecretType,
		noun: "secret",
		new:  func() proto.Message { return new(tlsv3.Secret) },
		name: func(m proto.Message) string { return m.(*tlsv3.Secret).GetName() },
	},
}

func (k kind) String() string { return kinds[k].url }

func kindOf(typeURL string) (kind, bool) {
	for k := range numKinds {
		if kinds[k].url == typeURL {
			return k, true
		}
	}
	return 0, false
}

// entry is one resource as the client holds it. Entries are immutable: an update
// replaces the entry, so maps of entries can be shared between states.
type entry struct {
	msg     proto.Message
	version string   // per-resource version (delta); "" in SotW and for synthesized ones
	refs    []string // dependent resource names (see kindInfo.refs)
	// synth: made up by the client (Envoy's empty stand-in for a dependent
	// resource that is missing), not sent by the server.
	synth bool
}

// entries maps resource name to entry for one kind.
type entries map[string]*entry

// sameMessages reports whether a and b hold the same names with the same message
// pointers; versions do not matter.
func sameMessages(a, b entries) bool {
	if len(a) != len(b) {
		return false
	}
	for name, ea := range a {
		eb, ok := b[name]
		if !ok || ea.msg != eb.msg {
			return false
		}
	}
	return true
}

// typedMap converts entries into the typed map Resources exposes.
func typedMap[T proto.Message](es entries) map[string]T {
	m := make(map[string]T, len(es))
	for name, e := range es {
		m[name] = e.msg.(T)
	}
	return m
}

// state is one consistent configuration: the Resources Apply accepted plus the
// entries it was built from (versions and references the protocol needs).
type state struct {
	res     *Resources
	entries [numKinds]entries
	applied bool // false for the empty state before the first Apply
}

func emptyState() *state {
	s := &state{res: &Resources{
		Clusters:  map[string]*clusterv3.Cluster{},
		Endpoints: map[string]*endpointv3.ClusterLoadAssignment{},
		Listeners: map[string]*listenerv3.Listener{},
		Routes:    map[string]*routev3.RouteConfiguration{},
		Versions:  map[string]string{},
	}}
	for k := range numKinds {
		s.entries[k] = entries{}
	}
	return s
}

// with returns s with the given kinds replaced and versions set, rebuilding typed
// maps only for kinds whose messages changed (copy on write). If neither resources
// nor versions changed, the result shares s's Resources.
func (s *state) with(repl map[kind]entries, versions map[string]string) (next *state, resChanged, verChanged bool) {
	next = &state{entries: s.entries, applied: s.applied}
	res := *s.res
	for k, es := range repl {
		next.entries[k] = es
		if sameMessages(es, s.entries[k]) {
			continue
		}
		resChanged = true
		switch k {
		case kindCluster:
			res.Clusters = typedMap[*clusterv3.Cluster](es)
		case kindEndpoint:
			res.Endpoints = typedMap[*endpointv3.ClusterLoadAssignment](es)
		case kindListener:
			res.Listeners = typedMap[*listenerv3.Listener](es)
		case kindRoute:
			res.Routes = typedMap[*routev3.RouteConfiguration](es)
		}
	}
	if !maps.Equal(versions, s.res.Versions) {
		verChanged = true
		res.Versions = versions
	}
	next.res = s.res
	if resChanged || verChanged {
		next.res = &res
	}
	return next, resChanged, verChanged
}

// resourceVersions returns the per-resource versions of kind k that the server sent
// (synthesized entries have none), restricted to names in only if only is non-nil.
func (s *state) resourceVersions(k kind, only map[string]bool) map[string]string {
	out := make(map[string]string)
	for name, e := range s.entries[k] {
		if e.version == "" || (only != nil && !only[name]) {
			continue
		}
		out[name] = e.version
	}
	return out
}

// errResource wraps err with the resource it is about.
func errResource(k kind, name string, err error) error {
	return fmt.Errorf("%s %q: %w", kinds[k].noun, name, err)
}
