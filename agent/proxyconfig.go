package agent

import (
	"encoding/json"
	"fmt"
	"net"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// ProxyConfig is the part of Istio's ProxyConfig (mesh config
// defaultConfig, the PROXY_CONFIG variable the injector sets) that meshtun
// acts on. Durations are Go durations, ports plain numbers.
type ProxyConfig struct {
	// DiscoveryAddress is the xDS server, host:port (istiod's plaintext
	// port by default).
	DiscoveryAddress string
	// DrainDuration: flows on a listener an update removes go on this long
	// (the proxy's --drain-duration).
	DrainDuration time.Duration
	// TerminationDrainDuration: on SIGTERM, active flows may run this long
	// before the proxy exits.
	TerminationDrainDuration time.Duration
	// ProxyAdminPort is the proxy's admin port on 127.0.0.1.
	ProxyAdminPort int
	// StatusPort is the agent's status port: merged Prometheus metrics,
	// health, /quitquitquit.
	StatusPort int
	// Concurrency is the proxy's --concurrency. Istio's 0 means every
	// core; unset means meshtun's default, 1, which measured best on a
	// 2-core pod.
	Concurrency int
	// HoldApplicationUntilProxyStarts is reported in the node metadata;
	// the injector acts on it by ordering containers and adding a
	// postStart `meshtun agent wait`.
	HoldApplicationUntilProxyStarts bool
}

// defaultProxyConfig is Istio's default for the fields meshtun reads,
// except Concurrency (see ProxyConfig).
func defaultProxyConfig() ProxyConfig {
	return ProxyConfig{
		DiscoveryAddress:         "istiod.istio-system.svc:15010",
		DrainDuration:            45 * time.Second,
		TerminationDrainDuration: 5 * time.Second,
		ProxyAdminPort:           15000,
		StatusPort:               15020,
		Concurrency:              1,
	}
}

// proxyConfigFields are the fields meshtun acts on, in the order they are
// reported.
var proxyConfigFields = []string{
	"discoveryAddress", "drainDuration", "terminationDrainDuration", "proxyAdminPort",
	"statusPort", "concurrency", "holdApplicationUntilProxyStarts",
}

// istioOnlyFields are ProxyConfig fields Istio defines that meshtun does
// not act on (tracing, stats, TLS to the control plane, ...). The injector
// and mesh config set several of them by default, so they are reported as
// warnings instead of failing the pod; any other name is a typo and an
// error.
var istioOnlyFields = []string{
	"configPath", "binaryPath", "serviceCluster", "parentShutdownDuration", "discoveryRefreshDelay",
	"zipkinAddress", "statsdUdpAddress", "envoyMetricsServiceAddress", "availabilityZone",
	"controlPlaneAuthPolicy", "customConfigFile", "statNameLength", "proxyBootstrapTemplatePath",
	"interceptionMode", "tracing", "sds", "envoyAccessLogService", "envoyMetricsService",
	"proxyMetadata", "extraStatTags", "gatewayTopology", "meshId", "readinessProbe",
	"proxyStatsMatcher", "caCertificatesPem", "image", "privateKeyProvider", "tracingServiceName",
	"fileFlushInterval", "fileFlushMinSizeKb", "runtimeValues", "proxyHeaders", "caCertificatePem",
}

// applyProxyConfig decodes a ProxyConfig document (YAML or JSON) named
// source in errors, and sets on pc the fields it has. It returns the
// proxyMetadata map (ISTIO_META_* entries become node metadata, as in
// Istio) and warnings about fields meshtun ignores.
func applyProxyConfig(pc *ProxyConfig, doc []byte, source string) (meta map[string]string, warnings []string, err error) {
	js, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: not valid YAML or JSON: %w", source, err)
	}
	var fields map[string]json.RawMessage
	if s := strings.TrimSpace(string(js)); s == "null" || s == "" {
		return nil, nil, nil
	}
	if err := json.Unmarshal(js, &fields); err != nil {
		return nil, nil, fmt.Errorf("%s: want a ProxyConfig object: %w", source, err)
	}
	names := make([]string, 0, len(fields))
	for k := range fields {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, name := range names {
		raw := fields[name]
		field := source + ": " + name
		switch name {
		case "discoveryAddress":
			var s string
			if err := json.Unmarshal(raw, &s); err != nil {
				return nil, nil, fmt.Errorf("%s: want a host:port string, got %s", field, raw)
			}
			if err := checkHostPort(s); err != nil {
				return nil, nil, fmt.Errorf("%s: %w", field, err)
			}
			pc.DiscoveryAddress = s
		case "drainDuration", "terminationDrainDuration":
			d, err := parseDuration(raw)
			if err != nil {
				return nil, nil, fmt.Errorf("%s: %w", field, err)
			}
			if name == "drainDuration" {
				if d == 0 {
					return nil, nil, fmt.Errorf("%s: must be more than 0s", field)
				}
				pc.DrainDuration = d
			} else {
				pc.TerminationDrainDuration = d
			}
		case "proxyAdminPort", "statusPort":
			p, err := parsePort(raw)
			if err != nil {
				return nil, nil, fmt.Errorf("%s: %w", field, err)
			}
			if name == "proxyAdminPort" {
				pc.ProxyAdminPort = p
			} else {
				pc.StatusPort = p
			}
		case "concurrency":
			n, err := parseInt(raw)
			if err != nil || n < 0 || n > 1024 {
				return nil, nil, fmt.Errorf("%s: want a number of workers 0..1024 (0: every core), got %s", field, raw)
			}
			if n == 0 {
				// Every core the pod may use: GOMAXPROCS follows the
				// cgroup's CPU limit (Go 1.25+), NumCPU would count the node's.
				n = runtime.GOMAXPROCS(0)
			}
			pc.Concurrency = n
		case "holdApplicationUntilProxyStarts":
			var b bool
			if err := json.Unmarshal(raw, &b); err != nil {
				return nil, nil, fmt.Errorf("%s: want true or false, got %s", field, raw)
			}
			pc.HoldApplicationUntilProxyStarts = b
		case "proxyMetadata":
			if err := json.Unmarshal(raw, &meta); err != nil {
				return nil, nil, fmt.Errorf("%s: want a map of strings: %w", field, err)
			}
		default:
			if !slices.Contains(istioOnlyFields, name) {
				return nil, nil, fmt.Errorf("%s: unknown field (meshtun reads %s; other Istio ProxyConfig fields are ignored)",
					field, strings.Join(proxyConfigFields, ", "))
			}
			warnings = append(warnings, fmt.Sprintf("%s: not supported by meshtun, ignored", field))
		}
	}
	return meta, warnings, nil
}

// parseDuration reads a duration as Istio's YAML writes it ("45s",
// "1m30s", "0.5s"), which protobuf's JSON form ("45s") is a case of.
func parseDuration(raw json.RawMessage) (time.Duration, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return 0, fmt.Errorf("want a duration such as \"5s\", got %s", raw)
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("want a duration such as \"5s\", got %q", s)
	}
	if d < 0 {
		return 0, fmt.Errorf("negative duration %q", s)
	}
	return d, nil
}

