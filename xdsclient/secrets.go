package xdsclient

import (
	"errors"
	"maps"
	"slices"
	"strconv"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// SecretApplier is implemented by an Applier that takes SDS secrets over the
// ADS stream (`sds_config: {ads: {}}`). Secrets are not part of the
// configuration lanes: a listener or cluster naming one is accepted without it
// and warms in the proxy until it arrives (Envoy's model), so they are handed
// over as they come, each response on its own.
type SecretApplier interface {
	// ApplySecrets stores the secrets of one response (version_info or,
	// in delta, system_version_info). It returns ResourceErrors naming
	// every invalid secret, having stored the valid ones (an invalid one
	// keeps its last good version); the response is then NACKed with
	// them. Any other error NACKs the whole response.
	ApplySecrets(version string, secrets []*tlsv3.Secret) error
}

// WatchSecrets makes names the secrets subscribed to over ADS: the current
// stream asks for them at once, a new stream on its first requests. Secrets
// that arrive go to the Applier's ApplySecrets. It does not block: the proxy
// calls it from inside Apply.
func (c *Client) WatchSecrets(names []string) {
	set := make(map[string]bool, len(names))
	for _, n := range names {
		set[n] = true
	}
	if old := c.secretNames.Load(); old != nil && maps.Equal(*old, set) {
		return
	}
	c.secretNames.Store(&set)
	select {
	case c.secretsChanged <- struct{}{}:
	default: // the session will read the latest names
	}
}

// wantedSecrets is the secret subscription WatchSecrets left.
func (c *Client) wantedSecrets() map[string]bool {
	if p := c.secretNames.Load(); p != nil {
		return maps.Clone(*p)
	}
	return map[string]bool{}
}

// resubscribeSecrets follows WatchSecrets on the session goroutine.
func (s *session) resubscribeSecrets() {
	want := s.c.wantedSecrets()
	if maps.Equal(want, s.subs[kindSecret]) {
		return
	}
	s.subs[kindSecret] = want
	s.request(kindSecret)
}

// handleSecrets hands one Secret response to the Applier, each secret judged
// on its own: one that does not decode or that the Applier refuses is named
// in the NACK, the others are stored.
func (s *session) handleSecrets(r *response) {
	s.c.stats.attempts.Add(1)
	h := []held{{kind: kindSecret, nonce: r.nonce, version: r.version}}
	sa, ok := s.c.applier.(SecretApplier)
	if !ok {
		s.reject(h, errors.New("secrets over ADS: this client takes none"))
		return
	}
	var errs ResourceErrors
	var secs []*tlsv3.Secret
	for i, raw := range r.resources {
		e, name, err := decodeOne(kindSecret, raw, nil)
		switch {
		case err != nil && name == "":
			errs = append(errs, ResourceError{TypeURL: SecretType, Name: "resources[" + strconv.Itoa(i) + "]", Err: err})
		case err != nil:
			errs = append(errs, ResourceError{TypeURL: SecretType, Name: name, Err: err})
		case e == nil || !s.subs[kindSecret][name]:
			// a heartbeat, or a secret no longer asked for
		default:
			secs = append(secs, e.msg.(*tlsv3.Secret))
		}
	}
	if err := sa.ApplySecrets(r.version, secs); err != nil {
		es, ok := AsResourceErrors(err)
		if !ok {
			s.reject(h, err)
			return
		}
		errs = append(errs, es...)
	}
	if len(errs) > 0 {
		slices.SortStableFunc(errs, func(a, b ResourceError) int {
			switch {
			case a.Name < b.Name:
				return -1
			case a.Name > b.Name:
				return 1
			}
			return 0
		})
		s.c.setLastError(errs)
		s.c.stats.rejected[kindSecret].Add(1)
		s.log.Warn().Err(errs).Str("version", r.version).Msg("xds: secrets rejected: the others are stored, a rejected one keeps its last good version")
		s.nack(kindSecret, h, errs)
		return
	}
	s.ackGroup(kindSecret, h)
}
