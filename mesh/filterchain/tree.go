package filterchain

import (
	"net/netip"
	"strings"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
)

// The tree has one node type per level, below the destination port:
//
//	dstNode    destination IP (longest prefix)        → sniNode
//	sniNode    server name (exact, wildcard, "")      → tpNode
//	tpNode     transport protocol (exact, "")         → alpnNode
//	alpnNode   application protocol (first hit, "")   → directNode
//	directNode directly connected source IP (prefix)  → typeNode
//	typeNode   source type (LOCAL/EXTERNAL over ANY)  → srcNode
//	srcNode    source IP (longest prefix)             → portNode
//	portNode   source port (exact, 0)                 → chain index
//
// Each match method returns the chain index or -1: a miss anywhere below
// the chosen bucket is final (Envoy does not backtrack).

// query is a connection normalised once per Match.
type query struct {
	c                *ConnInfo
	dst, src, direct netip.Addr // unmapped; fakeAddr for pipes
	srcPort          uint16     // 0 for pipes
	local            bool       // SAME_IP_OR_LOOPBACK
	sni              string     // lower case
	transport        string     // "raw_buffer" when none was detected
}

type dstNode struct {
	ips prefixTable[*sniNode]
}

func (n *dstNode) match(q *query) int32 {
	s := n.ips.lookup(q.dst)
	if s == nil {
		return -1
	}
	return s.match(q)
}

type sniNode struct {
	// names holds exact names and wildcards, the latter stored as their
	// suffix with the leading dot (".example.com" for "*.example.com"), as
	// Envoy does; nil when every chain here is without server_names.
	names map[string]*tpNode
	wild  bool    // names has a wildcard key
	any   *tpNode // chains without server_names
}

func (n *sniNode) lookup(name string) *tpNode {
	if name != "" && n.names != nil {
		if t := n.names[name]; t != nil {
			return t
		}
		if n.wild {
			// "a.b.example.com" tries ".b.example.com", ".example.com",
			// ".com": every dot after the first byte and before the last.
			for i := 1; i < len(name)-1; i++ {
				if name[i] != '.' {
					continue
				}
				if t := n.names[name[i:]]; t != nil {
					return t
				}
			}
		}
	}
	return n.any
}

func (n *sniNode) match(q *query) int32 {
	t := n.lookup(q.sni)
	if t == nil {
		return -1
	}
	return t.match(q)
}

type tpNode struct {
	protos strTable[*alpnNode] // keyed by transport_protocol
	any    *alpnNode
}

func (n *tpNode) match(q *query) int32 {
	a, ok := n.protos.get(q.transport)
	if !ok {
		a = n.any
	}
	if a == nil {
		return -1
	}
	return a.match(q)
}

type alpnNode struct {
	protos strTable[*directNode] // keyed by application protocol
	any    *directNode
}

func (n *alpnNode) match(q *query) int32 {
	d := n.any
	if n.protos.len() > 0 {
		// The first of the connection's protocols that some chain lists.
		for _, p := range q.c.ApplicationProtocols {
			if x, ok := n.protos.get(p); ok {
				d = x
				break
			}
		}
	}
	if d == nil {
		return -1
	}
	return d.match(q)
}

type directNode struct {
	ips prefixTable[*typeNode]
}

func (n *directNode) match(q *query) int32 {
	t := n.ips.lookup(q.direct)
	if t == nil {
		return -1
	}
	return t.match(q)
}

// typeNode is indexed by listenerv3.FilterChainMatch_ConnectionSourceType.
type typeNode struct {
	byType [3]*srcNode
}

const (
	typeAny      = listenerv3.FilterChainMatch_ANY
	typeLocal    = listenerv3.FilterChainMatch_SAME_IP_OR_LOOPBACK
	typeExternal = listenerv3.FilterChainMatch_EXTERNAL
)

func (n *typeNode) match(q *query) int32 {
	// A bucket for the connection's kind wins over ANY; when it exists, a
	// miss inside it is final.
	s := n.byType[typeExternal]
	if q.local {
		s = n.byType[typeLocal]
	}
	if s == nil {
		s = n.byType[typeAny]
	}
	if s == nil {
		return -1
	}
	return s.match(q)
}

type srcNode struct {
	ips prefixTable[*portNode]
}

func (n *srcNode) match(q *query) int32 {
	p := n.ips.lookup(q.src)
	if p == nil {
		return -1
	}
	return p.match(q.srcPort)
}

type portNode struct {
	exact map[uint16]int32 // nil when every chain here is without source_ports
	any   int32            // chains without source_ports; -1 if none
}

func (n *portNode) match(port uint16) int32 {
	if n.exact != nil {
		if i, ok := n.exact[port]; ok {
			return i
		}
	}
	return n.any
}

// strTable maps a few strings (transport or application protocols) to the
// next level: a linear scan while small, a map beyond that.
type strTable[T any] struct {
	keys []string
	vals []T
	m    map[string]T
}

const strTableLinear = 8

func newStrTable[T any](m map[string]T) strTable[T] {
	var t strTable[T]
	if len(m) > strTableLinear {
		t.m = m
		return t
	}
	for k, v := range m {
		t.keys = append(t.keys, k)
		t.vals = append(t.vals, v)
	}
	return t
}

func (t *strTable[T]) len() int { return len(t.keys) + len(t.m) }

func (t *strTable[T]) get(k string) (T, bool) {
	if t.m != nil {
		v, ok := t.m[k]
		return v, ok
	}
	for i, key := range t.keys {
		if key == k {
			return t.vals[i], true
		}
	}
	var zero T
	return zero, false
}

// wildcardKey is how a server name is stored: lower case, "*.example.com"
// as ".example.com".
func wildcardKey(name string) (key string, wild bool) {
	name = strings.ToLower(name)
	if strings.HasPrefix(name, "*.") {
		return name[1:], true
	}
	return name, false
}
