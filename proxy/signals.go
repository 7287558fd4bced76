package proxy

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// Signals receives the proxy process's signals from the start of the run
// and sorts them: SIGHUPs coalesce into one pending reload (applied once
// the configuration source exists, so one that arrives during startup
// waits for it), SIGTERM/SIGINT queue in order (the first drains, a
// second ends the drain). Its goroutine is owned by whoever called
// NotifySignals and ends with Stop.
type Signals struct {
	in     chan os.Signal
	reload chan struct{}  // a reload is pending
	term   chan os.Signal // SIGTERM/SIGINT received, in order
	quit   chan struct{}
	done   chan struct{}
	notify bool // in is registered with signal.Notify
}

// NotifySignals starts receiving SIGHUP, SIGTERM and SIGINT. Call it first
// thing in main: a SIGHUP the agent sends while the proxy starts (a watched
// file changed) must queue a reload, not kill the process by the default
// action.
func NotifySignals() *Signals {
	in := make(chan os.Signal, 8)
	signal.Notify(in, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	s := startSignals(in)
	s.notify = true
	return s
}

// startSignals sorts the signals arriving on in.
func startSignals(in chan os.Signal) *Signals {
	s := &Signals{in: in, reload: make(chan struct{}, 1), term: make(chan os.Signal, 2),
		quit: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	return s
}

func (s *Signals) run() {
	defer close(s.done)
	for {
		select {
		case <-s.quit:
			return
		case sig := <-s.in:
			if sig == syscall.SIGHUP {
				select {
				case s.reload <- struct{}{}:
				default: // one is pending already: it reads the latest file
				}
				continue
			}
			select {
			case s.term <- sig:
			default: // the first ends the run, the second the drain: more change nothing
			}
		}
	}
}

// Stop stops receiving signals (they get their default action again) and
// ends the sorting goroutine.
func (s *Signals) Stop() {
	if s.notify {
		signal.Stop(s.in)
	}
	close(s.quit)
	<-s.done
}

// reloads and terms are the channels the run loop selects on; nil (never
// ready) without Signals.
func (s *Signals) reloads() <-chan struct{} {
	if s == nil {
		return nil
	}
	return s.reload
}

func (s *Signals) terms() <-chan os.Signal {
	if s == nil {
		return nil
	}
	return s.term
}

// awaitDrainEnd returns a context that ends at timeout or when a second
// SIGTERM/SIGINT arrives; a SIGHUP meanwhile is ignored (the proxy is
// leaving, and a reload must not cut the drain short). wait ends the
// watch and waits for its goroutine.
func (s *Signals) awaitDrainEnd(timeout time.Duration, log zerolog.Logger) (ctx context.Context, wait func()) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	if s == nil {
		return ctx, cancel
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case sig := <-s.term:
				log.Warn().Str("signal", sig.String()).Msg("second signal: ending the drain now")
				cancel()
				return
			case <-s.reload:
				log.Info().Msg("SIGHUP while draining: ignored")
			case <-ctx.Done():
				return
			}
		}
	}()
	return ctx, func() {
		cancel()
		<-done
	}
}
