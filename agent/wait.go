package agent

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// DefaultReadyURL is what `meshtun agent wait` polls: the readiness
// endpoint Kubernetes probes.
const DefaultReadyURL = "http://localhost:15021/healthz/ready"

// Wait polls url every period until it answers 200 or ctx ends; it is
// pilot-agent's `wait`, which the injector runs as the application
// container's postStart hook under holdApplicationUntilProxyStarts, so
// the application starts only once its traffic can flow. The error says
// what the endpoint last answered.
func Wait(ctx context.Context, url string, period time.Duration) error {
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	last := "no answer yet"
	tick := time.NewTicker(period)
	defer tick.Stop()
	for {
		reqCtx, cancel := context.WithTimeout(ctx, min(period, time.Second)+500*time.Millisecond)
		req, err := http.NewRequestWithContext(reqCtx, http.MethodGet, url, nil)
		if err != nil {
			cancel()
			return err
		}
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				cancel()
				return nil
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(body)))
		} else if ctx.Err() == nil {
			last = err.Error()
		}
		cancel()
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %s", url, last)
		case <-tick.C:
		}
	}
}
