package cluster

import (
	"errors"
	"fmt"
	"sync/atomic"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
)

// Endpoints is a validated ClusterLoadAssignment in the form an EDS
// cluster takes it. It is immutable, and independent of any cluster, so
// that an update can validate every assignment before any cluster sees
// one.
//
// Not honoured yet: policy.drop_overloads, overprovisioning_factor,
// named_endpoints, endpoint additional_addresses.
type Endpoints struct {
	specs []hostSpec
}

// ParseEndpoints validates cla. The error names the field.
func ParseEndpoints(cla *endpointv3.ClusterLoadAssignment) (*Endpoints, error) {
	if cla == nil {
		return nil, errors.New("nil ClusterLoadAssignment")
	}
	if err := cla.ValidateAll(); err != nil {
		return nil, err
	}
	eps, err := parseAssignment(cla, "cluster_load_assignment", false)
	if err != nil {
		return nil, err
	}
	for _, e := range eps {
		if e.pipe != "" {
			return nil, fmt.Errorf("cluster_load_assignment: pipe (Unix domain socket) endpoint %q: only STATIC clusters may have pipe endpoints", e.pipe)
		}
	}
	return &Endpoints{specs: dedupe(ipSpecs(eps))}, nil
}

// Len is the number of distinct endpoints.
func (e *Endpoints) Len() int { return len(e.specs) }

// Staged is a host set built for an EDS cluster from an assignment and
// not yet in force: the proxy stages the assignments of an update while
// it builds the snapshot, and commits them only when that snapshot is
// swapped in, so a rejected update changes no cluster's hosts. The
// cluster keeps its identity (flows, pools and circuit breakers are
// keyed by it, and hosts whose address stays keep their *Host with its
// stats and load): only its host set is replaced, in one atomic store.
// A Staged never changes once built, so a snapshot that holds one
// reports the hosts it put in force even after a later update.
type Staged struct {
	c    *Cluster
	eps  *Endpoints
	u    atomic.Pointer[hostUpdate] // rebuilt by Commit if the base moved
	done bool                       // guarded by c.updateMu
}

// Stage builds the host set e makes of c's hosts in force. Nothing of c
// changes until Commit.
func (c *Cluster) Stage(e *Endpoints) (*Staged, error) {
	if c.typ != clusterv3.Cluster_EDS {
		return nil, fmt.Errorf("cluster %q: an assignment for a %s cluster", c.name, c.typ)
	}
	s := &Staged{c: c, eps: e}
	s.u.Store(c.prepare(c.hosts.Load(), e.specs))
	return s, nil
}

// Hosts are the hosts of the staged set, in configuration order.
func (s *Staged) Hosts() []*Host { return append([]*Host(nil), s.u.Load().set.all...) }

// Cluster is the cluster the set was staged for.
func (s *Staged) Cluster() *Cluster { return s.c }

// Commit puts the staged set in force (once; later calls do nothing) and
// counts the update (update_attempt, update_success, update_empty or
// update_no_rebuild) and marks the cluster initialized (warm).
func (s *Staged) Commit() {
	c := s.c
	c.updateMu.Lock()
	if s.done {
		c.updateMu.Unlock()
		return
	}
	s.done = true
	c.stats.updateAttempt.Add(1)
	if len(s.u.Load().specs) == 0 {
		c.stats.updateEmpty.Add(1)
	}
	// Only the set is kept: the specs and the base it was built from
	// (the hosts before) would double what a snapshot holds.
	s.u.Store(&hostUpdate{set: c.commitLocked(s.u.Load()).set})
	s.eps = nil
	c.stats.updateSuccess.Add(1)
	c.updateMu.Unlock()
	c.markInitialized()
}

// CountRejected counts an assignment for c that failed validation
// (update_attempt and update_rejected): the hosts in force stay.
func (c *Cluster) CountRejected() {
	c.stats.updateAttempt.Add(1)
	c.stats.updateRejected.Add(1)
}

// UpdateEndpoints validates cla and puts it in force at once: Stage and
// Commit in one step, for a caller with no snapshot to wait for. An
// invalid assignment is rejected as a whole and the previous hosts stay.
// An empty assignment empties the cluster (update_empty).
func (c *Cluster) UpdateEndpoints(cla *endpointv3.ClusterLoadAssignment) error {
	if c.typ != clusterv3.Cluster_EDS {
		return fmt.Errorf("cluster %q: UpdateEndpoints on a %s cluster", c.name, c.typ)
	}
	e, err := ParseEndpoints(cla)
	if err != nil {
		c.CountRejected()
		return fmt.Errorf("cluster %q: %w", c.name, err)
	}
	s, err := c.Stage(e)
	if err != nil {
		return err
	}
	s.Commit()
	return nil
}
