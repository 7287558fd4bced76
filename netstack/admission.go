package netstack

import (
	"hash/maphash"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// SYN admission: what a captured SYN may hold while its handshake is open.
//
// gVisor's tcp.Forwarder gives every SYN a goroutine and a SYN-RCVD
// endpoint, 4,096 of them in all, each kept for 127 s of SYN-ACK
// retransmits (its backoff timer runs to MaxRTO and ignores
// TCPSynRetriesOption, which only active opens read). A spoofed flood of
// 32 SYN/s therefore kept every slot busy, and each slot's handler dialed
// the destination before the handshake: spoofed SYNs became connections
// to the application. A kernel listener answers the same flood with SYN
// cookies and hands the application nothing until the ACK.
//
// Two ways were open: (a) keep the Forwarder and put admission in front
// of it, or (b) a promiscuous listening endpoint, whose accept path has
// gVisor's SYN cookies. (b) alone cannot work: a listening endpoint is
// found by its local port, so capturing every destination needs one per
// port, and it always completes the handshake before the handler runs,
// which would lose the refusal a dial-first flow gives (a closed port
// answers RST, as the original destination would). So meshtun does (a)
// and borrows (b) for the overflow:
//
//   - Each direction (inbound: to one of the pod's addresses; outbound:
//     anything else) has its own budget of stateful half-open flows, so a
//     flood at the pod cannot take the slots of the pod's own outbound
//     connects, nor the reverse.
//   - An inbound source (an IPv4 address, an IPv6 /64) holds at most
//     MaxHalfOpenPerSource of the inbound budget, so one client cannot
//     starve the others. Outbound SYNs all come from the pod itself: their
//     budget is their cap.
//   - An inbound flow is never dialed before its handshake completes
//     (TCPRequest.DialFirst is false), as behind a kernel listener and
//     Envoy's virtualInbound: its source may be spoofed, and only the
//     client's ACK proves it, so the application never gets a connection
//     for a client that does not exist. A handler that sends it to its
//     original destination first asks ListenProbe whether anything
//     listens there, and refuses (RST) if not, as the pod would.
//   - An outbound flow comes from the pod's own applications: while
//     fewer than DialFirstMax outbound flows are half-open the handler
//     may dial before the handshake, so a refused upstream is a refused
//     connect. Above it the handshake completes first, as on a kernel
//     listener, and a refused upstream becomes an accepted connection
//     that is reset.
//   - A SYN that finds its budget or its source's share spent is not
//     dropped: it is answered with a SYN cookie by a listening endpoint
//     that exists only for this (cookie.go), which keeps no state until
//     the client's ACK proves the source real. The flow then reaches the
//     handler already accepted.
//   - A stateful handshake gives up after SynAckRetries retransmits
//     (7 s by default) instead of gVisor's 127 s.
//
// The cost on the normal path is one hash, one short critical section in
// one of admShards shards (no global lock) and three atomic adds per SYN,
// and the same again when the handshake ends.
type admission struct {
	inbound      func(tcpip.Address) bool
	budget       [2]int64 // by direction
	perSource    int32
	dialFirstMax int64

	halfOpen [2]atomic.Int64 // stateful half-open flows, by direction

	seed    maphash.Seed
	sources [sourceSlots]atomic.Int32 // inbound half-open flows by hashed source
	shards  [admShards]admShard

	overSource atomic.Uint64 // SYNs over their source's share
	overBudget atomic.Uint64 // SYNs over their direction's budget
	timeouts   atomic.Uint64 // handshakes given up after SynAckRetries
}

const (
	dirOutbound = 0
	dirInbound  = 1

	// sourceSlots counts inbound half-opens by a keyed hash of the source
	// rather than in a map: no lock, no allocation, and a flood of random
	// sources cannot grow it. Two sources sharing a slot share a cap; with
	// the default budget that is about one other flow per slot on
	// average, and the key is random per stack so no client can aim at
	// another's slot.
	sourceSlots = 4096
	admShards   = 32
)

// admShard holds the IDs of the SYNs admitted in its part of the hash
// space: a retransmitted SYN of a flow being decided is dropped here (the
// forwarder would drop it too, but without telling us, and its slot would
// be counted twice).
type admShard struct {
	mu sync.Mutex
	m  map[stack.TransportEndpointID]admitted
	_  [40]byte // keep shards on separate cache lines
}

// admitted is what admission decided for one SYN.
type admitted struct {
	dir       uint8
	slot      uint16 // sources index, inbound only
	dialFirst bool
}

func newAdmission(cfg *Config) *admission {
	a := &admission{
		budget:       [2]int64{int64(cfg.MaxHalfOpenOutbound), int64(cfg.MaxHalfOpenInbound)},
		perSource:    int32(cfg.MaxHalfOpenPerSource),
		dialFirstMax: int64(cfg.DialFirstMax),
		seed:         maphash.MakeSeed(),
	}
	if in := cfg.Inbound; in != nil {
		a.inbound = func(addr tcpip.Address) bool { return in(addrFrom(addr)) }
	}
	for i := range a.shards {
		a.shards[i].m = make(map[stack.TransportEndpointID]admitted)
	}
	return a
}

// slot is the sources index of src: a source is counted by its IPv4
// address, or by the /64 of an IPv6 one (a single host is given a whole
// /64 and can pick any address in it). maphash.Bytes on a stack array,
// not maphash.Comparable, which makes its argument escape.
func (a *admission) slot(src tcpip.Address) uint16 {
	var k [8]byte
	n := 4
	if src.Len() == 16 {
		b := src.As16()
		n = copy(k[:], b[:8])
	} else {
		b := src.As4()
		copy(k[:], b[:])
	}
	return uint16(maphash.Bytes(a.seed, k[:n]) % sourceSlots)
}

func (a *admission) shard(id stack.TransportEndpointID) *admShard {
	var k [36]byte
	n := copy(k[:], id.LocalAddress.AsSlice())
	n += copy(k[n:], id.RemoteAddress.AsSlice())
	k[n], k[n+1], k[n+2], k[n+3] = byte(id.LocalPort>>8), byte(id.LocalPort), byte(id.RemotePort>>8), byte(id.RemotePort)
	return &a.shards[maphash.Bytes(a.seed, k[:n+4])%admShards]
}

// verdict is admission's answer to a SYN.
type verdict uint8

const (
	admitForward verdict = iota // stateful: the forwarder takes it
	admitCookie                 // over budget: answered with a SYN cookie
	admitDrop                   // a retransmit of a SYN being decided
)

// admit decides for the SYN of id and, when it is forwarded, reserves its
// slots until release(id).
func (a *admission) admit(id stack.TransportEndpointID) verdict {
	d := uint8(dirOutbound)
	if a.inbound != nil && a.inbound(id.LocalAddress) {
		d = dirInbound
	}
	sh := a.shard(id)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if _, ok := sh.m[id]; ok {
		return admitDrop
	}
	n := a.halfOpen[d].Add(1)
	if n > a.budget[d] {
		a.halfOpen[d].Add(-1)
		a.overBudget.Add(1)
		return admitCookie
	}
	adm := admitted{dir: d, dialFirst: d == dirOutbound && n <= a.dialFirstMax}
	if d == dirInbound {
		adm.slot = a.slot(id.RemoteAddress)
		if a.sources[adm.slot].Add(1) > a.perSource {
			a.sources[adm.slot].Add(-1)
			a.halfOpen[d].Add(-1)
			a.overSource.Add(1)
			return admitCookie
		}
	}
	sh.m[id] = adm
	return admitForward
}

// lookup returns what admit decided for id.
func (a *admission) lookup(id stack.TransportEndpointID) (admitted, bool) {
	sh := a.shard(id)
	sh.mu.Lock()
	adm, ok := sh.m[id]
	sh.mu.Unlock()
	return adm, ok
}

// release returns the slots admit reserved for id.
func (a *admission) release(id stack.TransportEndpointID) {
	sh := a.shard(id)
	sh.mu.Lock()
	adm, ok := sh.m[id]
	delete(sh.m, id)
	sh.mu.Unlock()
	if !ok {
		return
	}
	a.halfOpen[adm.dir].Add(-1)
	if adm.dir == dirInbound {
		a.sources[adm.slot].Add(-1)
	}
}
