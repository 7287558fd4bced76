package controlplane

import (
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	goyaml "go.yaml.in/yaml/v2"
)

// The mesh profile is Istio's MeshConfig, cut down to the fields meshtun
// acts on or will act on, in the document shapes `istioctl` users know:
//
//	apiVersion: meshtun.io/v1alpha1
//	kind: MeshConfig
//	metadata: {name: ...}
//	spec: {outboundTrafficPolicy: {mode: ALLOW_ANY}, connectTimeout: 10s, ...}
//
// or IstioOperator-like, a built-in profile plus overrides:
//
//	apiVersion: install.istio.io/v1alpha1   # or meshtun.io/v1alpha1
//	kind: IstioOperator
//	spec: {profile: demo, meshConfig: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}}
//
// Fields a document leaves out keep the value of its base: the built-in
// `default` for a MeshConfig, spec.profile for an IstioOperator.

// Document identifiers.
const (
	meshtunAPIVersion = "meshtun.io/v1alpha1"
	istioAPIVersion   = "install.istio.io/v1alpha1"
	kindMeshConfig    = "MeshConfig"
	kindIstioOperator = "IstioOperator"
)

// DefaultProfileName is the built-in profile served when none is given.
const DefaultProfileName = "default"

// OutboundMode is MeshConfig.outboundTrafficPolicy.mode: what the
// catch-all of virtualOutbound does with traffic to unregistered
// destinations.
type OutboundMode string

// The outbound traffic policy modes.
const (
	AllowAny     OutboundMode = "ALLOW_ANY"     // PassthroughCluster
	RegistryOnly OutboundMode = "REGISTRY_ONLY" // BlackHoleCluster
)

var outboundModes = []string{string(AllowAny), string(RegistryOnly)}

// UnmarshalJSON accepts exactly the mode names.
func (m *OutboundMode) UnmarshalJSON(b []byte) error {
	s, err := unquote(b)
	if err != nil {
		return err
	}
	for _, c := range outboundModes {
		if s == c {
			*m = OutboundMode(s)
			return nil
		}
	}
	return choiceError(s, outboundModes)
}

// PeerAuthMode is the mTLS mode of a workload's inbound traffic, Istio's
// PeerAuthentication mtls.mode: PERMISSIVE accepts mTLS and plaintext,
// STRICT only mTLS, DISABLE only plaintext. Set mesh-wide in the profile
// (peerAuthentication, as a PeerAuthentication in the root namespace) and
// per workload in the registry (as one with a workload selector).
type PeerAuthMode string

// The peer authentication modes.
const (
	Permissive PeerAuthMode = "PERMISSIVE"
	Strict     PeerAuthMode = "STRICT"
	Disable    PeerAuthMode = "DISABLE"
)

var peerAuthModes = []string{string(Permissive), string(Strict), string(Disable)}

// UnmarshalJSON accepts exactly the mode names.
func (m *PeerAuthMode) UnmarshalJSON(b []byte) error {
	s, err := unquote(b)
	if err != nil {
		return err
	}
	for _, c := range peerAuthModes {
		if s == c {
			*m = PeerAuthMode(s)
			return nil
		}
	}
	return choiceError(s, peerAuthModes)
}

// AccessLogEncoding is MeshConfig.accessLogEncoding.
type AccessLogEncoding string

var accessLogEncodings = []string{"TEXT", "JSON"}

// UnmarshalJSON accepts exactly TEXT or JSON.
func (e *AccessLogEncoding) UnmarshalJSON(b []byte) error {
	s, err := unquote(b)
	if err != nil {
		return err
	}
	for _, c := range accessLogEncodings {
		if s == c {
			*e = AccessLogEncoding(s)
			return nil
		}
	}
	return choiceError(s, accessLogEncodings)
}

func unquote(b []byte) (string, error) {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return "", fmt.Errorf("want a string, got %s", b)
	}
	return s, nil
}

// Duration is a protobuf-JSON duration ("10s", "1.5s"); Go's forms
// ("1m30s", "500ms") are accepted too. It is written in seconds, as
// istioctl prints it.
type Duration time.Duration

// UnmarshalJSON parses a non-negative duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	s, err := unquote(b)
	if err != nil {
		return fmt.Errorf("want a duration such as \"10s\", got %s", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("want a duration such as \"10s\", got %q", s)
	}
	if v < 0 {
		return fmt.Errorf("must not be negative, got %q", s)
	}
	*d = Duration(v)
	return nil
}

// String formats d as protobuf JSON does: seconds with a fraction if any.
func (d Duration) String() string {
	return strconv.FormatFloat(time.Duration(d).Seconds(), 'f', -1, 64) + "s"
}

