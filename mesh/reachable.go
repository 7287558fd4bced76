package mesh

import (
	"hash/maphash"
	"net/netip"
	"sync"
	"time"

	"github.com/meshtun/meshtun/internal/gopool"
)

// Optimistic accept: when a captured outbound flow may be dialed first
// (netstack.TCPRequest.DialFirst), the proxy normally connects upstream
// before it completes the application's handshake, so that a destination
// that refuses or does not answer is a refused or unanswered connect for
// the application too, as without the proxy. That puts one whole upstream
// connect (a round trip, and the poller's wake-up) on every connect() of
// the application, which a kernel-socket sidecar (iptables REDIRECT, and
// Envoy, which always accepts first) does not pay: in `make bench` it was
// about 100 µs of the 270 µs the application waited in connect().
//
// A destination that accepted a connection from this proxy a moment ago
// almost surely accepts the next one, and an application that connects to
// it at a high rate is the one that pays the round trip most. So for a
// destination whose last upstream connect succeeded within reachableFor,
// the handshake is completed while the upstream is dialed on a goroutine
// of its own, as Envoy does; if that dial fails after all, the accepted
// connection is reset (Envoy's behaviour too) and the destination is
// forgotten, so the next flow to it dials first and a closed port is
// refused again. A destination never reached, or whose last connect
// failed, keeps dial-first.

// reachableFor is how long a successful upstream connect lets the next
// flows to the same destination be accepted before their own connect.
const reachableFor = 5 * time.Second

// reachableSlots is the size of the table: direct-mapped, so it never
// grows and a new destination simply takes its slot's place; a
// destination that lost its slot falls back to dial-first.
const reachableSlots = 1024

// reachable remembers, per destination, when an upstream connect to it
// last succeeded. Each slot has its own lock (no global lock on the
// connect path); a lookup or an update is one hash and one short
// critical section, with no allocation.
type reachable struct {
	seed  maphash.Seed
	epoch time.Time // monotonic origin of at
	slots [reachableSlots]reachableSlot
}

type reachableSlot struct {
	mu  sync.Mutex
	dst netip.AddrPort
	via string
	at  time.Duration // since epoch; 0: empty
}

func newReachable() *reachable {
	return &reachable{seed: maphash.MakeSeed(), epoch: time.Now()}
}

// slot is where (dst, via) is kept. via is the cluster a flow to dst is
// forwarded through: a connect through one cluster (a service listener's
// endpoints) says nothing of another (PassthroughCluster, once that
// listener is removed, dials dst itself).
func (r *reachable) slot(dst netip.AddrPort, via string) *reachableSlot {
	var k [18]byte
	a := dst.Addr().As16()
	copy(k[:], a[:])
	k[16], k[17] = byte(dst.Port()>>8), byte(dst.Port())
	var h maphash.Hash
	h.SetSeed(r.seed)
	h.Write(k[:])
	h.WriteString(via)
	return &r.slots[h.Sum64()%reachableSlots]
}

// known reports whether an upstream connect to dst through via succeeded
// within reachableFor. A nil table knows nothing.
func (r *reachable) known(dst netip.AddrPort, via string) bool {
	if r == nil {
		return false
	}
	now := time.Since(r.epoch)
	s := r.slot(dst, via)
	s.mu.Lock()
	ok := s.at != 0 && s.dst == dst && s.via == via && now-s.at < reachableFor
	s.mu.Unlock()
	return ok
}

// connected records a successful upstream connect to dst through via.
func (r *reachable) connected(dst netip.AddrPort, via string) {
	if r == nil {
		return
	}
	now := max(time.Since(r.epoch), 1)
	s := r.slot(dst, via)
	s.mu.Lock()
	s.dst, s.via, s.at = dst, via, now
	s.mu.Unlock()
}

// failed forgets dst after a connect to it failed: its next flow dials
// first again.
func (r *reachable) failed(dst netip.AddrPort, via string) {
	if r == nil {
		return
	}
	s := r.slot(dst, via)
	s.mu.Lock()
	if s.dst == dst && s.via == via {
		s.at = 0
	}
	s.mu.Unlock()
}

// acceptWhileDialing completes a flow's handshake (accept) while its
// upstream is connected (dial) on a goroutine of its own, and returns
// once both are known. The caller owns both results, whichever failed.
//
// The dialing goroutine then stays parked on the returned spare until the
// caller gives it the flow's second splice direction (spare.run, as
// tcpproxy.SpliceOn's spawn) or lets it go (spare.release): one goroutine
// started per flow instead of two, and the stack the dial grew is used
// again rather than grown afresh in a new one. The caller must call
// exactly one of the two.
func acceptWhileDialing[D, U any](accept func() (D, error), dial func() (U, error)) (down D, up U, sp spare, acceptErr, dialErr error) {
	var wg sync.WaitGroup
	wg.Add(1)
	sp = make(spare, 1)
	gopool.Go(func() {
		up, dialErr = dial()
		wg.Done()
		if f := <-sp; f != nil {
			f()
		}
	})
	down, acceptErr = accept()
	wg.Wait()
	return down, up, sp, acceptErr, dialErr
}

// spare is a goroutine acceptWhileDialing keeps for its caller: it runs
// the one function sent to it, or ends on nil. Buffered, so handing it
// over never blocks.
type spare chan func()

// run has the spare goroutine run f; it is tcpproxy.SpliceOn's spawn.
func (s spare) run(f func()) { s <- f }

// release lets the spare goroutine end unused.
func (s spare) release() { s <- nil }
