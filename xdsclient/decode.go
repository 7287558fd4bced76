package xdsclient

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"unique"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

const (
	resourceWrapperType = "type.googleapis.com/envoy.service.discovery.v3.Resource"
	hcmType             = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

// rawResource is one resource of a response before decoding.
type rawResource struct {
	name    string // the name the server gave (delta, or a SotW Resource wrapper); "" if none
	version string // delta per-resource version
	any     *anypb.Any
}

// response is a DiscoveryResponse or DeltaDiscoveryResponse in one shape.
type response struct {
	kind      kind
	nonce     string
	version   string // version_info (SotW) or system_version_info (delta)
	resources []rawResource
	removed   []string // delta only
	delta     bool
}

// validator is implemented by the generated protoc-gen-validate code of every Envoy
// message; Envoy runs the same checks when it ingests a resource.
type validator interface{ Validate() error }

// decode turns the raw resources of r into entries. Any problem (a resource that
// does not unmarshal, has the wrong type, no name, a name that differs from the one
// the server gave, a duplicate, or fails validation) rejects the whole response with
// an error naming the resource: the first one in the response's order.
//
// A large response is decoded on up to GOMAXPROCS goroutines: unmarshalling and
// validating 10,000 resources is most of a client's work on a big push, and the
// resources are independent.
func decode(r *response) ([]namedEntry, error) {
	info := &kinds[r.kind]
	one := make([]decoded, len(r.resources))
	decodeAll(r.kind, r.resources, one)
	out := make([]namedEntry, 0, len(r.resources))
	seen := make(map[string]bool, len(r.resources))
	for i, d := range one {
		if d.err != nil {
			if d.name == "" {
				return nil, fmt.Errorf("%s resources[%d]: %w", info.noun, i, d.err)
			}
			return nil, errResource(r.kind, d.name, d.err)
		}
		if seen[d.name] {
			return nil, errResource(r.kind, d.name, errors.New("duplicate resource in response"))
		}
		seen[d.name] = true
		out = append(out, namedEntry{name: d.name, entry: d.e})
	}
	for _, name := range r.removed {
		if seen[name] {
			return nil, errResource(r.kind, name, errors.New("both updated and removed in one response"))
		}
	}
	return out, nil
}

// decoded is what decodeOne made of one resource.
type decoded struct {
	e    *entry
	name string
	err  error
}

// decodeAll decodes raws into out (same length), in parallel when there are
// LargeResponse or more and GOMAXPROCS allows.
func decodeAll(k kind, raws []rawResource, out []decoded) {
	run := func(lo, hi int) {
		sh := newSharer(hi - lo)
		for i := lo; i < hi; i++ {
			d := &out[i]
			d.e, d.name, d.err = decodeOne(k, raws[i], sh)
		}
	}
	workers := min(runtime.GOMAXPROCS(0), len(raws)/(LargeResponse/2))
	if workers <= 1 {
		run(0, len(raws))
		return
	}
	var wg sync.WaitGroup
	per := (len(raws) + workers - 1) / workers
	for lo := 0; lo < len(raws); lo += per {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			run(lo, hi)
		}(lo, min(lo+per, len(raws)))
	}
	wg.Wait()
}

type namedEntry struct {
	name  string
	entry *entry // nil for a TTL heartbeat: the resource is unchanged
}

// decodeOne decodes one resource; name is the best name known for error messages.
// A named resource without a body is a TTL heartbeat (Envoy keeps the resource as it
// is): decodeOne returns a nil entry for it. sh, if not nil, gives the
// resource's sub-messages equal to ones of resources decoded before with it
// their copy (see sharer).
func decodeOne(k kind, raw rawResource, sh *sharer) (e *entry, name string, err error) {
	info := &kinds[k]
	name = raw.name
	a := raw.any
	if a.GetTypeUrl() == resourceWrapperType { // SotW may wrap resources too
		var w discoveryv3.Resource
		if err := a.UnmarshalTo(&w); err != nil {
			return nil, name, fmt.Errorf("decoding Resource wrapper: %w", err)
		}
		// The wrapper's name stands in for one the server did not give; it
		// must not contradict one it did (found by FuzzDecode: an empty wrapper
		// used to erase the name from the error).
		switch wn := w.GetName(); {
		case wn != "" && name != "" && wn != name:
			return nil, name, fmt.Errorf("resource name mismatch: the Resource wrapper is named %q", wn)
		case wn != "":
			name = wn
		}
		a = w.GetResource()
	}
	if a == nil {
		if name != "" {
			return nil, name, nil
		}
		return nil, name, errors.New("no resource body")
	}
	if a.GetTypeUrl() != info.url {
		return nil, name, fmt.Errorf("type %q in a %s response", a.GetTypeUrl(), info.url)
	}
	msg := info.new()
	if err := proto.Unmarshal(a.GetValue(), msg); err != nil {
		return nil, name, fmt.Errorf("decoding: %w", err)
	}
	got := info.name(msg)
	switch {
	case got == "":
		return nil, name, errors.New("resource has no name")
	case name != "" && name != got:
		return nil, name, fmt.Errorf("resource name mismatch: the resource is named %q", got)
	}
	name = got
	if v, ok := msg.(validator); ok {
		if err := v.Validate(); err != nil {
			return nil, name, err
		}
	}
	switch {
	case info.share != nil && sh != nil:
		info.share(sh, msg, a.GetValue())
	case info.intern != nil:
		info.intern(msg)
	}
	e = &entry{msg: msg, version: raw.version}
	if info.refs != nil {
		if e.refs, err = info.refs(msg); err != nil {
			return nil, name, err
		}
	}
	return e, name, nil
}

