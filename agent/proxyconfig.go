package agent

import (
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	meshconfig "istio.io/api/mesh/v1alpha1"
	"sigs.k8s.io/yaml"
)

// ProxyConfig is what meshtun takes from Istio's ProxyConfig (mesh config
// defaultConfig, the PROXY_CONFIG variable the injector sets): the
// effective values of the fields it acts on, and the whole decoded
// message, which the node metadata carries to istiod. Durations are Go
// durations, ports plain numbers.
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

	// msg is the decoded istio.io/api ProxyConfig: Istio's defaults, then
	// the file, then PROXY_CONFIG. Never modified once built (Clone to
	// change it).
	msg *meshconfig.ProxyConfig
}

// defaultDiscoveryAddress is istiod's plaintext xDS port. Istio's default
// is the TLS port 15012, which needs the workload identity meshtun does
// not have yet.
const defaultDiscoveryAddress = "istiod.istio-system.svc:15010"

// defaultProxyConfigMessage is Istio's mesh.DefaultProxyConfig
// (pkg/config/mesh/mesh.go; the same values are the defaultConfig of the
// mesh.yaml Istio 1.31 renders), except the discovery address (see
// defaultDiscoveryAddress). The injector leaves out of PROXY_CONFIG every
// field equal to these (cleanProxyConfig), so they are the base a sidecar
// must apply PROXY_CONFIG to, as pilot-agent does.
func defaultProxyConfigMessage() *meshconfig.ProxyConfig {
	return &meshconfig.ProxyConfig{
		ConfigPath:               "./etc/istio/proxy",
		ClusterName:              &meshconfig.ProxyConfig_ServiceCluster{ServiceCluster: "istio-proxy"},
		DrainDuration:            durationpb.New(45 * time.Second),
		TerminationDrainDuration: durationpb.New(5 * time.Second),
		ProxyAdminPort:           15000,
		ControlPlaneAuthPolicy:   meshconfig.AuthenticationPolicy_MUTUAL_TLS,
		DiscoveryAddress:         defaultDiscoveryAddress,
		BinaryPath:               "/usr/local/bin/envoy",
		StatNameLength:           189,
		StatusPort:               15020,
	}
}

// defaultConcurrency is meshtun's concurrency when ProxyConfig has none
// (Istio's injector sizes it from the CPU limit; see ProxyConfig).
const defaultConcurrency = 1

// defaultProxyConfig is the effective configuration without a file or
// PROXY_CONFIG.
func defaultProxyConfig() ProxyConfig {
	return effectiveProxyConfig(defaultProxyConfigMessage())
}

// actedOn are the ProxyConfig fields meshtun uses (JSON names): the
// proxy's flags and bootstrap take them, or, for
// holdApplicationUntilProxyStarts, the injector through the node metadata,
// and proxyMetadata supplies environment variables. Every other field is
// accepted, carried to istiod in the node metadata, and listed once at
// start as not acted on. statNameLength, proxyStatsMatcher and
// extraStatTags shape Envoy's stats_config in Istio's bootstrap template;
// meshtun's stats store has no name limit or inclusion matcher, so they
// are among the others.
var actedOn = []string{
	"discoveryAddress", "drainDuration", "terminationDrainDuration", "proxyAdminPort",
	"statusPort", "concurrency", "holdApplicationUntilProxyStarts", "proxyMetadata",
}

var proxyConfigDesc = (&meshconfig.ProxyConfig{}).ProtoReflect().Descriptor()

