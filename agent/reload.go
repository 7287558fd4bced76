package agent

import (
	"fmt"
	"slices"
	"syscall"
)

// watched are the files the bootstrap is built from, and the extra ones.
func (a *agent) watched(in *Inputs) []string {
	src := a.cfg.Sources
	var out []string
	for _, p := range append([]string{src.ProxyConfigFile, src.LabelsFile, src.AnnotationsFile, in.ExtraPath}, a.cfg.Watch...) {
		if p != "" && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// reload re-reads the inputs after a watched file changed, rewrites the
// bootstrap and has the proxy apply it in process (SIGHUP): flows in
// progress keep their configuration. Invalid new inputs change nothing.
func (a *agent) reload(changed []string) {
	log := a.log.With().Strs("changed", changed).Logger()
	in, js, b, err := PrepareBootstrap(a.cfg.Sources)
	if err != nil {
		a.reloadErrors.Add(1)
		log.Error().Err(err).Msg("reload: the new inputs are invalid; the proxy keeps its configuration")
		return
	}
	a.mu.Lock()
	old := a.in
	a.mu.Unlock()
	for _, w := range in.Warnings {
		log.Warn().Msg(w)
	}
	if op, np := old.ProxyConfig, in.ProxyConfig; op.ProxyAdminPort != np.ProxyAdminPort || op.Concurrency != np.Concurrency ||
		op.DrainDuration != np.DrainDuration || op.TerminationDrainDuration != np.TerminationDrainDuration {
		log.Warn().Msg("reload: proxyAdminPort, concurrency and the drain durations take effect when the proxy restarts")
	}
	if op, np := old.ProxyConfig, in.ProxyConfig; op.StatusPort != np.StatusPort {
		log.Warn().Msg("reload: statusPort takes effect when the agent restarts")
	}
	if fmt.Sprint(old.Exclusions) != fmt.Sprint(in.Exclusions) {
		log.Warn().Msg("reload: changed capture annotations take effect when the agent restarts")
	}
	if err := writeFile(a.cfg.BootstrapOut, js); err != nil {
		a.reloadErrors.Add(1)
		log.Error().Err(err).Msg("reload")
		return
	}
	a.mu.Lock()
	a.in, a.js, a.b = in, js, b
	a.mu.Unlock()
	signalled := a.sup.Signal(syscall.SIGHUP)
	if signalled {
		a.reloadSignals.Add(1)
	}
	log.Info().Bool("proxy_signalled", signalled).Msg("bootstrap rewritten; proxy reloading")
}
