package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"

	"github.com/meshtun/meshtun/agent/caclient"
	"github.com/meshtun/meshtun/mesh/bootstrap"
)

// The environment the Istio sidecar injector gives the proxy container.
const (
	envPodName        = "POD_NAME"
	envPodNamespace   = "POD_NAMESPACE"
	envInstanceIP     = "INSTANCE_IP"
	envInstanceIPs    = "INSTANCE_IPS"
	envServiceAccount = "SERVICE_ACCOUNT"
	envProxyConfig    = "PROXY_CONFIG"
	// envBootstrapOverride names an Envoy bootstrap fragment merged over
	// the generated one (Istio's ISTIO_BOOTSTRAP_OVERRIDE).
	envBootstrapOverride = "ISTIO_BOOTSTRAP_OVERRIDE"

	metaPrefix      = "ISTIO_META_"
	envLabelsJSON   = "ISTIO_METAJSON_LABELS"
	envAnnotsJSON   = "ISTIO_METAJSON_ANNOTATIONS"
	envPodPorts     = metaPrefix + "POD_PORTS"
	envInterception = metaPrefix + "INTERCEPTION_MODE"
	envIstioVersion = metaPrefix + "ISTIO_VERSION"
	envClusterID    = metaPrefix + "CLUSTER_ID"
	envWorkloadName = metaPrefix + "WORKLOAD_NAME"
)

// istioVersion is reported as ISTIO_VERSION unless ISTIO_META_ISTIO_VERSION
// says otherwise: istiod gates what it generates on the proxy's version,
// and this is the release whose sidecar configuration meshtun follows.
const istioVersion = "1.26.0"

// Default downward-API files of an injected pod.
const (
	DefaultLabelsFile      = "/etc/istio/pod/labels"
	DefaultAnnotationsFile = "/etc/istio/pod/annotations"
)

// Sources says where the bootstrap's inputs come from besides the
// environment. Every file is re-read by Load, so a reload sees changes.
type Sources struct {
	// Environ is the process environment, KEY=VALUE (os.Environ()).
	Environ []string
	// ProxyConfigFile is an optional ProxyConfig document (YAML or JSON,
	// like mesh config's defaultConfig), applied over Istio's defaults;
	// PROXY_CONFIG overrides it field by field.
	ProxyConfigFile string
	// LabelsFile and AnnotationsFile are the downward-API files (key="value"
	// lines); a file that does not exist means none.
	LabelsFile, AnnotationsFile string
	// DiscoveryAddress, when set, overrides ProxyConfig's.
	DiscoveryAddress string
	// ExtraBootstrap is an Envoy bootstrap fragment (JSON or YAML) merged
	// over the generated bootstrap: static listeners and clusters are
	// added, single fields replaced. Default: $ISTIO_BOOTSTRAP_OVERRIDE.
	ExtraBootstrap string
	// NoXDS leaves out dynamic_resources and the xds-grpc cluster: the
	// proxy serves the static resources of ExtraBootstrap only.
	NoXDS bool
	// Domain is the DNS domain of the node id; default <ns>.svc.cluster.local.
	Domain string
	// ReadinessPort is reported as ENVOY_STATUS_PORT; default 15021.
	ReadinessPort int
	// RootCertFile verifies istiod on its TLS port (default Istio's
	// ./var/run/secrets/istio/root-cert.pem, relative to the working
	// directory as in the sidecar); TokenFile is the bearer token sent to
	// it (default ./var/run/secrets/tokens/istio-token).
	RootCertFile, TokenFile string
	// Identity is the workload certificate's source and SDS socket.
	Identity IdentityOptions
}

// SecurePort is istiod's TLS port (CA and xDS, bearer token); a discovery
// address on it is spoken to over TLS, as pilot-agent does with
// controlPlaneAuthPolicy MUTUAL_TLS, Istio's default. 15010 stays plaintext.
const SecurePort = "15012"

// XDSTLS is how the proxy reaches istiod's TLS port: the server verified
// against RootFile with ServerName, and the token re-read from TokenFile
// on every stream.
type XDSTLS struct {
	RootFile, ServerName, TokenFile string
}

