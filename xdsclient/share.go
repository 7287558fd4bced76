package xdsclient

import (
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// sharer gives the equal sub-messages of the resources decoded with it one
// copy: the first one seen. A control plane repeats many of a resource's
// parts across the resources of a push: the endpoints of a pod in the
// assignment of every port and subset of its service (and whole locality
// groups), the EDS config source, connect timeout, circuit breakers and
// transport socket of every cluster, the telemetry filters of every
// listener. Decoded, each repeat was a tree of allocations of its own,
// held for as long as the resource is in force (the decoded resources
// were ~40% of the heap held after a 10,000-service push). Only pointers
// are shared, which is safe because a decoded resource is never written
// once decode returns it (Resources is read-only).
//
// Two sub-messages are the same when the server encoded them to the same
// bytes (under the same parent field): the bytes are read from the
// resource's encoding as received, so finding a repeat costs a map lookup
// and no encoding or comparison. A server that encodes equal messages
// differently only shares less. One sharer serves one goroutine for one
// response; its table is garbage with it, so nothing is held across
// responses.
type sharer struct {
	key  []byte
	seen map[string]protoreflect.Message
}

// maxSharedField bounds the field numbers shared: the fields counted on
// the stack (fields) and one byte of the key (one).
const maxSharedField = 64

// newSharer makes a sharer for about n resources.
func newSharer(n int) *sharer {
	return &sharer{seen: make(map[string]protoreflect.Message, 2*n)}
}

// Parents of the shared fields: a key is the parent, the field number and
// the field's bytes, so equal bytes of different types never meet.
const (
	parentCluster byte = iota + 1
	parentAssignment
	parentLocality
	parentListener
	parentChain
)

// one returns the message to keep for field num of a parent, encoded as
// wire and decoded as m: the first one seen with these bytes, else m.
func (s *sharer) one(parent byte, num protowire.Number, wire []byte, m protoreflect.Message) (protoreflect.Message, bool) {
	s.key = append(append(s.key[:0], parent, byte(num)), wire...)
	if c, ok := s.seen[string(s.key)]; ok {
		return c, true
	}
	s.seen[string(s.key)] = m
	return m, false
}

// nextField reads the first field of b: its number, its bytes if it is
// length-delimited (bytes false otherwise) and what follows it. n < 0 if
// b does not parse.
func nextField(b []byte) (num protowire.Number, v []byte, bytes bool, n int) {
	num, typ, n := protowire.ConsumeTag(b)
	if n < 0 {
		return 0, nil, false, n
	}
	if typ == protowire.BytesType {
		v, m := protowire.ConsumeBytes(b[n:])
		if m < 0 {
			return 0, nil, false, m
		}
		return num, v, true, n + m
	}
	m := protowire.ConsumeFieldValue(num, typ, b[n:])
	if m < 0 {
		return 0, nil, false, m
	}
	return num, nil, false, n + m
}

// action is what fields does with a field.
type action uint8

const (
	skip    action = iota
	share          // share the field's value
	descend        // hand the value to miss without sharing it whole
)

// fields shares the message fields of m (decoded from wire) that want
// marks share: each element of a repeated one, a singular one set by
// exactly one occurrence on the wire (several are merged into a value no
// single occurrence encodes). miss, if not nil, is called with each value
// that was not a repeat (it is now the first of its bytes) and each value
// of a field marked descend, with its bytes. Map fields are left as they
// are.
func (s *sharer) fields(parent byte, m protoreflect.Message, wire []byte, want func(protoreflect.FieldDescriptor) action, miss func(fd protoreflect.FieldDescriptor, v protoreflect.Message, wire []byte)) {
	// The occurrences and the index of the next element of each field
	// (on the stack: miss may share a child message with fields).
	var count, index [maxSharedField]uint32
	for b := wire; len(b) > 0; {
		num, _, isBytes, n := nextField(b)
		if n < 0 {
			return
		}
		if isBytes && num < maxSharedField {
			count[num]++
		}
		b = b[n:]
	}
	fds := m.Descriptor().Fields()
	for b := wire; len(b) > 0; {
		num, v, isBytes, n := nextField(b)
		b = b[n:]
		if !isBytes || num >= maxSharedField {
			continue
		}
		fd := fds.ByNumber(num)
		if fd == nil || fd.Message() == nil || fd.IsMap() {
			continue
		}
		act := want(fd)
		if act == skip {
			continue
		}
		var cur protoreflect.Message
		var list protoreflect.List
		i := 0
		if fd.IsList() {
			i = int(index[num])
			index[num]++
			if list = m.Get(fd).List(); i >= list.Len() {
				continue
			}
			cur = list.Get(i).Message()
		} else {
			if count[num] != 1 || !m.Has(fd) {
				continue
			}
			cur = m.Get(fd).Message()
		}
		if act == descend {
			if miss != nil {
				miss(fd, cur, v)
			}
			continue
		}
		c, repeat := s.one(parent, num, v, cur)
		switch {
		case !repeat:
			if miss != nil {
				miss(fd, cur, v)
			}
		case list != nil:
			list.Set(i, protoreflect.ValueOfMessage(c))
		default:
			m.Set(fd, protoreflect.ValueOfMessage(c))
		}
	}
}

// notIn shares the fields not named in names.
func notIn(names ...protoreflect.Name) func(protoreflect.FieldDescriptor) action {
	return func(fd protoreflect.FieldDescriptor) action {
		for _, n := range names {
			if fd.Name() == n {
				return skip
			}
		}
		return share
	}
}

// named shares the fields named in names.
func named(names ...protoreflect.Name) func(protoreflect.FieldDescriptor) action {
	return func(fd protoreflect.FieldDescriptor) action {
		for _, n := range names {
			if fd.Name() == n {
				return share
			}
		}
		return skip
	}
}

// listenerShared shares a listener's listener filters and descends into
// its chains: a chain is nearly always a listener's own (none of the 16
// chains of istiod's listeners for a sidecar repeats), while its filters
// repeat (33 filters, 14 different).
func listenerShared(fd protoreflect.FieldDescriptor) action {
	switch fd.Name() {
	case "listener_filters":
		return share
	case "filter_chains", "default_filter_chain":
		return descend
	}
	return skip
}

var (
	clusterShared    = notIn("metadata", "load_assignment")
	endpointsField   = named("endpoints")
	lbEndpointsField = named("lb_endpoints")
	chainShared      = named("filters", "transport_socket")
)

// shareCluster shares a cluster's parts: its config source, timeouts,
// circuit breakers, transport socket and the like. Its metadata and
// static load assignment, which name the cluster's service, are left out.
func shareCluster(s *sharer, m proto.Message, wire []byte) {
	s.fields(parentCluster, m.ProtoReflect(), wire, clusterShared, nil)
}

// shareAssignment shares an assignment's locality groups whole (the
// groups of a service's port and of its subsets often hold the same
// endpoints), else each of their endpoints (a pod's endpoint is in the
// assignment of every subset of its service's port). The address of an
// endpoint that is the first of its bytes is interned.
func shareAssignment(s *sharer, m proto.Message, wire []byte) {
	s.fields(parentAssignment, m.ProtoReflect(), wire, endpointsField, func(_ protoreflect.FieldDescriptor, g protoreflect.Message, gw []byte) {
		s.fields(parentLocality, g, gw, lbEndpointsField, func(_ protoreflect.FieldDescriptor, e protoreflect.Message, _ []byte) {
			if sa := e.Interface().(*endpointv3.LbEndpoint).GetEndpoint().GetAddress().GetSocketAddress(); sa != nil {
				sa.Address = intern(sa.Address)
			}
		})
	})
}

// shareListener shares a listener's listener filters, and the network
// filters and transport socket of each of its chains (istiod repeats its
// telemetry filters and mTLS contexts in every listener).
// Its strings are interned first, as without a sharer.
func shareListener(s *sharer, m proto.Message, wire []byte) {
	internListener(m)
	s.fields(parentListener, m.ProtoReflect(), wire, listenerShared, func(fd protoreflect.FieldDescriptor, v protoreflect.Message, vw []byte) {
		if fd.Name() != "listener_filters" {
			s.fields(parentChain, v, vw, chainShared, nil)
		}
	})
}
