package netstack

import (
	"hash/maphash"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
)

// ListenProbe tells whether a socket of this network namespace (the
// pod's) listens on a TCP address, for the inbound flows a handler sends
// to their original destination.
//
// Why: an inbound SYN may be spoofed, so its flow is never dialed before
// its handshake completes (TCPRequest.DialFirst is false for inbound
// flows; a dial would hand the application a connection for a client
// that does not exist). But completing the handshake first would turn a
// port nothing listens on into an accepted connection that is then
// reset, where the pod without a sidecar answers the SYN with a RST. The
// probe restores that answer without any upstream work: it asks the
// kernel, read-only, the question its own SYN lookup answers.
//
// How: one NETLINK_SOCK_DIAG request for the exact socket (not a dump),
// which the kernel resolves with the lookup an arriving SYN gets
// (inet_lookup: the exact address, then a wildcard listener of the
// family, and an IPv4 address also finds a dual-stack "::" listener that
// is not IPV6_V6ONLY; SO_REUSEPORT groups count once). Never by bind(),
// which would hold the application's port, even briefly, and could make
// it fail to start; never by connecting, which the application would see.
//
// Positive answers are cached per destination for PositiveTTL (lock-free
// slots, no allocation on a hit), so a busy port costs one round trip a
// second; negative ones are not, so an application that starts listening
// is found at its next SYN. A flood at a closed port costs one round
// trip per SYN that reaches a handler (BenchmarkListenProbe), and SYNs
// beyond the inbound half-open budget get SYN cookies and reach no
// handler before their ACK.
//
// A nil *ListenProbe knows nothing: Listening says so.
type ListenProbe struct {
	ttl  int64 // nanoseconds
	now  func() int64
	ask  func(netip.AddrPort) (bool, error)
	seed maphash.Seed
	log  zerolog.Logger

	slots [listenSlots]atomic.Pointer[listenEntry]

	failures atomic.Uint64
	lastLog  atomic.Int64 // now() of the last failure logged
}

// PositiveTTL is how long a "listening" answer is reused for the same
// destination.
const PositiveTTL = time.Second

// listenSlots bounds the cache: a pod has few listening ports, and two
// destinations sharing a slot only cost each other a round trip.
const listenSlots = 256

// listenFailLogEvery rate-limits the warning about a failing probe.
const listenFailLogEvery = int64(time.Minute)

type listenEntry struct {
	dst   netip.AddrPort
	until int64
}

// NewListenProbe is a probe of the calling process's network namespace;
// failures are logged on log, at most once a minute.
func NewListenProbe(log zerolog.Logger) *ListenProbe {
	return newListenProbe(log, PositiveTTL, monotonicNow, listeningOS)
}

var epoch = time.Now()

// monotonicNow reads the monotonic clock: a wall-clock step must not
// stretch or void the cache.
func monotonicNow() int64 { return int64(time.Since(epoch)) }

func newListenProbe(log zerolog.Logger, ttl time.Duration, now func() int64, ask func(netip.AddrPort) (bool, error)) *ListenProbe {
	return &ListenProbe{ttl: int64(ttl), now: now, ask: ask, seed: maphash.MakeSeed(), log: log}
}

// Listening reports whether a TCP socket listens on dst (its exact
// address or a wildcard one that takes it). known is false when the
// probe could not tell (the request failed, or the platform has no
// probe): the caller then proceeds as if something listened.
func (p *ListenProbe) Listening(dst netip.AddrPort) (listening, known bool) {
	if p == nil {
		return false, false
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	slot := &p.slots[p.slot(dst)]
	now := p.now()
	if e := slot.Load(); e != nil && e.dst == dst && now < e.until {
		return true, true
	}
	ok, err := p.ask(dst)
	if err != nil {
		p.failed(dst, err, now)
		return false, false
	}
	if ok {
		slot.Store(&listenEntry{dst: dst, until: now + p.ttl})
	}
	return ok, true
}

// Failures counts the probes that could not tell.
func (p *ListenProbe) Failures() uint64 {
	if p == nil {
		return 0
	}
	return p.failures.Load()
}

func (p *ListenProbe) failed(dst netip.AddrPort, err error, now int64) {
	n := p.failures.Add(1)
	last := p.lastLog.Load()
	if (n > 1 && now-last < listenFailLogEvery) || !p.lastLog.CompareAndSwap(last, now) {
		return
	}
	p.log.Warn().Err(err).Stringer("dst", dst).Uint64("failures", n).
		Msg("cannot tell whether the pod listens on an inbound destination; accepting such flows before dialing (a closed port is reset after the handshake, not refused)")
}

// slot hashes dst on a stack array (no allocation).
func (p *ListenProbe) slot(dst netip.AddrPort) int {
	var k [18]byte
	a := dst.Addr().As16()
	copy(k[:], a[:])
	k[16], k[17] = byte(dst.Port()>>8), byte(dst.Port())
	return int(maphash.Bytes(p.seed, k[:]) % listenSlots)
}