// decodeProxyConfig decodes one ProxyConfig document (YAML or JSON; field
// names in the JSON form, "drainDuration", or the proto form,
// "drain_duration", as protojson accepts both) named source in errors.
// The message holds only the fields the document sets (a proto3 scalar
// set to its zero, "statNameLength: 0", cannot be told from unset, so
// Istio's default stays); removed are the names of fields Istio removed,
// accepted and ignored. A name that is not a ProxyConfig field is an error
// naming it, as are a value protojson rejects and a bad value of a field
// meshtun acts on.
func decodeProxyConfig(doc []byte, source string) (out *meshconfig.ProxyConfig, removed []string, err error) {
	js, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: not valid YAML or JSON: %w", source, err)
	}
	out = &meshconfig.ProxyConfig{}
	if s := strings.TrimSpace(string(js)); s == "null" || s == "" {
		return out, nil, nil
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(js, &fields); err != nil {
		return nil, nil, fmt.Errorf("%s: want a ProxyConfig object: %w", source, err)
	}
	names := make([]string, 0, len(fields))
	for k := range fields {
		names = append(names, k)
	}
	slices.Sort(names)
	// Each field is decoded alone, so an error names it; a field set under
	// both its names (or two members of a oneof) is ambiguous.
	seen := map[protoreflect.FullName]string{}
	r := out.ProtoReflect()
	for _, name := range names {
		fd := proxyConfigField(name)
		if fd == nil {
			if n, ok := removedProxyConfigField(name); ok {
				removed = append(removed, n)
				continue
			}
			return nil, nil, fmt.Errorf("%s: %s: not a ProxyConfig field (istio.io/api mesh.v1alpha1.ProxyConfig)%s",
				source, name, nestedHint(name))
		}
		key := fd.FullName()
		if o := fd.ContainingOneof(); o != nil {
			key = o.FullName()
		}
		if prev, dup := seen[key]; dup {
			return nil, nil, fmt.Errorf("%s: %s and %s set the same field", source, prev, name)
		}
		seen[key] = name
		raw := fields[name]
		if string(raw) == "null" {
			continue
		}
		one := &meshconfig.ProxyConfig{}
		if err := protojson.Unmarshal([]byte(`{"`+string(fd.Name())+`":`+string(raw)+`}`), one); err != nil {
			return nil, nil, fmt.Errorf("%s: %s: %s", source, name, protojsonError(err))
		}
		if o := one.ProtoReflect(); o.Has(fd) {
			r.Set(fd, o.Get(fd))
		}
	}
	if err := checkProxyConfig(out); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", source, err)
	}
	return out, removed, nil
}

// proxyConfigField finds a field by its JSON or proto name.
func proxyConfigField(name string) protoreflect.FieldDescriptor {
	fs := proxyConfigDesc.Fields()
	if fd := fs.ByJSONName(name); fd != nil {
		return fd
	}
	return fs.ByTextName(name)
}

// removedProxyConfigField reports whether name is a field Istio removed
// (reserved in the proto, e.g. parentShutdownDuration, a default until
// 1.14), and its JSON name: old mesh configs still carry them and Istio
// accepts them, so meshtun does too, acting on nothing.
func removedProxyConfigField(name string) (string, bool) {
	rn := proxyConfigDesc.ReservedNames()
	for i := range rn.Len() {
		if n := string(rn.Get(i)); n == name || jsonName(n) == name {
			return jsonName(n), true
		}
	}
	return "", false
}

// jsonName is protobuf's JSON name of a snake_case field name.
func jsonName(s string) string {
	var b strings.Builder
	upper := false
	for _, c := range s {
		switch {
		case c == '_':
			upper = true
		case upper && 'a' <= c && c <= 'z':
			b.WriteRune(c - 'a' + 'A')
			upper = false
		default:
			b.WriteRune(c)
			upper = false
		}
	}
	return b.String()
}

// nestedHint says where a name belongs when it is a field of one of
// ProxyConfig's messages (imageType is image.imageType), the usual
// mistake.
func nestedHint(name string) string {
	fs := proxyConfigDesc.Fields()
	for i := range fs.Len() {
		fd := fs.Get(i)
		if fd.Kind() != protoreflect.MessageKind || fd.IsMap() || fd.IsList() {
			continue
		}
		sub := fd.Message().Fields()
		if sub.ByJSONName(name) != nil || sub.ByTextName(name) != nil {
			return fmt.Sprintf("; %s is a field of %s: {%q: {%q: ...}}", name, fd.JSONName(), fd.JSONName(), name)
		}
	}
	return ""
}

// protojsonPosition is protojson's error prefix: its line and column are
// those of the one-field document decodeProxyConfig builds, of no use to
// the user. protojson separates the words with a space or, at random per
// binary, a no-break space (U+00A0), so that no one matches its text.
var protojsonPosition = regexp.MustCompile(`^proto:[\s\x{a0}]*(syntax error[\s\x{a0}]*)?(\(line \d+:\d+\):[\s\x{a0}]*)?`)

func protojsonError(err error) string {
	return protojsonPosition.ReplaceAllString(err.Error(), "")
}