// clusterRefs returns the EDS service name an EDS cluster needs.
func clusterRefs(m proto.Message) ([]string, error) {
	c := m.(*clusterv3.Cluster)
	if c.GetType() != clusterv3.Cluster_EDS || c.GetClusterType() != nil {
		return nil, nil
	}
	eds := c.GetEdsClusterConfig()
	if src := eds.GetEdsConfig(); src != nil && src.GetAds() == nil {
		return nil, errors.New("eds_cluster_config.eds_config: only ads is supported")
	}
	if n := eds.GetServiceName(); n != "" {
		return []string{n}, nil
	}
	return []string{c.GetName()}, nil
}

// listenerRefs returns the RDS route configuration names the listener's HTTP
// connection managers need, decoding each filter's typed_config the way Envoy does.
func listenerRefs(m proto.Message) ([]string, error) {
	l := m.(*listenerv3.Listener)
	var names []string
	scan := func(field string, fc *listenerv3.FilterChain) error {
		for j, f := range fc.GetFilters() {
			tc := f.GetTypedConfig()
			if tc.GetTypeUrl() != hcmType {
				continue
			}
			var hcm hcmv3.HttpConnectionManager
			if err := proto.Unmarshal(tc.GetValue(), &hcm); err != nil {
				return fmt.Errorf("%s.filters[%d].typed_config: decoding http_connection_manager: %w", field, j, err)
			}
			rds := hcm.GetRds()
			if rds == nil {
				continue
			}
			if rds.GetConfigSource().GetAds() == nil {
				return fmt.Errorf("%s.filters[%d]: rds.config_source: only ads is supported", field, j)
			}
			if rds.GetRouteConfigName() == "" {
				return fmt.Errorf("%s.filters[%d]: rds.route_config_name is empty", field, j)
			}
			names = append(names, rds.GetRouteConfigName())
		}
		return nil
	}
	for i, fc := range l.GetFilterChains() {
		if err := scan(fmt.Sprintf("filter_chains[%d]", i), fc); err != nil {
			return nil, err
		}
	}
	if fc := l.GetDefaultFilterChain(); fc != nil {
		if err := scan("default_filter_chain", fc); err != nil {
			return nil, err
		}
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

// intern returns the canonical copy of s: a string repeated in thousands
// of resources (a filter's name and type URL in every listener, the pod
// address in the assignment of every port and subset of a service) is then
// held once instead of once per resource, for as long as any holds it.
func intern(s string) string {
	if s == "" {
		return s
	}
	return unique.Make(s).Value()
}

// internListener interns the filter names and type URLs of a decoded
// listener: the same few in every listener of a push.
func internListener(m proto.Message) {
	l := m.(*listenerv3.Listener)
	for _, lf := range l.GetListenerFilters() {
		lf.Name = intern(lf.Name)
		if tc := lf.GetTypedConfig(); tc != nil {
			tc.TypeUrl = intern(tc.TypeUrl)
		}
	}
	chain := func(fc *listenerv3.FilterChain) {
		for _, f := range fc.GetFilters() {
			f.Name = intern(f.Name)
			if tc := f.GetTypedConfig(); tc != nil {
				tc.TypeUrl = intern(tc.TypeUrl)
			}
		}
		if ts := fc.GetTransportSocket(); ts != nil {
			ts.Name = intern(ts.Name)
			if tc := ts.GetTypedConfig(); tc != nil {
				tc.TypeUrl = intern(tc.TypeUrl)
			}
		}
	}
	for _, fc := range l.GetFilterChains() {
		chain(fc)
	}
	if fc := l.GetDefaultFilterChain(); fc != nil {
		chain(fc)
	}
}

// internAssignment interns the endpoint addresses of a decoded assignment:
// a pod's address is in the assignment of every port and subset of its
// service.
func internAssignment(m proto.Message) {
	for _, lle := range m.(*endpointv3.ClusterLoadAssignment).GetEndpoints() {
		for _, lbe := range lle.GetLbEndpoints() {
			if sa := lbe.GetEndpoint().GetAddress().GetSocketAddress(); sa != nil {
				sa.Address = intern(sa.Address)
			}
		}
	}
}
