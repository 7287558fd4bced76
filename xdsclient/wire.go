package xdsclient

import (
	"maps"
	"slices"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
)

// wire is one ADS stream in one encoding (state of the world or delta). It turns the
// session's intents (subscribe, ACK, NACK) into requests and responses into the
// common response shape. It is used from the session goroutine only, except recv,
// which a dedicated goroutine calls and which therefore touches no wire state.
type wire interface {
	// recv returns the next response; nil, nil for a response of a type the client
	// does not use.
	recv() (*response, error)
	// observe records a response the session is about to process.
	observe(r *response)
	// send sends a request for kind k that carries the current subscription of k
	// and acknowledges acks (all of kind k) or, if nack is non-nil, rejects them.
	send(k kind, acks []held, nack error) error
}

// subscriptions is what a wire asks the session when it builds a request.
type subscriptions interface {
	// subscription returns the names subscribed for k; wildcard kinds (CDS, LDS)
	// return wildcard true.
	subscription(k kind) (names map[string]bool, wildcard bool)
	// knownVersions returns the per-resource versions of k the client holds.
	knownVersions(k kind) map[string]string
}

// held identifies a response that waits for its ACK or NACK.
type held struct {
	kind    kind
	nonce   string
	version string
}

func errorDetail(err error) *statuspb.Status {
	if err == nil {
		return nil
	}
	return &statuspb.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
}

// sotwWire speaks state-of-the-world ADS. Every request carries the full resource
// name list of its type, the version_info last accepted for the type and the nonce
// of the last response of the type (anything else is stale to the server).
type sotwWire struct {
	st      discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	node    *corev3.Node // sent on the first request, then nil
	subs    subscriptions
	version [numKinds]string
	nonce   [numKinds]string
}

func newSotwWire(st discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient, node *corev3.Node, subs subscriptions, accepted map[string]string) *sotwWire {
	w := &sotwWire{st: st, node: node, subs: subs}
	for k := range numKinds {
		w.version[k] = accepted[kinds[k].url] // on reconnect: resend what was accepted
	}
	return w
}

func (w *sotwWire) recv() (*response, error) {
	m, err := w.st.Recv()
	if err != nil {
		return nil, err
	}
	k, ok := kindOf(m.GetTypeUrl())
	if !ok {
		return nil, nil
	}
	r := &response{kind: k, nonce: m.GetNonce(), version: m.GetVersionInfo()}
	r.resources = make([]rawResource, len(m.GetResources()))
	for i, a := range m.GetResources() {
		r.resources[i] = rawResource{any: a}
	}
	return r, nil
}

// observe keeps the nonce of the latest response per type: requests must carry it.
func (w *sotwWire) observe(r *response) { w.nonce[r.kind] = r.nonce }

func (w *sotwWire) send(k kind, acks []held, nack error) error {
	if len(acks) > 0 && nack == nil {
		w.version[k] = acks[len(acks)-1].version
	}
	req := &discoveryv3.DiscoveryRequest{
		Node:          w.node,
		TypeUrl:       kinds[k].url,
		VersionInfo:   w.version[k],
		ResponseNonce: w.nonce[k],
		ErrorDetail:   errorDetail(nack),
	}
	if names, wildcard := w.subs.subscription(k); !wildcard {
		req.ResourceNames = slices.Sorted(maps.Keys(names))
	}
	if err := w.st.Send(req); err != nil {
		return err
	}
	w.node = nil
	return nil
}

// deltaWire speaks incremental ADS. The first request of a type on a stream
// subscribes (wildcard types with "*") and lists initial_resource_versions, later
// ones carry subscription changes; every response is ACKed or NACKed by its nonce.
type deltaWire struct {
	st   discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	node *corev3.Node
	subs subscriptions
	sent [numKinds]map[string]bool // names the server was told about; nil before the first request
}

func newDeltaWire(st discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient, node *corev3.Node, subs subscriptions) *deltaWire {
	return &deltaWire{st: st, node: node, subs: subs}
}

func (w *deltaWire) recv() (*response, error) {
	m, err := w.st.Recv()
	if err != nil {
		return nil, err
	}
	k, ok := kindOf(m.GetTypeUrl())
	if !ok {
		return nil, nil
	}
	r := &response{
		kind:    k,
		nonce:   m.GetNonce(),
		version: m.GetSystemVersionInfo(),
		removed: m.GetRemovedResources(),
		delta:   true,
	}
	r.resources = make([]rawResource, len(m.GetResources()))
	for i, res := range m.GetResources() {
		r.resources[i] = rawResource{name: res.GetName(), version: res.GetVersion(), any: res.GetResource()}
	}
	return r, nil
}

func (w *deltaWire) observe(*response) {}

func (w *deltaWire) send(k kind, acks []held, nack error) error {
	names, wildcard := w.subs.subscription(k)
	req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: kinds[k].url}
	changed := false
	if w.sent[k] == nil {
		changed = true
		if wildcard {
			req.ResourceNamesSubscribe = []string{"*"}
		} else {
			req.ResourceNamesSubscribe = slices.Sorted(maps.Keys(names))
		}
		req.InitialResourceVersions = w.subs.knownVersions(k)
		w.sent[k] = maps.Clone(names)
		if w.sent[k] == nil {
			w.sent[k] = map[string]bool{}
		}
	} else if !wildcard {
		for n := range names {
			if !w.sent[k][n] {
				req.ResourceNamesSubscribe = append(req.ResourceNamesSubscribe, n)
			}
		}
		for n := range w.sent[k] {
			if !names[n] {
				req.ResourceNamesUnsubscribe = append(req.ResourceNamesUnsubscribe, n)
			}
		}
		slices.Sort(req.ResourceNamesSubscribe)
		slices.Sort(req.ResourceNamesUnsubscribe)
		changed = len(req.ResourceNamesSubscribe)+len(req.ResourceNamesUnsubscribe) > 0
		w.sent[k] = maps.Clone(names)
	}
	if len(acks) == 0 {
		if !changed {
			return nil
		}
		return w.sendOne(req)
	}
	for i, a := range acks {
		if i > 0 {
			req = &discoveryv3.DeltaDiscoveryRequest{TypeUrl: kinds[k].url}
		}
		req.ResponseNonce = a.nonce
		req.ErrorDetail = errorDetail(nack)
		if err := w.sendOne(req); err != nil {
			return err
		}
	}
	return nil
}

func (w *deltaWire) sendOne(req *discoveryv3.DeltaDiscoveryRequest) error {
	req.Node = w.node
	if err := w.st.Send(req); err != nil {
		return err
	}
	w.node = nil
	return nil
}