// Inputs is everything the bootstrap and the capture exclusions are built
// from, read and validated.
type Inputs struct {
	PodName, Namespace, ServiceAccount string
	InstanceIPs                        []netip.Addr
	Domain                             string
	Labels, Annotations                map[string]string
	// Meta holds ISTIO_META_* variables (and proxyMetadata entries),
	// without the prefix: node metadata as Istio passes it through.
	Meta             map[string]string
	InterceptionMode string
	IstioVersion     string
	ClusterID        string
	PodPorts         string // ISTIO_META_POD_PORTS, a JSON list as a string
	ProxyConfig      ProxyConfig
	ReadinessPort    int
	NoXDS            bool
	// XDSTLS is set when the discovery address is istiod's TLS port.
	XDSTLS *XDSTLS
	// IdentityMode is the workload identity decided (IdentityCA,
	// IdentityFiles or IdentityNone).
	IdentityMode string
	identity     *identityPlan
	// env is the environment with proxyMetadata's entries filled in: the
	// CA client's settings come from it as pilot-agent's do.
	env map[string]string
	// appProbers are the application's probes the injector moved to the
	// status port (ISTIO_KUBE_APP_PROBERS), validated.
	appProbers *appProbers
	// Extra is the parsed ExtraBootstrap, nil without one.
	Extra     *bootstrapv3.Bootstrap
	ExtraPath string
	// Exclusions are the capture exclusions the pod's annotations ask for.
	Exclusions Exclusions
	// Warnings are inputs that were ignored, for the log.
	Warnings []string
	// ProxyConfigNotActedOn are the ProxyConfig fields the file or
	// PROXY_CONFIG set that meshtun accepts and carries to istiod but does
	// not act on (JSON names, sorted); the agent lists them once at start.
	ProxyConfigNotActedOn []string
}

