package xdsclient

import (
	"math/rand/v2"
	"time"
)

// backoff is exponential backoff with full jitter: the n-th delay is uniform in
// [0, min(max, base·2ⁿ)), as Envoy's JitteredExponentialBackOffStrategy.
type backoff struct {
	base, max time.Duration
	attempt   uint
}

func (b *backoff) next() time.Duration {
	ceil := b.max
	if b.attempt < 32 {
		if c := b.base << b.attempt; c > 0 && c < b.max {
			ceil = c
		}
	}
	b.attempt++
	return time.Duration(rand.Int64N(int64(ceil))) + 1
}

func (b *backoff) reset() { b.attempt = 0 }

// spacing is the deterministic delay before the n-th (n ≥ 1) identical repeated
// NACK: base·2ⁿ⁻¹, at most limit.
func spacing(base, limit time.Duration, n int) time.Duration {
	d := base
	for i := 1; i < n && d < limit; i++ {
		d *= 2
	}
	return min(d, limit)
}
