package cluster

import (
	"context"
	"math/rand/v2"
	"net/netip"
	"slices"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
)

// dnsTimeout bounds one lookup (c-ares' default in Envoy is 5 s per try).
const dnsTimeout = 5 * time.Second

// dnsConfig is a STRICT_DNS cluster's resolution setup: every
// lb_endpoint is a resolve target; the hosts are all addresses of all
// targets.
type dnsConfig struct {
	targets  []endpoint
	refresh  time.Duration // dns_refresh_rate
	failBase time.Duration // dns_failure_refresh_rate.base_interval (0: use refresh)
	failMax  time.Duration // dns_failure_refresh_rate.max_interval
	jitter   time.Duration // dns_jitter
	family   clusterv3.Cluster_DnsLookupFamily
}

func newDNSConfig(pb *clusterv3.Cluster, eps []endpoint) *dnsConfig {
	d := &dnsConfig{
		targets: eps,
		refresh: dur(pb.GetDnsRefreshRate(), defaultDNSRefreshRate),
		jitter:  dur(pb.GetDnsJitter(), 0),
		family:  pb.GetDnsLookupFamily(),
	}
	if fr := pb.GetDnsFailureRefreshRate(); fr != nil {
		d.failBase = dur(fr.GetBaseInterval(), d.refresh)
		d.failMax = dur(fr.GetMaxInterval(), 10*d.failBase) // Envoy: 10 × base by default
	}
	return d
}

// dnsLoop resolves all targets now and then every dns_refresh_rate (after
// a failure: dns_failure_refresh_rate with exponential backoff), until ctx
// is cancelled by Close. respect_dns_ttl is not honoured (the Go resolver
// does not return TTLs).
func (c *Cluster) dnsLoop(ctx context.Context, r Resolver) {
	defer close(c.done)
	d := c.dns
	last := make([][]netip.Addr, len(d.targets)) // last good answer per target
	var backoff time.Duration
	for {
		failed, ok := c.resolveAll(ctx, r, last)
		if !ok {
			return
		}
		wait := d.refresh
		if failed && d.failBase > 0 {
			backoff = min(max(2*backoff, d.failBase), d.failMax)
			wait = backoff
		} else {
			backoff = 0
		}
		if d.jitter > 0 {
			wait += rand.N(d.jitter)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// resolveAll resolves every target and publishes the union of the
// answers. A target whose lookup fails keeps its previous addresses, as
// in Envoy. ok is false when ctx was cancelled.
func (c *Cluster) resolveAll(ctx context.Context, r Resolver, last [][]netip.Addr) (failed, ok bool) {
	d := c.dns
	for i, t := range d.targets {
		if t.ip.IsValid() {
			last[i] = []netip.Addr{t.ip}
			continue
		}
		c.stats.updateAttempt.Add(1)
		lctx, cancel := context.WithTimeout(ctx, dnsTimeout)
		addrs, err := lookup(lctx, r, d.family, t.host)
		cancel()
		if ctx.Err() != nil {
			return false, false
		}
		if err != nil {
			c.stats.updateFailure.Add(1)
			c.log.Warn().Str("cluster", c.name).Err(err).Str("host", t.host).Msg("DNS resolution failed; keeping previous addresses")
			failed = true
			continue
		}
		c.stats.updateSuccess.Add(1)
		last[i] = addrs
	}
	var specs []hostSpec
	for i, t := range d.targets {
		for _, a := range last[i] {
			specs = append(specs, hostSpec{addr: netip.AddrPortFrom(a, t.port), meta: t.meta})
		}
	}
	c.setHosts(specs)
	c.markInitialized()
	return failed, true
}

// lookup resolves name according to dns_lookup_family.
func lookup(ctx context.Context, r Resolver, fam clusterv3.Cluster_DnsLookupFamily, name string) ([]netip.Addr, error) {
	first, second := "ip6", "ip4" // AUTO: IPv6, falling back to IPv4
	switch fam {
	case clusterv3.Cluster_V4_ONLY:
		return lookupNet(ctx, r, "ip4", name)
	case clusterv3.Cluster_V6_ONLY:
		return lookupNet(ctx, r, "ip6", name)
	case clusterv3.Cluster_ALL:
		return lookupNet(ctx, r, "ip", name)
	case clusterv3.Cluster_V4_PREFERRED:
		first, second = "ip4", "ip6"
	}
	if addrs, err := lookupNet(ctx, r, first, name); err == nil && len(addrs) > 0 {
		return addrs, nil
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return lookupNet(ctx, r, second, name)
}

// lookupNet resolves name and keeps the addresses of the asked family,
// unmapped and de-duplicated, in the resolver's order.
func lookupNet(ctx context.Context, r Resolver, network, name string) ([]netip.Addr, error) {
	res, err := r.LookupNetIP(ctx, network, name)
	if err != nil {
		return nil, err
	}
	out := make([]netip.Addr, 0, len(res))
	for _, a := range res {
		a = a.Unmap()
		if (network == "ip4" && !a.Is4()) || (network == "ip6" && !a.Is6()) || slices.Contains(out, a) {
			continue
		}
		out = append(out, a)
	}
	return out, nil
}
