package xdsclient

import "sync/atomic"

// Stat names, as Envoy spells them (the admin endpoint prints them unchanged).
const (
	StatCDSUpdateSuccess  = "cluster_manager.cds.update_success"
	StatCDSUpdateRejected = "cluster_manager.cds.update_rejected"
	StatLDSUpdateSuccess  = "listener_manager.lds.update_success"
	StatLDSUpdateRejected = "listener_manager.lds.update_rejected"
	StatUpdateAttempt     = "update_attempt"
	StatConnectedState    = "control_plane.connected_state"
)

// stats are the client's counters and gauges; all fields are updated atomically.
type stats struct {
	success, rejected [numKinds]atomic.Uint64
	attempts          atomic.Uint64
	connected         atomic.Uint64
}

// Stats returns the counters (and the connected_state gauge, 0 or 1) by Envoy name.
func (c *Client) Stats() map[string]uint64 {
	s := &c.stats
	return map[string]uint64{
		StatCDSUpdateSuccess:  s.success[kindCluster].Load(),
		StatCDSUpdateRejected: s.rejected[kindCluster].Load(),
		StatLDSUpdateSuccess:  s.success[kindListener].Load(),
		StatLDSUpdateRejected: s.rejected[kindListener].Load(),
		StatUpdateAttempt:     s.attempts.Load(),
		StatConnectedState:    s.connected.Load(),
	}
}