// parseInt reads a JSON number, or a string holding one (YAML and protobuf
// JSON write int64s as strings).
func parseInt(raw json.RawMessage) (int, error) {
	var n json.Number
	if err := json.Unmarshal(raw, &n); err != nil {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return 0, err
		}
		n = json.Number(s)
	}
	v, err := strconv.Atoi(n.String())
	return v, err
}

func parsePort(raw json.RawMessage) (int, error) {
	p, err := parseInt(raw)
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("want a port number 1..65535, got %s", raw)
	}
	return p, nil
}

// checkHostPort validates an xDS server address: a host name or IP and a
// port.
func checkHostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("want host:port, got %q", s)
	}
	if host == "" {
		return fmt.Errorf("%q has no host", s)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%q: port %q is not a port number", s, port)
	}
	return nil
}

// metadata is the PROXY_CONFIG entry of the node metadata: the effective
// values, in Istio's field names and formats.
func (pc ProxyConfig) metadata() map[string]any {
	return map[string]any{
		"discoveryAddress":                pc.DiscoveryAddress,
		"drainDuration":                   protoDuration(pc.DrainDuration),
		"terminationDrainDuration":        protoDuration(pc.TerminationDrainDuration),
		"proxyAdminPort":                  pc.ProxyAdminPort,
		"statusPort":                      pc.StatusPort,
		"concurrency":                     pc.Concurrency,
		"holdApplicationUntilProxyStarts": pc.HoldApplicationUntilProxyStarts,
	}
}

// protoDuration formats d as protobuf's JSON Duration ("45s", "0.500s").
func protoDuration(d time.Duration) string {
	s := strconv.FormatFloat(d.Seconds(), 'f', -1, 64)
	return s + "s"
}
