package proxy

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/xdsclient"
)

// This file is Envoy's warming on secrets. A cluster or listener whose TLS
// context names an SDS secret that has not arrived does not go into force:
// a new one stays absent, a changed one keeps its previous version
// serving. It goes into force when the secret arrives (the latest desired
// configuration is applied again then), or, when its sds_config has a
// positive initial_fetch_timeout, once that has passed: it then serves
// without the secret and its handshakes fail naming it.
//
// The desired configuration is what the proxy was given (the bootstrap's
// static resources and the xDS client's accepted resources); the
// configuration in force is the part of it whose secrets are present. The
// secret subscriptions follow both, so a warming resource's secrets are
// fetched. A secret update for a resource in force changes nothing here:
// the TLS code reads the store at each handshake.

// held is a resource of the desired configuration kept out of force for
// want of secrets.
type held struct {
	msg     proto.Message
	version string    // the version_info it came in ("" when static)
	since   time.Time // when it started waiting
	static  bool
	waiting []string // "secret X from sds-grpc", sorted
}

// warmState is what waits for secrets after the last apply, published
// whole for the admin.
type warmState struct {
	clusters, listeners map[string]held
	// waiting is readiness's text: every secret something waits for.
	waiting string
}

func (w *warmState) empty() bool { return w == nil || len(w.clusters)+len(w.listeners) == 0 }

// refCache keeps each resource's secret references by message pointer:
// the xDS client keeps the pointer of a resource that did not change, so
// an update costs the parsing of what changed only.
type refCache struct {
	clusters  map[*clusterv3.Cluster]*secrets.Refs
	listeners map[*listenerv3.Listener]*secrets.Refs
}

// plan is one configuration to put in force: the desired one minus what
// waits for secrets.
type plan struct {
	staticListeners []*listenerv3.Listener
	staticClusters  []*clusterv3.Cluster
	dyn             *xdsclient.Resources
	// refs are the references of the desired configuration and of the
	// previous versions kept in force: what to subscribe to.
	refs *secrets.Refs
	warm *warmState
	// staticHeld: a static cluster is held back, so a static listener
	// may name a cluster not in force (as with xDS).
	staticHeld bool
	// deadline is the earliest initial_fetch_timeout expiry of a held
	// resource (zero: none): the plan must be made again then.
	deadline time.Time
	cache    refCache
}

// inForce is what the last installed plan put in force (applyMu).
type inForce struct {
	staticListeners map[string]*listenerv3.Listener
	staticClusters  map[string]*clusterv3.Cluster
	dyn             *xdsclient.Resources
}

