package cluster

import (
	"math/bits"
	"math/rand/v2"
	"sync/atomic"
)

// lbPolicy is the load-balancing policy of a cluster.
type lbPolicy uint8

const (
	lbRoundRobin lbPolicy = iota
	lbLeastRequest
	lbRandom
	lbClusterProvided // ORIGINAL_DST: the cluster chooses the host
)

func (p lbPolicy) String() string {
	switch p {
	case lbRoundRobin:
		return "ROUND_ROBIN"
	case lbLeastRequest:
		return "LEAST_REQUEST"
	case lbRandom:
		return "RANDOM"
	}
	return "CLUSTER_PROVIDED"
}

// wrr maps a sequence number or a random draw onto one of n weighted
// items without any mutable state, so concurrent pickers need no lock.
//
// With equal weights it is plain rotation: k → k mod n. With different
// weights the items own consecutive ranges of [0, total) (cumulative
// weights) and position k is (k·stride) mod total with stride coprime to
// total and near total/φ: every run of total consecutive k visits each
// position exactly once, so an item with weight w is picked exactly w
// times per cycle, and the golden-ratio stride spreads those picks out
// (low-discrepancy) instead of sending w in a row. This gives the same
// long-run split as Envoy's EDF scheduler at O(log n) per pick.
type wrr struct {
	n      uint64
	cum    []uint64 // cumulative weights; nil when all weights are equal
	total  uint64
	stride uint64
}

func newWRR(weights []uint32) wrr {
	w := wrr{n: uint64(len(weights))}
	if len(weights) == 0 {
		return w
	}
	equal := true
	for _, x := range weights[1:] {
		if x != weights[0] {
			equal = false
			break
		}
	}
	if equal {
		return w
	}
	w.cum = make([]uint64, len(weights))
	for i, x := range weights {
		w.total += uint64(x)
		w.cum[i] = w.total
	}
	w.stride = goldenStride(w.total)
	return w
}

// goldenStride returns the integer nearest total/φ that is coprime with
// total.
func goldenStride(total uint64) uint64 {
	if total <= 2 {
		return 1
	}
	s := uint64(float64(total) * 0.6180339887498949)
	if s == 0 {
		s = 1
	}
	for gcd(s, total) != 1 {
		s++
	}
	return s
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// at returns the item for sequence number k.
func (w *wrr) at(k uint64) int {
	if w.cum == nil {
		return int(k % w.n)
	}
	hi, lo := bits.Mul64(k%w.total, w.stride)
	return w.bucket(bits.Rem64(hi, lo, w.total))
}

// random returns an item drawn with probability proportional to weight.
func (w *wrr) random() int {
	if w.cum == nil {
		return int(rand.Uint64N(w.n))
	}
	return w.bucket(rand.Uint64N(w.total))
}

// bucket returns the item owning position p: the first i with cum[i] > p.
func (w *wrr) bucket(p uint64) int {
	lo, hi := 0, len(w.cum)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if w.cum[m] > p {
			hi = m
		} else {
			lo = m + 1
		}
	}
	return lo
}

// picker chooses among the hosts of one health class of one priority
// level. It is built once per host-set snapshot; only cursor changes
// afterwards. With locality-weighted load balancing a picker holds one
// sub-picker per locality and first picks a locality by its weight.
type picker struct {
	policy  lbPolicy
	choices int // LEAST_REQUEST choice_count

	hosts   []*Host
	weights []uint32 // nil when all hosts have the same weight
	sched   wrr
	cursor  atomic.Uint64

	subs []*picker // locality pickers (locality_weighted_lb_config)
}

func newPicker(policy lbPolicy, choices int, hosts []*Host, weights []uint32) *picker {
	p := &picker{policy: policy, choices: choices, hosts: hosts, sched: newWRR(weights)}
	if p.sched.cum != nil {
		p.weights = weights
	}
	// Start each rotation at a random place, as Envoy does, so a fleet of
	// proxies receiving the same endpoints does not hit the first one in
	// lockstep.
	p.cursor.Store(rand.Uint64())
	return p
}

func newLocalityPicker(subs []*picker, weights []uint32) *picker {
	p := &picker{subs: subs, sched: newWRR(weights)}
	p.cursor.Store(rand.Uint64())
	return p
}

// pick returns a host for which exclude is false, or nil if there is none.
func (p *picker) pick(exclude func(*Host) bool) *Host {
	if p.subs != nil {
		n := len(p.subs)
		i := p.sched.at(p.cursor.Add(1))
		for j := 0; j < n; j++ {
			if h := p.subs[(i+j)%n].pick(exclude); h != nil {
				return h
			}
		}
		return nil
	}
	n := len(p.hosts)
	var i int
	switch p.policy {
	case lbRandom:
		i = p.sched.random()
	case lbLeastRequest:
		i = p.leastRequest()
	default:
		i = p.sched.at(p.cursor.Add(1))
	}
	h := p.hosts[i]
	if exclude == nil || !exclude(h) {
		return h
	}
	for j := 1; j < n; j++ {
		if h := p.hosts[(i+j)%n]; !exclude(h) {
			return h
		}
	}
	return nil
}

// leastRequest is Envoy's power-of-N-choices: draw choice_count
// candidates (by weight when weights differ) and keep the one with the
// fewest active requests+connections relative to its weight. With equal
// weights and two choices the candidates are distinct; when choice_count
// covers every host, all hosts are compared.
func (p *picker) leastRequest() int {
	n := len(p.hosts)
	if n == 1 {
		return 0
	}
	if p.weights == nil {
		if p.choices >= n {
			start := int(rand.Uint64N(uint64(n)))
			best, bestLoad := start, p.hosts[start].load()
			for j := 1; j < n && bestLoad > 0; j++ {
				k := (start + j) % n
				if l := p.hosts[k].load(); l < bestLoad {
					best, bestLoad = k, l
				}
			}
			return best
		}
		best := int(rand.Uint64N(uint64(n)))
		bestLoad := p.hosts[best].load()
		for c := 1; c < p.choices; c++ {
			var k int
			if c == 1 {
				k = (best + 1 + int(rand.Uint64N(uint64(n-1)))) % n
			} else {
				k = int(rand.Uint64N(uint64(n)))
			}
			if l := p.hosts[k].load(); l < bestLoad {
				best, bestLoad = k, l
			}
		}
		return best
	}
	best := p.sched.random()
	for c := 1; c < p.choices; c++ {
		k := p.sched.random()
		// (load+1)/weight, compared without division.
		if (p.hosts[k].load()+1)*uint64(p.weights[best]) < (p.hosts[best].load()+1)*uint64(p.weights[k]) {
			best = k
		}
	}
	return best
}
