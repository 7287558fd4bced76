package cluster

import (
	"context"
	"fmt"
	"net"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// Transport secures a connection to a host; nil is raw_buffer (plaintext).
// *tlsctx.Upstream implements it: the cluster package knows nothing of
// TLS contexts, secrets or their stats, which the proxy wires in through
// Options.Transport.
type Transport interface {
	// Secure runs the client side of the transport on raw (connected),
	// bounded by ctx. appProto is "" for a TCP flow, "http/1.1" or "h2"
	// when an HTTP pool dials (the ALPN offered then follows Istio's
	// istio.alpn filter).
	Secure(ctx context.Context, raw net.Conn, appProto string) (net.Conn, error)
}

// TransportParser compiles one transport_socket of a cluster; field names
// it in errors ("transport_socket_matches[0] (tlsMode-istio).transport_socket").
// A nil Transport is raw_buffer.
type TransportParser func(field string, ts *corev3.TransportSocket) (Transport, error)

// The filter_metadata key endpoints and localities carry their transport
// socket match labels under (Istio: {"tlsMode": "istio"}).
const tsMatchKey = "envoy.transport_socket_match"

const (
	rawBufferName     = "envoy.transport_sockets.raw_buffer"
	rawBufferType     = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
	internalUpstream  = "envoy.transport_sockets.internal_upstream"
	internalUpstreamT = "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport"
)

// tsMatch is one usable entry of transport_socket_matches.
type tsMatch struct {
	name   string
	labels []tsLabel
	tr     Transport
}

type tsLabel struct {
	key string
	val *structpb.Value
}

// transports are a cluster's compiled transport sockets. A host's choice
// is an index: 0 is transport_socket, i+1 is matches[i]. It is resolved
// when the host set is built (resolve), never per connection.
type transports struct {
	def     Transport
	matches []tsMatch
}

// at is the transport of choice i.
func (t *transports) at(i uint16) Transport {
	if i == 0 {
		return t.def
	}
	return t.matches[i-1].tr
}

// configureTransport compiles transport_socket and transport_socket_matches.
// Matches whose socket meshtun cannot serve (Istio's ambient "hbone" /
// "tunnel" match to the internal_upstream socket) are skipped, not
// rejected: endpoints they would select fall through to the next match,
// as when the match is absent.
func (c *Cluster) configureTransport(pb *clusterv3.Cluster, parse TransportParser) error {
	if pb.GetTransportSocketMatcher() != nil {
		return fmt.Errorf("transport_socket_matcher: not supported (use transport_socket_matches)")
	}
	def, err := parseTransport(parse, "transport_socket", pb.GetTransportSocket())
	if err != nil {
		return err
	}
	c.tr.def = def
	for i, m := range pb.GetTransportSocketMatches() {
		field := fmt.Sprintf("transport_socket_matches[%d] (%s)", i, m.GetName())
		if unservable(m) {
			c.log.Debug().Str("cluster", c.name).Str("match", m.GetName()).Msg("transport_socket_matches entry skipped: meshtun cannot serve its transport socket")
			continue
		}
		tm := tsMatch{name: m.GetName()}
		for k, v := range m.GetMatch().GetFields() {
			tm.labels = append(tm.labels, tsLabel{k, v})
		}
		if tm.tr, err = parseTransport(parse, field+".transport_socket", m.GetTransportSocket()); err != nil {
			return err
		}
		if len(c.tr.matches) == 1<<16-2 {
			return fmt.Errorf("%s: too many transport_socket_matches", field)
		}
		c.tr.matches = append(c.tr.matches, tm)
	}
	return nil
}

// unservable reports a match whose transport socket meshtun cannot run:
// HBONE (Istio names the match "hbone" or "tunnel") over Envoy's internal
// upstream socket.
func unservable(m *clusterv3.Cluster_TransportSocketMatch) bool {
	if n := m.GetName(); n == "hbone" || n == "tunnel" {
		return true
	}
	ts := m.GetTransportSocket()
	return ts.GetName() == internalUpstream || strings.HasSuffix(ts.GetTypedConfig().GetTypeUrl(), "/"+internalUpstreamT)
}

// parseTransport compiles ts (nil: raw_buffer). Without a parser only
// raw_buffer is accepted.
func parseTransport(parse TransportParser, field string, ts *corev3.TransportSocket) (Transport, error) {
	if ts == nil {
		return nil, nil
	}
	if parse == nil {
		if ts.GetName() == rawBufferName || ts.GetTypedConfig().GetTypeUrl() == rawBufferType {
			return nil, nil
		}
		return nil, fmt.Errorf("%s: %q not supported (no transport socket support configured)", field, ts.GetName())
	}
	return parse(field, ts)
}

// tsLabels is the canonical form of the envoy.transport_socket_match
// metadata of an endpoint or locality, as a hostMeta keeps it: a string,
// so that hostMeta stays comparable and an update with the same labels
// is recognised as no change. "" when there are none.
func tsLabels(md *corev3.Metadata) string {
	s := md.GetFilterMetadata()[tsMatchKey]
	if len(s.GetFields()) == 0 {
		return ""
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(s)
	if err != nil {
		return ""
	}
	return string(b)
}

// resolve picks the transport of a host with endpoint labels ep and
// locality labels loc (tsLabels forms), as Envoy's
// TransportSocketMatcherImpl: the first match whose labels are all in
// the endpoint's, else the first whose labels are all in the locality's
// (a match with no labels matches either), else transport_socket.
// cache, if not nil, memoises by label pair for one host-set build.
func (t *transports) resolve(ep, loc string, cache map[[2]string]uint16) uint16 {
	if len(t.matches) == 0 {
		return 0
	}
	k := [2]string{ep, loc}
	if i, ok := cache[k]; ok {
		return i
	}
	i := t.resolveNow(ep, loc)
	if cache != nil {
		cache[k] = i
	}
	return i
}

func (t *transports) resolveNow(ep, loc string) uint16 {
	for _, md := range [2]string{ep, loc} {
		fields := decodeLabels(md)
		for i := range t.matches {
			if t.matches[i].matches(fields) {
				return uint16(i + 1)
			}
		}
	}
	return 0
}

func decodeLabels(s string) map[string]*structpb.Value {
	if s == "" {
		return nil
	}
	var st structpb.Struct
	if err := proto.Unmarshal([]byte(s), &st); err != nil {
		return nil
	}
	return st.GetFields()
}

// matches reports whether every label of m is in fields with an equal
// value (Envoy's metadataLabelMatch, lists compared whole).
func (m *tsMatch) matches(fields map[string]*structpb.Value) bool {
	for _, l := range m.labels {
		v, ok := fields[l.key]
		if !ok || !proto.Equal(v, l.val) {
			return false
		}
	}
	return true
}

// TransportMatch names the transport_socket_matches entry h's labels
// selected when its host set was built, "" for transport_socket (or a
// host of another cluster).
func (c *Cluster) TransportMatch(h *Host) string {
	i := h.meta.Load().ts
	if i == 0 || int(i) > len(c.tr.matches) {
		return ""
	}
	return c.tr.matches[i-1].name
}
