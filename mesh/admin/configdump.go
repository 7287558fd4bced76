package admin

import (
	"encoding/base64"
	"fmt"
	"maps"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	xdstype "github.com/cncf/xds/go/xds/type/v3"
	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/xdsclient"
)

// dumpJSON is how Envoy prints its admin protos: field names as in the
// .proto files, indented.
var dumpJSON = protojson.MarshalOptions{Multiline: true, Indent: "  ", UseProtoNames: true}

// undecodedField is the key under which a resource's config of a type
// this binary does not know is kept, base64 of the bytes as received,
// inside an xds.type.v3.TypedStruct that names the original type: the dump
// stays valid JSON any protojson reader can load, and nothing is dropped.
const undecodedField = "meshtun_undecoded_base64"

// configDump serves /config_dump: Envoy's envoy.admin.v3.ConfigDump with
// the resources as received. ?resource= narrows it to one repeated field
// (dynamic_active_clusters, dynamic_listeners, …), ?name_regex= to the
// resources whose name matches, ?include_eds adds the endpoints.
func (s *Server) configDump(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var re *regexp.Regexp
	if v := q.Get("name_regex"); v != "" {
		var err error
		if re, err = regexp.Compile(v); err != nil {
			http.Error(w, fmt.Sprintf("Error while parsing name_regex from %s: %v", v, err), http.StatusBadRequest)
			return
		}
	}
	if q.Get("mask") != "" {
		http.Error(w, "mask: field masks are not supported by meshtun; use resource= and name_regex=", http.StatusBadRequest)
		return
	}
	_, includeEDS := q["include_eds"]
	parts := s.dumpParts(includeEDS, re)
	out := &adminv3.ConfigDump{}
	if res := q.Get("resource"); res != "" {
		found := false
		for _, p := range parts {
			fd := p.ProtoReflect().Descriptor().Fields().ByName(protoreflect.Name(res))
			if fd == nil || !fd.IsList() || fd.Message() == nil {
				continue
			}
			found = true
			l := p.ProtoReflect().Get(fd).List()
			for i := 0; i < l.Len(); i++ {
				a, err := anypb.New(l.Get(i).Message().Interface())
				if err != nil {
					http.Error(w, err.Error(), http.StatusInternalServerError)
					return
				}
				out.Configs = append(out.Configs, a)
			}
		}
		if !found {
			http.Error(w, fmt.Sprintf("resource=%s: not a resource of the config dump; want one of %s", res, strings.Join(resourceNames(parts), ", ")), http.StatusBadRequest)
			return
		}
	} else {
		for _, p := range parts {
			a, err := anypb.New(p)
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			out.Configs = append(out.Configs, a)
		}
	}
	b, err := dumpJSON.Marshal(out)
	if err != nil {
		http.Error(w, "config_dump: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
	w.Write([]byte("\n"))
}

func resourceNames(parts []proto.Message) []string {
	var out []string
	for _, p := range parts {
		fs := p.ProtoReflect().Descriptor().Fields()
		for i := 0; i < fs.Len(); i++ {
			if fd := fs.Get(i); fd.IsList() && fd.Message() != nil {
				out = append(out, string(fd.Name()))
			}
		}
	}
	return out
}

// dumpParts builds the dump's sections in Envoy's order: Bootstrap,
// Clusters, Endpoints (only with include_eds), Listeners, ScopedRoutes,
// Routes, Secrets, as envoy.admin.v3.ConfigDump documents it
// (api/envoy/admin/v3/config_dump.proto, "dumped in the order given").
// istioctl picks sections by type, but scripts index them.
func (s *Server) dumpParts(includeEDS bool, re *regexp.Regexp) []proto.Message {
	var d *mesh.Dump
	if snap := s.D.Snapshot(); snap != nil {
		d = snap.Dump
	}
	if d == nil {
		d = &mesh.Dump{}
	}
	keep := func(name string) bool { return re == nil || re.MatchString(name) }
	parts := []proto.Message{}

	bd := &adminv3.BootstrapConfigDump{}
	if s.Bootstrap != nil {
		if b, at := s.Bootstrap(); b != nil {
			bd.Bootstrap = asReceived(b).(*bootstrapv3.Bootstrap)
			bd.LastUpdated = timestamppb.New(at)
		}
	}
	parts = append(parts, bd)

	cd := &adminv3.ClustersConfigDump{VersionInfo: d.Versions[typeCluster]}
	for _, rec := range d.StaticClusters {
		if keep(rec.Name) {
			cd.StaticClusters = append(cd.StaticClusters, &adminv3.ClustersConfigDump_StaticCluster{
				Cluster: anyOf(rec.Msg), LastUpdated: ts(rec.LastUpdated)})
		}
	}
	for _, rec := range d.Clusters {
		if keep(rec.Name) {
			cd.DynamicActiveClusters = append(cd.DynamicActiveClusters, &adminv3.ClustersConfigDump_DynamicCluster{
				VersionInfo: rec.Version, Cluster: anyOf(rec.Msg), LastUpdated: ts(rec.LastUpdated)})
		}
	}
	var warm *xdsclient.Warming
	if s.Warming != nil {
		warm = s.Warming()
	}
	if warm != nil {
		for _, name := range slices.Sorted(maps.Keys(warm.Clusters)) {
			if keep(name) {
				r := warm.Clusters[name]
				cd.DynamicWarmingClusters = append(cd.DynamicWarmingClusters, &adminv3.ClustersConfigDump_DynamicCluster{
					VersionInfo: r.Version, Cluster: anyOf(r.Msg), LastUpdated: ts(r.Since)})
			}
		}
	}
	parts = append(parts, cd)

	if includeEDS {
		ed := &adminv3.EndpointsConfigDump{}
		for _, rec := range d.StaticEndpoints {
			if keep(rec.Name) {
				ed.StaticEndpointConfigs = append(ed.StaticEndpointConfigs, &adminv3.EndpointsConfigDump_StaticEndpointConfig{
					EndpointConfig: anyOf(rec.Msg), LastUpdated: ts(rec.LastUpdated)})
			}
		}
		for _, rec := range d.Endpoints {
			if keep(rec.Name) {
				ed.DynamicEndpointConfigs = append(ed.DynamicEndpointConfigs, &adminv3.EndpointsConfigDump_DynamicEndpointConfig{
					VersionInfo: rec.Version, EndpointConfig: anyOf(rec.Msg), LastUpdated: ts(rec.LastUpdated)})
			}
		}
		parts = append(parts, ed)
	}

	ld := &adminv3.ListenersConfigDump{VersionInfo: d.Versions[typeListener]}
	for _, rec := range d.StaticListeners {
		if keep(rec.Name) {
			ld.StaticListeners = append(ld.StaticListeners, &adminv3.ListenersConfigDump_StaticListener{
				Listener: anyOf(rec.Msg), LastUpdated: ts(rec.LastUpdated)})
		}
	}
	// One DynamicListener per name: its active state, its warming state
	// while a new version waits for its routes, and its draining state
	// while a replaced or removed version drains.
	byName := map[string]*adminv3.ListenersConfigDump_DynamicListener{}
	var names []string
	dl := func(name string) *adminv3.ListenersConfigDump_DynamicListener {
		if x := byName[name]; x != nil {
			return x
		}
		x := &adminv3.ListenersConfigDump_DynamicListener{Name: name}
		byName[name] = x
		names = append(names, name)
		return x
	}
	for _, rec := range d.Listeners {
		if keep(rec.Name) {
			dl(rec.Name).ActiveState = listenerState(rec)
		}
	}
	if warm != nil {
		for name, r := range warm.Listeners {
			if keep(name) {
				dl(name).WarmingState = &adminv3.ListenersConfigDump_DynamicListenerState{
					VersionInfo: r.Version, Listener: anyOf(r.Msg), LastUpdated: ts(r.Since)}
			}
		}
	}
	now := time.Now()
	for _, rec := range d.DrainingListeners {
		if keep(rec.Name) && now.Before(rec.DrainUntil) {
			dl(rec.Name).DrainingState = listenerState(rec)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		ld.DynamicListeners = append(ld.DynamicListeners, byName[n])
	}
	parts = append(parts, ld)

	// No scoped RDS: Envoy still dumps the (empty) section, here.
	parts = append(parts, &adminv3.ScopedRoutesConfigDump{})

	rd := &adminv3.RoutesConfigDump{}
	// An HCM's inline route_config is a static route configuration in
	// Envoy's dump, whether its listener is static or came over LDS; one
	// entry per HCM that has one, for as long as its listener exists
	// (draining ones too), stamped when the listener was.
	var lrecs []mesh.Record
	lrecs = append(append(append(lrecs, d.StaticListeners...), d.Listeners...), d.DrainingListeners...)
	for _, rec := range lrecs {
		if !rec.DrainUntil.IsZero() && !now.Before(rec.DrainUntil) {
			continue
		}
		for _, rc := range inlineRoutes(rec.Msg) {
			if keep(rc.GetName()) {
				rd.StaticRouteConfigs = append(rd.StaticRouteConfigs, &adminv3.RoutesConfigDump_StaticRouteConfig{
					RouteConfig: anyOf(rc), LastUpdated: ts(rec.LastUpdated)})
			}
		}
	}
	for _, rec := range d.Routes {
		if keep(rec.Name) {
			rd.DynamicRouteConfigs = append(rd.DynamicRouteConfigs, &adminv3.RoutesConfigDump_DynamicRouteConfig{
				VersionInfo: rec.Version, RouteConfig: anyOf(rec.Msg), LastUpdated: ts(rec.LastUpdated)})
		}
	}
	parts = append(parts, rd)
	// Last, as in Envoy's dump: the secrets in force (keys redacted) and
	// those referenced but not received yet.
	sd := &adminv3.SecretsConfigDump{}
	if s.Secrets != nil {
		sd = s.Secrets.ConfigDump(keep)
	}
	parts = append(parts, sd)
	return parts
}

const (
	typeCluster  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	typeListener = "type.googleapis.com/envoy.config.listener.v3.Listener"
	typeHCM      = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

// inlineRoutes returns the route_config of every http_connection_manager
// in a listener's filter chains (default_filter_chain included).
func inlineRoutes(m proto.Message) []*routev3.RouteConfiguration {
	l, isL := m.(*listenerv3.Listener)
	if !isL {
		return nil
	}
	chains := l.GetFilterChains()
	if dfc := l.GetDefaultFilterChain(); dfc != nil {
		chains = append(chains[:len(chains):len(chains)], dfc)
	}
	var out []*routev3.RouteConfiguration
	for _, fc := range chains {
		for _, f := range fc.GetFilters() {
			a := f.GetTypedConfig()
			if a.GetTypeUrl() != typeHCM {
				continue
			}
			var h hcmv3.HttpConnectionManager
			if err := a.UnmarshalTo(&h); err == nil && h.GetRouteConfig() != nil {
				out = append(out, h.GetRouteConfig())
			}
		}
	}
	return out
}

func listenerState(rec mesh.Record) *adminv3.ListenersConfigDump_DynamicListenerState {
	return &adminv3.ListenersConfigDump_DynamicListenerState{
		VersionInfo: rec.Version, Listener: anyOf(rec.Msg), LastUpdated: ts(rec.LastUpdated)}
}

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func anyOf(m proto.Message) *anypb.Any {
	a, err := anypb.New(asReceived(m))
	if err != nil {
		return nil
	}
	return a
}

// asReceived returns m, or when some nested Any carries a type this binary
// does not know (or cannot decode), a copy where each such Any is kept
// as received inside a TypedStruct naming its type (see undecodedField).
// Known Anys are walked too: an HCM's http_filters may hold unknown ones.
func asReceived(m proto.Message) proto.Message {
	if m == nil {
		return nil
	}
	if !hasUnknownAny(m.ProtoReflect()) {
		return m
	}
	c := proto.Clone(m)
	fixAnys(c.ProtoReflect())
	return c
}

func hasUnknownAny(m protoreflect.Message) bool {
	found := false
	walk(m, func(a *anypb.Any) (bool, bool) {
		if _, err := protoregistry.GlobalTypes.FindMessageByURL(a.GetTypeUrl()); err != nil {
			found = true
			return false, false
		}
		inner, err := a.UnmarshalNew()
		if err != nil {
			found = true
			return false, false
		}
		if hasUnknownAny(inner.ProtoReflect()) {
			found = true
			return false, false
		}
		return false, true
	})
	return found
}

// fixAnys rewrites, in place, the Anys hasUnknownAny finds.
func fixAnys(m protoreflect.Message) bool {
	changed := false
	walk(m, func(a *anypb.Any) (bool, bool) {
		inner, err := a.UnmarshalNew()
		if err != nil {
			ts := &xdstype.TypedStruct{TypeUrl: a.GetTypeUrl(), Value: &structpb.Struct{Fields: map[string]*structpb.Value{
				undecodedField: structpb.NewStringValue(base64.StdEncoding.EncodeToString(a.GetValue())),
			}}}
			b, _ := proto.Marshal(ts)
			a.TypeUrl, a.Value = "type.googleapis.com/xds.type.v3.TypedStruct", b
			changed = true
			return true, true
		}
		if fixAnys(inner.ProtoReflect()) {
			b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(inner)
			a.Value = b
			changed = true
		}
		return true, true
	})
	return changed
}

// walk calls fn on every Any in m (not descending into them: fn does);
// fn returns (handled, continue).
func walk(m protoreflect.Message, fn func(*anypb.Any) (bool, bool)) bool {
	if a, ok := m.Interface().(*anypb.Any); ok {
		_, cont := fn(a)
		return cont
	}
	cont := true
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList():
			if fd.Message() == nil {
				return true
			}
			l := v.List()
			for i := 0; i < l.Len() && cont; i++ {
				cont = walk(l.Get(i).Message(), fn)
			}
		case fd.IsMap():
			if fd.MapValue().Message() == nil {
				return true
			}
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				cont = walk(mv.Message(), fn)
				return cont
			})
		case fd.Message() != nil:
			cont = walk(v.Message(), fn)
		}
		return cont
	})
	return cont
}

// Compile-time use of the resource types the dump carries, so that
// their Any type URLs always resolve.
var _ = []proto.Message{(*clusterv3.Cluster)(nil), (*listenerv3.Listener)(nil), (*routev3.RouteConfiguration)(nil), (*endpointv3.ClusterLoadAssignment)(nil)}
