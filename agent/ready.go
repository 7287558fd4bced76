package agent

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// xdsStatsFilter is pilot-agent's readiness query: the LDS and CDS update
// counters (istio pilot/cmd/pilot-agent/status/util/stats.go).
const xdsStatsFilter = `^(cluster_manager\.cds|listener_manager\.lds)\.(update_success|update_rejected)$`

// prober asks the proxy's admin API whether it serves, the way
// pilot-agent asks Envoy.
type prober struct {
	admin  string // host:port or unix:/path
	xds    bool
	client *http.Client
}

// newProber probes the admin API at admin (host:port or unix:/path); xds
// says whether readiness also needs the first xDS configuration.
func newProber(admin string, xds bool) *prober {
	network, addr := "tcp", admin
	if p, ok := strings.CutPrefix(admin, "unix:"); ok {
		network, addr = "unix", p
	}
	return &prober{admin: admin, xds: xds, client: &http.Client{
		Timeout: 2 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, network, addr)
			},
			DisableKeepAlives: true, // a restarted proxy is a new server
		},
	}}
}

// Admin is the admin address probed.
func (p *prober) Admin() string { return p.admin }

// Get fetches path from the admin API and returns the status and body.
func (p *prober) Get(ctx context.Context, path string) (int, []byte, error) {
	return p.Do(ctx, http.MethodGet, path)
}

// Do sends method path to the proxy's admin; the status and body.
func (p *prober) Do(ctx context.Context, method, path string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	return resp.StatusCode, body, err
}

// Live reports whether the proxy serves: its admin /ready answers 200
// (LIVE). Otherwise the error carries the state and what meshtun's proxy
// says it waits for, on one line ("503 INITIALIZING: waiting for secret
// ROOTCA from sds-grpc"), as the agent's own readiness names its missing
// secret.
func (p *prober) Live(ctx context.Context) error {
	code, body, err := p.Get(ctx, "/ready")
	if err != nil {
		return fmt.Errorf("proxy admin %s: %w", p.admin, err)
	}
	if code != http.StatusOK {
		return fmt.Errorf("proxy admin /ready: %d %s", code, strings.ReplaceAll(strings.TrimSpace(string(body)), "\n", ": "))
	}
	return nil
}

// Ready reports whether the proxy can take the pod's traffic: when it is
// configured over xDS, it has accepted its first listeners and clusters
// (both update_success counters above 0, as pilot-agent requires), and it
// is live.
func (p *prober) Ready(ctx context.Context) error {
	if !p.xds {
		return p.Live(ctx)
	}
	// As pilot-agent: the configuration first (it says what is missing),
	// then the server state.
	code, body, err := p.Get(ctx, "/stats?usedonly&filter="+url.QueryEscape(xdsStatsFilter))
	if err != nil {
		return fmt.Errorf("proxy admin %s: %w", p.admin, err)
	}
	if code != http.StatusOK {
		return fmt.Errorf("proxy admin /stats: %d", code)
	}
	st := parseStats(body)
	cds, lds := st["cluster_manager.cds.update_success"], st["listener_manager.lds.update_success"]
	if cds > 0 && lds > 0 {
		return p.Live(ctx)
	}
	return fmt.Errorf("config not received from the xDS server (cds updates: %d successful, %d rejected; lds updates: %d successful, %d rejected)",
		cds, st["cluster_manager.cds.update_rejected"], lds, st["listener_manager.lds.update_rejected"])
}

// parseStats reads Envoy's text /stats: "name: value" lines.
func parseStats(b []byte) map[string]uint64 {
	out := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), ": ")
		if !ok {
			continue
		}
		if v, err := strconv.ParseUint(strings.TrimSpace(val), 10, 64); err == nil {
			out[strings.TrimSpace(name)] = v
		}
	}
	return out
}