// MarshalJSON writes the String form.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// MarshalYAML writes the String form.
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

// OutboundTrafficPolicy is MeshConfig.outboundTrafficPolicy.
type OutboundTrafficPolicy struct {
	Mode OutboundMode `json:"mode" yaml:"mode"`
}

// ProxyConfig is MeshConfig.defaultConfig: settings of every sidecar,
// read by the agent that starts the proxy.
type ProxyConfig struct {
	// DrainDuration: flows on a removed or changed listener go on this long.
	DrainDuration Duration `json:"drainDuration" yaml:"drainDuration"`
	// TerminationDrainDuration: how long the proxy drains when the pod stops.
	TerminationDrainDuration Duration `json:"terminationDrainDuration" yaml:"terminationDrainDuration"`
	// Concurrency: data-path processors (Envoy's --concurrency).
	Concurrency int32 `json:"concurrency" yaml:"concurrency"`
}

// MeshConfig is the mesh-wide configuration the control plane generates
// sidecar configuration from. Field names and defaults are Istio's.
type MeshConfig struct {
	OutboundTrafficPolicy OutboundTrafficPolicy `json:"outboundTrafficPolicy" yaml:"outboundTrafficPolicy"`
	// ConnectTimeout is every cluster's connect_timeout.
	ConnectTimeout Duration `json:"connectTimeout" yaml:"connectTimeout"`
	// DNSRefreshRate is the dns_refresh_rate of DNS-resolved external hosts.
	DNSRefreshRate Duration `json:"dnsRefreshRate" yaml:"dnsRefreshRate"`
	// AccessLogFile, when set, adds a file access log to every tcp_proxy
	// and udp_proxy ("/dev/stdout" in the demo profile).
	AccessLogFile     string            `json:"accessLogFile" yaml:"accessLogFile"`
	AccessLogEncoding AccessLogEncoding `json:"accessLogEncoding" yaml:"accessLogEncoding"`
	// EnableAutoMtls: sidecars with a workload identity reach mesh
	// services' endpoints that have one (tlsMode: istio) over mTLS,
	// through the clusters' transport_socket_matches (Istio's auto mTLS).
	EnableAutoMtls bool `json:"enableAutoMtls" yaml:"enableAutoMtls"`
	// PeerAuthentication is the mesh-wide inbound mTLS mode (Istio's
	// PeerAuthentication in the root namespace; PERMISSIVE when there is
	// none); a registry endpoint's peerAuthentication overrides it for
	// that workload.
	PeerAuthentication PeerAuthMode `json:"peerAuthentication" yaml:"peerAuthentication"`
	DefaultConfig      ProxyConfig  `json:"defaultConfig" yaml:"defaultConfig"`
}

// Metadata names a profile. Namespace is accepted so that an IstioOperator
// written for istioctl (metadata.namespace: istio-system) applies as is;
// there is one mesh profile, so it selects nothing.
type Metadata struct {
	Name      string `json:"name" yaml:"name"`
	Namespace string `json:"namespace,omitempty" yaml:"namespace,omitempty"`
}

// Profile is a mesh profile document in its canonical (MeshConfig) form:
// what `meshtun profile dump` prints and the control plane serves.
type Profile struct {
	APIVersion string     `json:"apiVersion" yaml:"apiVersion"`
	Kind       string     `json:"kind" yaml:"kind"`
	Metadata   Metadata   `json:"metadata" yaml:"metadata"`
	Spec       MeshConfig `json:"spec" yaml:"spec"`
}

// operatorDoc is the IstioOperator-like form.
type operatorDoc struct {
	APIVersion string       `json:"apiVersion"`
	Kind       string       `json:"kind"`
	Metadata   Metadata     `json:"metadata"`
	Spec       operatorSpec `json:"spec"`
}

type operatorSpec struct {
	Profile    string     `json:"profile"`
	MeshConfig MeshConfig `json:"meshConfig"`
}

// defaultMesh is Istio's MeshConfig default, for the fields kept here.
func defaultMesh() MeshConfig {
	return MeshConfig{
		OutboundTrafficPolicy: OutboundTrafficPolicy{Mode: AllowAny},
		ConnectTimeout:        Duration(10 * time.Second),
		DNSRefreshRate:        Duration(60 * time.Second),
		AccessLogFile:         "",
		AccessLogEncoding:     "TEXT",
		EnableAutoMtls:        true,
		PeerAuthentication:    Permissive,
		DefaultConfig: ProxyConfig{
			DrainDuration:            Duration(45 * time.Second),
			TerminationDrainDuration: Duration(5 * time.Second),
			Concurrency:              2,
		},
	}
}

