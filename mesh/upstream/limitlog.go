package upstream

import "time"

// limitWarnEvery spaces the fd-limit warnings: at the limit every new flow
// fails, and a line per flow would be a flood in the proxy's own log.
var limitWarnEvery = 10 * time.Second

// warnLimit logs err unless a warning went out less than limitWarnEvery
// ago; the line counts the failures since the previous one.
func (d *Dialer) warnLimit(err error) {
	d.limitFailed.Add(1)
	now := time.Now().UnixNano()
	last := d.limitWarned.Load()
	if last != 0 && now-last < int64(limitWarnEvery) {
		return
	}
	if !d.limitWarned.CompareAndSwap(last, now) {
		return // another dial is logging
	}
	d.Log.Warn().Err(err).Int64("failed_dials", d.limitFailed.Swap(0)).
		Msg("new upstream connections failing: no file descriptor left; raise the proxy's open-file limit")
}