// Load reads and validates the inputs. Every error names the variable,
// file or annotation at fault and the value.
func Load(src Sources) (*Inputs, error) {
	env := environ(src)
	pc, notActedOn, err := loadProxyConfig(src, env)
	if err != nil {
		return nil, err
	}
	// proxyMetadata entries are environment variables of the proxy
	// container in Istio (the injector adds them, under the container's
	// own variables): they fill in the variables the environment lacks.
	for k, v := range pc.msg.GetProxyMetadata() {
		if _, set := env[k]; !set {
			env[k] = v
		}
	}
	in := &Inputs{
		PodName:        env[envPodName],
		Namespace:      env[envPodNamespace],
		ServiceAccount: env[envServiceAccount],
		Meta:           map[string]string{},
		IstioVersion:   istioVersion,
		ClusterID:      "Kubernetes",
		ProxyConfig:    pc,
		ReadinessPort:  src.ReadinessPort,
		NoXDS:          src.NoXDS,

		ProxyConfigNotActedOn: notActedOn,
	}
	if in.ReadinessPort == 0 {
		in.ReadinessPort = defaultReadinessPort
	}
	for _, req := range []struct{ name, val string }{{envPodName, in.PodName}, {envPodNamespace, in.Namespace}} {
		if req.val == "" {
			return nil, fmt.Errorf("%s: required (the injector sets it from the downward API)", req.name)
		}
		if strings.ContainsAny(req.val, "~ \t\n/") {
			return nil, fmt.Errorf("%s: %q is not a Kubernetes name", req.name, req.val)
		}
	}
	in.Domain = src.Domain
	if in.Domain == "" {
		in.Domain = in.Namespace + ".svc.cluster.local"
	}
	if in.InstanceIPs, err = instanceIPs(env); err != nil {
		return nil, err
	}

	var podIP netip.Addr
	if len(in.InstanceIPs) > 0 {
		podIP = in.InstanceIPs[0]
	}
	if in.appProbers, err = parseAppProbers(env[envAppProbers], podIP, in.ProxyConfig.StatusPort); err != nil {
		return nil, err
	}

	if src.DiscoveryAddress != "" {
		if err := checkHostPort(src.DiscoveryAddress); err != nil {
			return nil, fmt.Errorf("discovery address: %w", err)
		}
		in.ProxyConfig.DiscoveryAddress = src.DiscoveryAddress
	}
	in.env = env
	if !in.NoXDS {
		if in.XDSTLS, err = xdsTLS(src, env, in.ProxyConfig.DiscoveryAddress); err != nil {
			return nil, err
		}
	}
	if in.identity, err = planIdentity(src.Identity, src, in); err != nil {
		return nil, err
	}
	in.IdentityMode = in.identity.mode
	pc = in.ProxyConfig
	if pc.ProxyAdminPort == pc.StatusPort || pc.ProxyAdminPort == in.ReadinessPort || pc.StatusPort == in.ReadinessPort {
		return nil, fmt.Errorf("%s: proxyAdminPort %d, statusPort %d and the readiness port %d must differ",
			envProxyConfig, pc.ProxyAdminPort, pc.StatusPort, in.ReadinessPort)
	}
	// ISTIO_META_* variables, proxyMetadata's among them, are node
	// metadata (bootstrap.GetNodeMetaData).
	for k, v := range env {
		if name, ok := strings.CutPrefix(k, metaPrefix); ok && name != "" {
			in.Meta[name] = v
		}
	}

	if in.InterceptionMode, err = interceptionMode(env); err != nil {
		return nil, err
	}
	if v := env[envIstioVersion]; v != "" {
		in.IstioVersion = v
	}
	if v := env[envClusterID]; v != "" {
		in.ClusterID = v
	}
	if v, ok := env[envPodPorts]; ok {
		var ports []struct {
			ContainerPort int `json:"containerPort"`
		}
		if err := json.Unmarshal([]byte(v), &ports); err != nil {
			return nil, fmt.Errorf("%s: want a JSON list of container ports such as "+
				`[{"name":"http","containerPort":8080,"protocol":"TCP"}]: %v`, envPodPorts, err)
		}
		for i, p := range ports {
			if p.ContainerPort < 1 || p.ContainerPort > 65535 {
				return nil, fmt.Errorf("%s: [%d].containerPort: %d is not a port number", envPodPorts, i, p.ContainerPort)
			}
		}
		in.PodPorts = v
	}

	// Labels and annotations: the JSON variables, then the downward-API
	// files, which win (they follow the pod's changes).
	if in.Labels, err = podInfo(env, envLabelsJSON, src.LabelsFile); err != nil {
		return nil, err
	}
	delete(in.Labels, "pod-template-hash") // differs per ReplicaSet, says nothing of the workload
	if in.Annotations, err = podInfo(env, envAnnotsJSON, src.AnnotationsFile); err != nil {
		return nil, err
	}
	var w []string
	if in.Exclusions, w, err = exclusionsFrom(in.Annotations, annotationSource(env, src.AnnotationsFile)); err != nil {
		return nil, err
	}
	in.Warnings = append(in.Warnings, w...)

	extra := src.ExtraBootstrap
	if extra == "" {
		extra = env[envBootstrapOverride]
	}
	if extra != "" {
		if in.Extra, err = bootstrap.Load(extra); err != nil {
			return nil, fmt.Errorf("extra bootstrap: %w", err)
		}
		in.ExtraPath = extra
	}
	return in, nil
}

// loadProxyConfig decodes the ProxyConfig file, then PROXY_CONFIG, over
// Istio's defaults, as pilot-agent applies PROXY_CONFIG over the mesh
// config's defaultConfig. notActedOn are the fields they set that meshtun
// does not use.
func loadProxyConfig(src Sources, env map[string]string) (pc ProxyConfig, notActedOn []string, err error) {
	msg := defaultProxyConfigMessage()
	var set []string
	apply := func(doc []byte, source string) error {
		one, removed, err := decodeProxyConfig(doc, source)
		if err != nil {
			return err
		}
		overlayProxyConfig(msg, one)
		set = append(append(set, setFields(one)...), removed...)
		return nil
	}
	if src.ProxyConfigFile != "" {
		doc, err := os.ReadFile(src.ProxyConfigFile)
		if err != nil {
			return ProxyConfig{}, nil, fmt.Errorf("proxy config file: %w", err)
		}
		if err := apply(doc, "proxy config file "+src.ProxyConfigFile); err != nil {
			return ProxyConfig{}, nil, err
		}
	}
	if v, ok := env[envProxyConfig]; ok {
		if err := apply([]byte(v), envProxyConfig); err != nil {
			return ProxyConfig{}, nil, err
		}
	}
	for _, f := range set {
		if !slices.Contains(actedOn, f) && !slices.Contains(notActedOn, f) {
			notActedOn = append(notActedOn, f)
		}
	}
	slices.Sort(notActedOn)
	return effectiveProxyConfig(msg), notActedOn, nil
}

