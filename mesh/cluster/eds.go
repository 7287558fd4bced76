package cluster

import (
	"fmt"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
)

// UpdateEndpoints replaces the hosts of an EDS cluster with cla (called by
// the xDS client). An invalid assignment is rejected as a whole (the
// caller NACKs it) and the previous hosts stay. Hosts whose address is
// still present keep their *Host and stats. An empty assignment empties
// the cluster (update_empty).
//
// Not honoured yet: policy.drop_overloads, overprovisioning_factor,
// named_endpoints, endpoint additional_addresses.
func (c *Cluster) UpdateEndpoints(cla *endpointv3.ClusterLoadAssignment) error {
	if c.typ != clusterv3.Cluster_EDS {
		return fmt.Errorf("cluster %q: UpdateEndpoints on a %s cluster", c.name, c.typ)
	}
	c.stats.updateAttempt.Add(1)
	if cla == nil {
		c.stats.updateRejected.Add(1)
		return fmt.Errorf("cluster %q: nil ClusterLoadAssignment", c.name)
	}
	if err := cla.ValidateAll(); err != nil {
		c.stats.updateRejected.Add(1)
		return fmt.Errorf("cluster %q: %w", c.name, err)
	}
	eps, err := parseAssignment(cla, "cluster_load_assignment", false)
	if err != nil {
		c.stats.updateRejected.Add(1)
		return fmt.Errorf("cluster %q: %w", c.name, err)
	}
	if len(eps) == 0 {
		c.stats.updateEmpty.Add(1)
	}
	c.setHosts(ipSpecs(eps))
	c.stats.updateSuccess.Add(1)
	c.markInitialized()
	return nil
}