// builtins are the built-in profiles, as `istioctl profile list` has them:
// default, and demo (default plus an access log on stdout).
var builtins = map[string]func() MeshConfig{
	"default": defaultMesh,
	"demo": func() MeshConfig {
		m := defaultMesh()
		m.AccessLogFile = "/dev/stdout"
		return m
	},
}

// ProfileNames lists the built-in profiles.
func ProfileNames() []string {
	out := make([]string, 0, len(builtins))
	for n := range builtins {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// BuiltinProfile returns the built-in profile name.
func BuiltinProfile(name string) (*Profile, error) {
	mk, ok := builtins[name]
	if !ok {
		return nil, fmt.Errorf("unknown profile %q; valid choices: %s", name, strings.Join(ProfileNames(), ", "))
	}
	return &Profile{APIVersion: meshtunAPIVersion, Kind: kindMeshConfig, Metadata: Metadata{Name: name}, Spec: mk()}, nil
}

// ParseProfile decodes and validates a profile document, strictly. source
// names the document in errors (a file name). The result is canonical:
// every field set, kind MeshConfig.
func ParseProfile(source string, data []byte) (*Profile, error) {
	p, err := parseProfile(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", source, err)
	}
	return p, nil
}

func parseProfile(data []byte) (*Profile, error) {
	doc, _, err := parseDoc(data)
	if err != nil {
		return nil, err
	}
	apiVersion, kind := str(doc, "apiVersion"), str(doc, "kind")
	switch kind {
	case kindMeshConfig:
		if apiVersion != meshtunAPIVersion {
			return nil, fieldErr("apiVersion", "%s", choiceError(apiVersion, []string{meshtunAPIVersion}))
		}
		p := Profile{Spec: defaultMesh(), Metadata: Metadata{Name: DefaultProfileName}}
		if _, err := decodeStrict(data, &p); err != nil {
			return nil, err
		}
		if err := p.Spec.validate("spec"); err != nil {
			return nil, err
		}
		return &p, nil
	case kindIstioOperator:
		if apiVersion != istioAPIVersion && apiVersion != meshtunAPIVersion {
			return nil, fieldErr("apiVersion", "%s", choiceError(apiVersion, []string{istioAPIVersion, meshtunAPIVersion}))
		}
		name := str(doc, "spec", "profile")
		if name == "" {
			name = DefaultProfileName
		}
		mk, ok := builtins[name]
		if !ok {
			return nil, fieldErr("spec.profile", "%s", choiceError(name, ProfileNames()))
		}
		d := operatorDoc{Metadata: Metadata{Name: name}, Spec: operatorSpec{MeshConfig: mk()}}
		if _, err := decodeStrict(data, &d); err != nil {
			return nil, err
		}
		if err := d.Spec.MeshConfig.validate("spec.meshConfig"); err != nil {
			return nil, err
		}
		return &Profile{APIVersion: meshtunAPIVersion, Kind: kindMeshConfig, Metadata: d.Metadata, Spec: d.Spec.MeshConfig}, nil
	}
	return nil, fieldErr("kind", "%s", choiceError(kind, []string{kindMeshConfig, kindIstioOperator}))
}

// validate checks what the types alone do not.
func (m *MeshConfig) validate(path string) error {
	if m.ConnectTimeout < Duration(time.Millisecond) {
		return fieldErr(join(path, "connectTimeout"), "must be at least 1ms, got %s", m.ConnectTimeout)
	}
	if m.DNSRefreshRate < Duration(time.Millisecond) {
		return fieldErr(join(path, "dnsRefreshRate"), "must be at least 1ms, got %s", m.DNSRefreshRate)
	}
	if f := m.AccessLogFile; f != "" && !strings.HasPrefix(f, "/") {
		return fieldErr(join(path, "accessLogFile"), "want an absolute path such as /dev/stdout, or \"\" for none, got %q", f)
	}
	if m.DefaultConfig.DrainDuration < Duration(time.Millisecond) {
		return fieldErr(join(path, "defaultConfig.drainDuration"), "must be at least 1ms, got %s", m.DefaultConfig.DrainDuration)
	}
	if m.DefaultConfig.Concurrency < 0 {
		return fieldErr(join(path, "defaultConfig.concurrency"), "must be 0 (all cores) or more, got %d", m.DefaultConfig.Concurrency)
	}
	return nil
}

// MarshalProfile writes p as YAML with every field, in declaration order
// (outboundTrafficPolicy.mode first).
func MarshalProfile(p *Profile) ([]byte, error) {
	return goyaml.Marshal(p)
}