// defaultReadinessPort is Istio's sidecar readiness port (/healthz/ready).
const defaultReadinessPort = 15021

// interceptionMode is ISTIO_META_INTERCEPTION_MODE, REDIRECT by default.
func interceptionMode(env map[string]string) (string, error) {
	v, ok := env[envInterception]
	if !ok {
		return "REDIRECT", nil
	}
	switch v {
	case "REDIRECT", "TPROXY", "NONE":
		return v, nil
	}
	return "", fmt.Errorf("%s: %q: want REDIRECT, TPROXY or NONE", envInterception, v)
}

// environ is src.Environ as a map.
func environ(src Sources) map[string]string {
	env := map[string]string{}
	for _, kv := range src.Environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	return env
}

// instanceIPs reads INSTANCE_IP then INSTANCE_IPS (comma separated),
// without duplicates; at least one is required: it is the node id.
func instanceIPs(env map[string]string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, name := range []string{envInstanceIP, envInstanceIPs} {
		v, ok := env[name]
		if !ok {
			continue
		}
		for _, tok := range strings.Split(v, ",") {
			tok = strings.TrimSpace(tok)
			if tok == "" {
				continue
			}
			ip, err := netip.ParseAddr(tok)
			if err != nil || ip.Zone() != "" {
				return nil, fmt.Errorf("%s: %q is not an IP address", name, tok)
			}
			ip = ip.Unmap()
			if !ip.IsGlobalUnicast() {
				return nil, fmt.Errorf("%s: %v is not a unicast pod address", name, ip)
			}
			if !slices.Contains(out, ip) {
				out = append(out, ip)
			}
		}
	}
	if len(out) == 0 {
		return nil, errors.New(envInstanceIP + " or " + envInstanceIPs + ": required (the pod's IP, from the downward API status.podIP)")
	}
	return out, nil
}

// podInfo merges a JSON map variable and a downward-API file.
func podInfo(env map[string]string, jsonVar, file string) (map[string]string, error) {
	out := map[string]string{}
	if v, ok := env[jsonVar]; ok && v != "" {
		if err := json.Unmarshal([]byte(v), &out); err != nil {
			return nil, fmt.Errorf("%s: want a JSON object of strings: %v", jsonVar, err)
		}
	}
	if file == "" {
		return out, nil
	}
	b, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("pod info: %w", err)
	}
	m, err := parseDownwardAPI(string(b))
	if err != nil {
		return nil, fmt.Errorf("pod info %s: %w", file, err)
	}
	for k, v := range m {
		out[k] = v
	}
	return out, nil
}

func annotationSource(env map[string]string, file string) string {
	if file != "" {
		if _, err := os.Stat(file); err == nil {
			return file
		}
	}
	if _, ok := env[envAnnotsJSON]; ok {
		return envAnnotsJSON
	}
	return "annotations"
}

// xdsTLS is the TLS to the discovery address when it is istiod's secure
// port, else nil. ServerName is ISTIOD_SAN, else the address's host
// ("localhost" meaning istiod.istio-system.svc), as pilot-agent's.
func xdsTLS(src Sources, env map[string]string, addr string) (*XDSTLS, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("discovery address %q: %w", addr, err)
	}
	if port != SecurePort {
		return nil, nil
	}
	t := &XDSTLS{RootFile: src.RootCertFile, TokenFile: src.TokenFile, ServerName: env["ISTIOD_SAN"]}
	if t.RootFile == "" {
		t.RootFile = caclient.DefaultRootFile
	}
	if t.TokenFile == "" {
		t.TokenFile = caclient.DefaultTokenFile
	}
	if t.ServerName == "" {
		t.ServerName = host
		if host == "localhost" {
			t.ServerName = "istiod.istio-system.svc"
		}
	}
	return t, nil
}