// checkProxyConfig validates the fields of m meshtun acts on, where set.
func checkProxyConfig(m *meshconfig.ProxyConfig) error {
	if a := m.GetDiscoveryAddress(); a != "" {
		if err := checkHostPort(a); err != nil {
			return fmt.Errorf("discoveryAddress: %w", err)
		}
	}
	for _, d := range []struct {
		name     string
		v        *durationpb.Duration
		positive bool
	}{{"drainDuration", m.GetDrainDuration(), true}, {"terminationDrainDuration", m.GetTerminationDrainDuration(), false}} {
		if d.v == nil {
			continue
		}
		switch v := d.v.AsDuration(); {
		case v < 0:
			return fmt.Errorf("%s: negative duration %q", d.name, protoDuration(v))
		case v == 0 && d.positive:
			return fmt.Errorf("%s: must be more than 0s", d.name)
		}
	}
	for _, p := range []struct {
		name string
		v    int32
	}{{"proxyAdminPort", m.GetProxyAdminPort()}, {"statusPort", m.GetStatusPort()}} {
		if p.v != 0 && (p.v < 1 || p.v > 65535) {
			return fmt.Errorf("%s: want a port number 1..65535, got %d", p.name, p.v)
		}
	}
	if c := m.GetConcurrency(); c != nil && (c.GetValue() < 0 || c.GetValue() > 1024) {
		return fmt.Errorf("concurrency: want a number of workers 0..1024 (0: every core), got %d", c.GetValue())
	}
	return nil
}

// overlayProxyConfig sets on dst every field src sets, replacing dst's;
// proxyMetadata entries are merged, src's winning, as Istio merges the
// mesh config's and PROXY_CONFIG's (pkg/config/mesh applyProxyConfig).
func overlayProxyConfig(dst, src *meshconfig.ProxyConfig) {
	meta := dst.GetProxyMetadata()
	r := dst.ProtoReflect()
	src.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		r.Set(fd, v)
		return true
	})
	if len(meta) > 0 && len(src.GetProxyMetadata()) > 0 {
		merged := maps.Clone(meta)
		maps.Copy(merged, src.GetProxyMetadata())
		dst.ProxyMetadata = merged
	}
}

// setFields are the JSON names of the fields m sets, sorted.
func setFields(m *meshconfig.ProxyConfig) []string {
	var out []string
	m.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
		out = append(out, fd.JSONName())
		return true
	})
	slices.Sort(out)
	return out
}

// effectiveProxyConfig derives meshtun's values from a message built by
// overlaying validated documents on Istio's defaults, so every field it
// reads is set and valid.
func effectiveProxyConfig(m *meshconfig.ProxyConfig) ProxyConfig {
	pc := ProxyConfig{
		DiscoveryAddress:                m.GetDiscoveryAddress(),
		DrainDuration:                   m.GetDrainDuration().AsDuration(),
		TerminationDrainDuration:        m.GetTerminationDrainDuration().AsDuration(),
		ProxyAdminPort:                  int(m.GetProxyAdminPort()),
		StatusPort:                      int(m.GetStatusPort()),
		Concurrency:                     defaultConcurrency,
		HoldApplicationUntilProxyStarts: m.GetHoldApplicationUntilProxyStarts().GetValue(),
		msg:                             m,
	}
	if c := m.GetConcurrency(); c != nil {
		pc.Concurrency = int(c.GetValue())
		if pc.Concurrency == 0 {
			// Every core the pod may use: GOMAXPROCS follows the
			// cgroup's CPU limit (Go 1.25+), NumCPU would count the node's.
			pc.Concurrency = runtime.GOMAXPROCS(0)
		}
	}
	return pc
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

// metadata is the PROXY_CONFIG entry of the node metadata, which istiod
// decodes as a ProxyConfig (model.NodeMetaProxyConfig): the decoded
// message with meshtun's effective values written back, in protojson's
// form (JSON field names, "45s" durations), as pilot-agent sends it.
func (pc ProxyConfig) metadata() (map[string]any, error) {
	m := defaultProxyConfigMessage()
	if pc.msg != nil {
		m = proto.Clone(pc.msg).(*meshconfig.ProxyConfig)
	}
	m.DiscoveryAddress = pc.DiscoveryAddress
	m.DrainDuration = durationpb.New(pc.DrainDuration)
	m.TerminationDrainDuration = durationpb.New(pc.TerminationDrainDuration)
	m.ProxyAdminPort = int32(pc.ProxyAdminPort)
	m.StatusPort = int32(pc.StatusPort)
	m.Concurrency = wrapperspb.Int32(int32(pc.Concurrency))
	m.HoldApplicationUntilProxyStarts = wrapperspb.Bool(pc.HoldApplicationUntilProxyStarts)
	js, err := protojson.Marshal(m)
	if err != nil {
		return nil, err
	}
	var out map[string]any
	if err := json.Unmarshal(js, &out); err != nil {
		return nil, err
	}
	return out, nil
}

// protoDuration formats d as protobuf's JSON Duration ("45s", "0.5s").
func protoDuration(d time.Duration) string {
	s := strconv.FormatFloat(d.Seconds(), 'f', -1, 64)
	return s + "s"
}