// makePlan decides, resource by resource, what of the desired
// configuration goes into force (applyMu held). A reference meshtun
// cannot follow is an error naming the resource and field: a plain error
// for a static resource, an xdsclient.ResourceErrors entry for a dynamic
// one (NACKed alone).
func (s *source) makePlan(staticL []*listenerv3.Listener, staticC []*clusterv3.Cluster, desired *xdsclient.Resources, now time.Time) (*plan, error) {
	p := &plan{refs: secrets.NewRefs(), dyn: desired, cache: refCache{
		clusters:  make(map[*clusterv3.Cluster]*secrets.Refs, len(staticC)+len(desired.Clusters)),
		listeners: make(map[*listenerv3.Listener]*secrets.Refs, len(staticL)+len(desired.Listeners))}}
	prev := s.force
	warm := &warmState{clusters: map[string]held{}, listeners: map[string]held{}}
	oldWarm := s.warm.Load()
	var rerrs xdsclient.ResourceErrors
	// need returns what m waits for, noting its references.
	need := func(name string, m proto.Message, static bool) ([]string, error) {
		refs, err := s.refsOf(m, &p.cache)
		if err == nil {
			err = p.refs.Add(refs)
		}
		if err != nil {
			if static {
				return nil, err
			}
			typ, noun := xdsclient.ClusterType, "cluster"
			if _, ok := m.(*listenerv3.Listener); ok {
				typ, noun = xdsclient.ListenerType, "listener"
			}
			rerrs = append(rerrs, xdsclient.ResourceError{TypeURL: typ, Name: name, Err: trimSubject(err, noun, name)})
			return nil, nil
		}
		return s.missing(refs, now, &p.deadline), nil
	}
	// hold records m as waiting, keeping the time it started waiting
	// while its message stays the same.
	hold := func(dst map[string]held, old map[string]held, name string, m proto.Message, version string, static bool, waiting []string) {
		h := held{msg: m, version: version, since: now, static: static, waiting: waiting}
		if o, ok := old[name]; ok && o.msg == m {
			h.since = o.since
		}
		dst[name] = h
	}
	var oldC, oldL map[string]held
	if oldWarm != nil {
		oldC, oldL = oldWarm.clusters, oldWarm.listeners
	}

	for _, c := range staticC {
		w, err := need(c.GetName(), c, true)
		if err != nil {
			return nil, fmt.Errorf("static_resources: %w", err)
		}
		if len(w) == 0 {
			p.staticClusters = append(p.staticClusters, c)
			continue
		}
		hold(warm.clusters, oldC, c.GetName(), c, "", true, w)
		p.staticHeld = true
		if old := prev.staticClusters[c.GetName()]; old != nil {
			p.staticClusters = append(p.staticClusters, old)
		}
	}
	for _, l := range staticL {
		w, err := need(l.GetName(), l, true)
		if err != nil {
			return nil, fmt.Errorf("static_resources: %w", err)
		}
		if len(w) == 0 {
			p.staticListeners = append(p.staticListeners, l)
			continue
		}
		hold(warm.listeners, oldL, l.GetName(), l, "", true, w)
		if old := prev.staticListeners[l.GetName()]; old != nil {
			p.staticListeners = append(p.staticListeners, old)
		}
	}

	var heldC, heldL []string
	for _, name := range slices.Sorted(maps.Keys(desired.Clusters)) {
		c := desired.Clusters[name]
		w, err := need(name, c, false)
		if err != nil {
			return nil, err
		}
		if len(w) > 0 {
			hold(warm.clusters, oldC, name, c, desired.Versions[xdsclient.ClusterType], false, w)
			heldC = append(heldC, name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(desired.Listeners)) {
		l := desired.Listeners[name]
		w, err := need(name, l, false)
		if err != nil {
			return nil, err
		}
		if len(w) > 0 {
			hold(warm.listeners, oldL, name, l, desired.Versions[xdsclient.ListenerType], false, w)
			heldL = append(heldL, name)
		}
	}
	if len(rerrs) > 0 {
		return nil, rerrs
	}
	if len(heldC)+len(heldL) > 0 {
		p.dyn = withPrevious(desired, prev.dyn, heldC, heldL)
	}
	// The previous versions kept in force still use their secrets.
	for _, c := range p.staticClusters {
		_ = p.refs.Add(p.cache.clusters[c])
	}
	for _, l := range p.staticListeners {
		_ = p.refs.Add(p.cache.listeners[l])
	}
	for _, name := range heldC {
		if c := p.dyn.Clusters[name]; c != nil {
			r, _ := s.refsOf(c, &p.cache)
			_ = p.refs.Add(r)
		}
	}
	for _, name := range heldL {
		if l := p.dyn.Listeners[name]; l != nil {
			r, _ := s.refsOf(l, &p.cache)
			_ = p.refs.Add(r)
		}
	}
	warm.waiting = waitingText(warm)
	p.warm = warm
	return p, nil
}

// withPrevious is desired with the held clusters and listeners at their
// version in force (absent if none), and the assignments and route
// configurations those previous versions use kept from prev.
func withPrevious(desired, prev *xdsclient.Resources, heldC, heldL []string) *xdsclient.Resources {
	out := *desired
	if len(heldC) > 0 {
		out.Clusters = maps.Clone(desired.Clusters)
		out.Endpoints = maps.Clone(desired.Endpoints)
		for _, name := range heldC {
			old := prev.Clusters[name]
			if old == nil {
				delete(out.Clusters, name)
				continue
			}
			out.Clusters[name] = old
			if out.Endpoints == nil {
				out.Endpoints = map[string]*endpointv3.ClusterLoadAssignment{}
			}
			svc := old.GetEdsClusterConfig().GetServiceName()
			if svc == "" {
				svc = name
			}
			if a := prev.Endpoints[svc]; a != nil && out.Endpoints[svc] == nil {
				out.Endpoints[svc] = a
			}
		}
	}
	if len(heldL) > 0 {
		out.Listeners = maps.Clone(desired.Listeners)
		keptAny := false
		for _, name := range heldL {
			if old := prev.Listeners[name]; old != nil {
				out.Listeners[name] = old
				keptAny = true
			} else {
				delete(out.Listeners, name)
			}
		}
		if keptAny {
			// A kept listener may use route configurations the desired
			// one no longer names: those in force stay available.
			out.Routes = maps.Clone(desired.Routes)
			if out.Routes == nil {
				out.Routes = map[string]*routev3.RouteConfiguration{}
			}
			for n, rc := range prev.Routes {
				if out.Routes[n] == nil {
					out.Routes[n] = rc
				}
			}
		}
	}
	return &out
}

// refsOf is m's secret references, from the previous plan's cache when m
// did not change.
func (s *source) refsOf(m proto.Message, cache *refCache) (*secrets.Refs, error) {
	switch m := m.(type) {
	case *clusterv3.Cluster:
		if r, ok := cache.clusters[m]; ok {
			return r, nil
		}
		r, ok := s.refCache.clusters[m]
		if !ok {
			var err error
			if r, err = secrets.ClusterRefs(m); err != nil {
				return nil, err
			}
		}
		cache.clusters[m] = r
		return r, nil
	case *listenerv3.Listener:
		if r, ok := cache.listeners[m]; ok {
			return r, nil
		}
		r, ok := s.refCache.listeners[m]
		if !ok {
			var err error
			if r, err = secrets.ListenerRefs(m); err != nil {
				return nil, err
			}
		}
		cache.listeners[m] = r
		return r, nil
	}
	return nil, nil
}

// missing is what refs waits for: each secret not in the store whose
// initial_fetch_timeout (if any) has not passed since it was first
// referenced. The earliest expiry of those is kept in deadline.
func (s *source) missing(refs *secrets.Refs, now time.Time, deadline *time.Time) []string {
	if refs.Empty() {
		return nil
	}
	var out []string
	for name, src := range refs.Names {
		if s.secrets.Get(name) != nil {
			continue
		}
		if t := refs.Timeouts[name]; t > 0 {
			since := s.secrets.Since(name)
			if since.IsZero() {
				since = now
			}
			end := since.Add(t)
			if !now.Before(end) {
				continue // goes into force without it; handshakes name it
			}
			if deadline.IsZero() || end.Before(*deadline) {
				*deadline = end
			}
		}
		out = append(out, fmt.Sprintf("secret %s from %s", name, src))
	}
	slices.Sort(out)
	return out
}

// waitingText is readiness's explanation: every secret waited for, once.
func waitingText(w *warmState) string {
	set := map[string]bool{}
	for _, m := range []map[string]held{w.clusters, w.listeners} {
		for _, h := range m {
			for _, x := range h.waiting {
				set[x] = true
			}
		}
	}
	if len(set) == 0 {
		return ""
	}
	return "waiting for " + strings.Join(slices.Sorted(maps.Keys(set)), ", ")
}

// trimSubject drops the `<noun> "<name>": ` a reference error starts
// with: a ResourceError names its resource itself.
func trimSubject(err error, noun, name string) error {
	prefix := fmt.Sprintf("%s %q: ", noun, name)
	if msg, ok := strings.CutPrefix(err.Error(), prefix); ok {
		return errors.New(msg)
	}
	return err
}

// install puts p in force through a (applyMu held): when something is
// held back, the whole desired configuration is checked first, so that
// an invalid resource is rejected now, whether or not its secrets have
// arrived. Then the subscriptions follow p's references and what waits
// is published.
func (s *source) install(ctx context.Context, a *mesh.XDSApplier, p *plan, desiredL []*listenerv3.Listener, desiredC []*clusterv3.Cluster, desired *xdsclient.Resources, allowUnknown bool) error {
	if !p.warm.empty() {
		// A second build, only while something warms: the price of
		// rejecting an invalid resource when it arrives.
		prevAllow := a.Options.AllowUnknownClusters
		a.Options.AllowUnknownClusters = allowUnknown
		err := a.Check(ctx, desiredL, desiredC, desired)
		a.Options.AllowUnknownClusters = prevAllow
		if err != nil {
			return err
		}
	}
	// The applier's static resources are the part of the bootstrap in
	// force: set for this Apply, put back if it fails.
	prevL, prevC, prevAllow := a.StaticListeners, a.StaticClusters, a.Options.AllowUnknownClusters
	a.StaticListeners, a.StaticClusters = p.staticListeners, p.staticClusters
	a.Options.AllowUnknownClusters = allowUnknown || p.staticHeld
	if err := a.Apply(ctx, p.dyn); err != nil {
		a.StaticListeners, a.StaticClusters, a.Options.AllowUnknownClusters = prevL, prevC, prevAllow
		return err
	}
	f := inForce{dyn: p.dyn,
		staticListeners: make(map[string]*listenerv3.Listener, len(p.staticListeners)),
		staticClusters:  make(map[string]*clusterv3.Cluster, len(p.staticClusters))}
	for _, l := range p.staticListeners {
		f.staticListeners[l.GetName()] = l
	}
	for _, c := range p.staticClusters {
		f.staticClusters[c.GetName()] = c
	}
	s.force = f
	s.refCache = p.cache
	s.follow(p.refs)
	s.logWarming(s.warm.Load(), p.warm)
	s.warm.Store(p.warm)
	s.setDeadline(p.deadline)
	return nil
}

// logWarming logs what starts waiting for secrets and what, having
// waited, is now in force: once per resource version, not per apply.
func (s *source) logWarming(before, after *warmState) {
	if before == nil {
		before = &warmState{}
	}
	for _, kind := range []struct {
		noun          string
		before, after map[string]held
	}{{"cluster", before.clusters, after.clusters}, {"listener", before.listeners, after.listeners}} {
		for name, h := range kind.after {
			if kind.before[name].msg != h.msg {
				s.log.Warn().Str(kind.noun, name).Strs("waiting_for", h.waiting).Msg(kind.noun + " warming: not in force until its secrets arrive")
			}
		}
		for name := range kind.before {
			if _, ok := kind.after[name]; !ok {
				s.log.Info().Str(kind.noun, name).Msg(kind.noun + " warmed: in force, or no longer configured")
			}
		}
	}
}

// follow points the secret subscriptions at refs: the SDS client's
// streams, and the xDS client's ADS subscription for names with
// `ads: {}` sources.
func (s *source) follow(refs *secrets.Refs) {
	if c := s.sds.Load(); c != nil {
		c.Watch(refs)
	} else {
		s.secrets.SetRefs(refs)
	}
	var ads []string
	for name, src := range refs.Names {
		if src.ADS {
			ads = append(ads, name)
		}
	}
	slices.Sort(ads)
	if c := s.client.Load(); c != nil {
		c.WatchSecrets(ads) // kept for its next stream if it is not running
	}
	if !s.bootADS && len(ads) > 0 && !slices.Equal(ads, s.adsNames) {
		s.log.Error().Strs("secrets", ads).Msg("sds: secrets named with `ads: {}` but the bootstrap has no dynamic_resources.ads_config: they never arrive")
	}
	s.adsNames = ads
}

// settle makes the server LIVE once its first configuration is in force
// with nothing waiting for a secret (applyMu held). Once LIVE it stays
// LIVE: a later update warming on a secret keeps its previous version
// serving, as in Envoy.
func (s *source) settle() {
	if s.configured && s.warm.Load().empty() {
		s.initialized.Store(true)
	}
}

// Waiting is readiness's text while the first configuration warms on
// secrets ("" when nothing is waited for).
func (s *source) Waiting() string {
	if w := s.warm.Load(); w != nil {
		return w.waiting
	}
	return ""
}

// setDeadline wakes the rewarm loop for a new deadline.
func (s *source) setDeadline(t time.Time) {
	s.deadline.Store(t.UnixNano())
	if t.IsZero() {
		s.deadline.Store(0)
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// rewarmLoop applies the desired configuration again when a secret
// something waits for arrives, or an initial_fetch_timeout passes. It is
// bounded by those events: no polling.
func (s *source) rewarmLoop(ctx context.Context, done chan<- struct{}) {
	defer close(done)
	t := time.NewTimer(time.Hour)
	t.Stop()
	for {
		if d := s.deadline.Load(); d != 0 {
			t.Reset(time.Until(time.Unix(0, d)))
		}
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-s.secrets.Arrived():
		case <-t.C:
		case <-s.wake:
			t.Stop()
			continue
		}
		t.Stop()
		s.rewarm(ctx)
	}
}

// rewarm applies the desired configuration again if something waits.
func (s *source) rewarm(ctx context.Context) {
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	cur := s.cur.Load()
	if cur == nil || s.warm.Load().empty() {
		return
	}
	sr := cur.b.GetStaticResources()
	res := s.desiredDynamic()
	p, err := s.makePlan(sr.GetListeners(), sr.GetClusters(), res, time.Now())
	if err == nil {
		err = s.install(ctx, cur.applier, p, sr.GetListeners(), sr.GetClusters(), res, s.xdsOn)
	}
	if err != nil {
		s.log.Error().Err(err).Msg("configuration waiting for secrets not applied; what is in force keeps serving")
		return
	}
	s.settle()
}

// desiredDynamic is the xDS part of the desired configuration (applyMu).
func (s *source) desiredDynamic() *xdsclient.Resources {
	if s.dynamic != nil && s.xdsOn {
		return s.dynamic
	}
	return &xdsclient.Resources{}
}

// ApplySecrets implements xdsclient.SecretApplier: secrets delivered over
// ADS go into the store one by one; an invalid one is named (NACKed) and
// its last good version stays.
func (s *source) ApplySecrets(version string, secs []*tlsv3.Secret) error {
	now := time.Now()
	var errs xdsclient.ResourceErrors
	for _, sec := range secs {
		if err := s.secrets.Put(version, sec, now); err != nil {
			if u := errors.Unwrap(err); u != nil {
				err = u // Put names the secret; the ResourceError does too
			}
			errs = append(errs, xdsclient.ResourceError{TypeURL: xdsclient.SecretType, Name: sec.GetName(), Err: err})
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// warming merges what the xDS client warms (waiting for endpoints or
// routes) with the dynamic resources waiting for secrets, for
// /config_dump. The xDS client's entry wins: it is the newer version.
func (s *source) warming() *xdsclient.Warming {
	var xw *xdsclient.Warming
	if c := s.client.Load(); c != nil {
		xw = c.Warming()
	}
	sw := s.warm.Load()
	if sw.empty() {
		return xw
	}
	out := &xdsclient.Warming{Listeners: map[string]xdsclient.WarmingResource{}, Clusters: map[string]xdsclient.WarmingResource{}}
	for name, h := range sw.clusters {
		if !h.static {
			out.Clusters[name] = xdsclient.WarmingResource{Msg: h.msg, Version: h.version, Since: h.since}
		}
	}
	for name, h := range sw.listeners {
		if !h.static {
			out.Listeners[name] = xdsclient.WarmingResource{Msg: h.msg, Version: h.version, Since: h.since}
		}
	}
	if xw != nil {
		maps.Copy(out.Clusters, xw.Clusters)
		maps.Copy(out.Listeners, xw.Listeners)
	}
	return out
}
