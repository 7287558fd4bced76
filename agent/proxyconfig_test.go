package agent

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	meshconfig "istio.io/api/mesh/v1alpha1"
)

// istioProxyConfigJSON is every field of Istio's default ProxyConfig
// (pkg/config/mesh DefaultProxyConfig: today's, plus concurrency, tracing
// and the removed parentShutdownDuration of older releases), plus the
// fields users set in meshConfig.defaultConfig that the issue names:
// image.imageType, tracing, proxyStatsMatcher, meshId, proxyMetadata.
const istioProxyConfigJSON = `{
  "configPath": "./etc/istio/proxy",
  "binaryPath": "/usr/local/bin/envoy",
  "serviceCluster": "istio-proxy",
  "drainDuration": "45s",
  "parentShutdownDuration": "60s",
  "terminationDrainDuration": "5s",
  "proxyAdminPort": 15000,
  "concurrency": 2,
  "controlPlaneAuthPolicy": "MUTUAL_TLS",
  "discoveryAddress": "istiod.istio-system.svc:15012",
  "statNameLength": 189,
  "statusPort": 15020,
  "tracing": {"zipkin": {"address": "zipkin.istio-system:9411"}, "sampling": 1, "maxPathTagLength": 256,
    "customTags": {"cluster": {"literal": {"value": "east"}}}},
  "image": {"imageType": "distroless"},
  "proxyStatsMatcher": {"inclusionPrefixes": ["cluster.outbound"], "inclusionRegexps": [".*circuit_breakers.*"]},
  "meshId": "mesh-east",
  "proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true", "BOOTSTRAP_XDS_AGENT": "true"}
}`

// The same document as YAML with protobuf's field names, which protojson
// (and Istio's jsonpb) accept as well.
const istioProxyConfigYAML = `
config_path: ./etc/istio/proxy
binary_path: /usr/local/bin/envoy
service_cluster: istio-proxy
drain_duration: 45s
parent_shutdown_duration: 60s
termination_drain_duration: 5s
proxy_admin_port: 15000
concurrency: 2
control_plane_auth_policy: MUTUAL_TLS
discovery_address: istiod.istio-system.svc:15012
stat_name_length: 189
status_port: 15020
tracing:
  zipkin: {address: "zipkin.istio-system:9411"}
  sampling: 1
  max_path_tag_length: 256
  custom_tags:
    cluster: {literal: {value: east}}
image: {image_type: distroless}
proxy_stats_matcher:
  inclusion_prefixes: [cluster.outbound]
  inclusion_regexps: [".*circuit_breakers.*"]
mesh_id: mesh-east
proxy_metadata:
  ISTIO_META_DNS_CAPTURE: "true"
  BOOTSTRAP_XDS_AGENT: "true"
`

// TestProxyConfigIstioFields is issue 13's test 5: PROXY_CONFIG with
// Istio's default ProxyConfig and the fields users set is accepted (JSON
// or YAML, either name form); the fields meshtun acts on take effect, the
// others are listed once and reach istiod in the node metadata; a name
// that is not a ProxyConfig field fails, naming it.
func TestProxyConfigIstioFields(t *testing.T) {
	wantNotActedOn := []string{"binaryPath", "configPath", "controlPlaneAuthPolicy", "image", "meshId",
		"parentShutdownDuration", "proxyStatsMatcher", "serviceCluster", "statNameLength", "tracing"}
	var msgs []*meshconfig.ProxyConfig
	for _, tc := range []struct{ name, doc string }{{"JSON", istioProxyConfigJSON}, {"YAML", istioProxyConfigYAML}} {
		t.Run(tc.name, func(t *testing.T) {
			in, err := Load(Sources{Environ: env("PROXY_CONFIG=" + tc.doc), RootCertFile: writeRoot(t)}) // 15012: TLS to istiod
			if err != nil {
				t.Fatalf("Istio's ProxyConfig rejected: %v", err)
			}
			pc := in.ProxyConfig
			want := ProxyConfig{DiscoveryAddress: "istiod.istio-system.svc:15012", DrainDuration: 45 * time.Second,
				TerminationDrainDuration: 5 * time.Second, ProxyAdminPort: 15000, StatusPort: 15020, Concurrency: 2}
			pc.msg = nil
			if pc != want {
				t.Errorf("effective config %+v, want %+v", pc, want)
			}
			if !slices.Equal(in.ProxyConfigNotActedOn, wantNotActedOn) {
				t.Errorf("not acted on %q, want %q", in.ProxyConfigNotActedOn, wantNotActedOn)
			}
			if in.Meta["DNS_CAPTURE"] != "true" || in.Meta["BOOTSTRAP_XDS_AGENT"] != "" {
				t.Errorf("node metadata from proxyMetadata: %v, want DNS_CAPTURE only (ISTIO_META_ entries)", in.Meta)
			}

			// The node metadata carries the message istiod decodes.
			_, b, err := in.render()
			if err != nil {
				t.Fatal(err)
			}
			js, err := b.GetNode().GetMetadata().GetFields()["PROXY_CONFIG"].MarshalJSON()
			if err != nil {
				t.Fatal(err)
			}
			var sent meshconfig.ProxyConfig
			if err := protojson.Unmarshal(js, &sent); err != nil {
				t.Fatalf("PROXY_CONFIG metadata is not a ProxyConfig: %v\n%s", err, js)
			}
			if sent.GetImage().GetImageType() != "distroless" || sent.GetMeshId() != "mesh-east" ||
				sent.GetTracing().GetZipkin().GetAddress() != "zipkin.istio-system:9411" ||
				sent.GetTracing().GetCustomTags()["cluster"].GetLiteral().GetValue() != "east" ||
				!slices.Equal(sent.GetProxyStatsMatcher().GetInclusionPrefixes(), []string{"cluster.outbound"}) ||
				sent.GetProxyMetadata()["BOOTSTRAP_XDS_AGENT"] != "true" || sent.GetStatNameLength() != 189 ||
				sent.GetConcurrency().GetValue() != 2 || sent.GetDrainDuration().AsDuration() != 45*time.Second {
				t.Errorf("PROXY_CONFIG metadata lost fields:\n%s", js)
			}
			msgs = append(msgs, in.ProxyConfig.msg)
		})
	}
	if len(msgs) == 2 && !proto.Equal(msgs[0], msgs[1]) {
		t.Errorf("JSON and YAML with proto names decode differently:\n%v\n%v", msgs[0], msgs[1])
	}

	_, err := Load(Sources{Environ: env(`PROXY_CONFIG={"imageTyp": "x"}`)})
	if err == nil || !strings.Contains(err.Error(), "PROXY_CONFIG: imageTyp: not a ProxyConfig field") {
		t.Errorf(`{"imageTyp": "x"}: error %v, want one naming imageTyp as not a ProxyConfig field`, err)
	}
}

// TestProxyConfigEveryField: every field of istio.io/api's ProxyConfig,
// under its JSON name and its proto name, is accepted alone; those meshtun
// does not act on are listed, and each reaches the node metadata. The
// list comes from the descriptor, so a field a new istio.io/api adds is
// checked too.
func TestProxyConfigEveryField(t *testing.T) {
	fields := proxyConfigDesc.Fields()
	if fields.Len() < 40 {
		t.Fatalf("ProxyConfig has %d fields; the descriptor is not istio.io/api's", fields.Len())
	}
	for i := range fields.Len() {
		fd := fields.Get(i)
		for _, name := range []string{fd.JSONName(), string(fd.Name())} {
			doc := `{"` + name + `": ` + sampleValue(fd) + `}`
			in, err := Load(Sources{Environ: env("PROXY_CONFIG=" + doc)})
			if err != nil {
				t.Errorf("%s rejected: %v", doc, err)
				continue
			}
			var want []string
			if !slices.Contains(actedOn, fd.JSONName()) {
				want = []string{fd.JSONName()}
			}
			if !slices.Equal(in.ProxyConfigNotActedOn, want) {
				t.Errorf("%s: not acted on %q, want %q", doc, in.ProxyConfigNotActedOn, want)
			}
			md, err := in.ProxyConfig.metadata()
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := md[fd.JSONName()]; !ok {
				t.Errorf("%s: PROXY_CONFIG metadata lacks %s: %v", doc, fd.JSONName(), md)
			}
		}
	}
}

// sampleValue is a valid, non-default JSON value for fd.
func sampleValue(fd protoreflect.FieldDescriptor) string {
	if fd.IsMap() {
		return `{"ISTIO_META_SAMPLE": "v"}`
	}
	var v string
	switch fd.Kind() {
	case protoreflect.MessageKind:
		switch fd.Message().FullName() {
		case "google.protobuf.Duration":
			v = `"7s"`
		case "google.protobuf.BoolValue":
			v = "true"
		case "google.protobuf.Int32Value", "google.protobuf.UInt32Value", "google.protobuf.Int64Value", "google.protobuf.UInt64Value":
			v = "3"
		default:
			v = "{}"
		}
	case protoreflect.StringKind:
		v = `"sample"`
		if fd.JSONName() == "discoveryAddress" {
			v = `"istiod.example:15010"`
		}
	case protoreflect.BoolKind:
		v = "true"
	case protoreflect.EnumKind:
		vals := fd.Enum().Values()
		v = strconv.Quote(string(vals.Get(vals.Len() - 1).Name()))
	default: // numbers; 1234 is a free port for the port fields
		v = "1234"
	}
	if fd.IsList() {
		return "[" + v + "]"
	}
	return v
}

// TestProxyConfigMerge: the file's fields are the base, PROXY_CONFIG
// replaces the fields it sets and merges proxyMetadata; proxyMetadata
// entries fill in environment variables the container lacks (Istio's
// injector puts them under the container's own), and ISTIO_META_ ones
// are node metadata, the environment's value winning.
func TestProxyConfigMerge(t *testing.T) {
	file := filepath.Join(t.TempDir(), "mesh-default-config.yaml")
	doc := "tracing: {zipkin: {address: a:9411}, sampling: 5}\nstatusPort: 15030\nproxyMetadata:\n" +
		"  ISTIO_META_FROM_FILE: f\n  ISTIO_META_BOTH: file\n  ISTIO_META_CLUSTER_ID: from-metadata\n"
	if err := os.WriteFile(file, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	pcEnv := `PROXY_CONFIG={"tracing":{"zipkin":{"address":"b:9411"}},"proxyMetadata":{"ISTIO_META_BOTH":"env","ISTIO_META_INTERCEPTION_MODE":"NONE"}}`
	in, err := Load(Sources{Environ: env(pcEnv, "ISTIO_META_CLUSTER_ID=east"), ProxyConfigFile: file})
	if err != nil {
		t.Fatal(err)
	}
	m := in.ProxyConfig.msg
	if m.GetTracing().GetZipkin().GetAddress() != "b:9411" || m.GetTracing().GetSampling() != 0 {
		t.Errorf("tracing %v: PROXY_CONFIG's should replace the file's whole", m.GetTracing())
	}
	if in.ProxyConfig.StatusPort != 15030 {
		t.Errorf("statusPort %d: the file's, which PROXY_CONFIG does not set, should stay", in.ProxyConfig.StatusPort)
	}
	if in.Meta["FROM_FILE"] != "f" || in.Meta["BOTH"] != "env" || in.Meta["CLUSTER_ID"] != "east" {
		t.Errorf("node metadata %v: want FROM_FILE f, BOTH env (PROXY_CONFIG wins), CLUSTER_ID east (the environment wins)", in.Meta)
	}
	if in.ClusterID != "east" || in.InterceptionMode != "NONE" {
		t.Errorf("cluster id %q, interception mode %q: proxyMetadata should supply the variables the environment lacks only",
			in.ClusterID, in.InterceptionMode)
	}
	if !slices.Equal(in.ProxyConfigNotActedOn, []string{"tracing"}) {
		t.Errorf("not acted on %q, want tracing once", in.ProxyConfigNotActedOn)
	}
}

// TestProxyConfigNotActedOnLogged: the fields meshtun does not act on are
// one info line at start; without any, nothing is logged.
func TestProxyConfigNotActedOnLogged(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  []string
		want string
	}{
		{"injector environment", injectorEnv, `{"level":"info","fields":["tracing"],"message":"ProxyConfig: fields accepted and sent to istiod in the node metadata, not acted on by meshtun"}` + "\n"},
		{"Istio's ProxyConfig", env("PROXY_CONFIG=" + istioProxyConfigJSON), `"fields":["binaryPath","configPath","controlPlaneAuthPolicy","image","meshId","parentShutdownDuration","proxyStatsMatcher","serviceCluster","statNameLength","tracing"]`},
		{"acted-on fields only", env(`PROXY_CONFIG={"drainDuration":"30s","proxyMetadata":{"A":"b"}}`), ""},
	} {
		in, err := Load(Sources{Environ: tc.env})
		if err != nil {
			t.Fatal(err)
		}
		var logs bytes.Buffer
		logStartInputs(zerolog.New(&logs), in)
		switch {
		case tc.want == "" && logs.Len() != 0:
			t.Errorf("%s: logged %q, want nothing", tc.name, logs.String())
		case tc.want != "" && (!strings.Contains(logs.String(), tc.want) || strings.Count(logs.String(), "\n") != 1):
			t.Errorf("%s: logged %q, want one line with %s", tc.name, logs.String(), tc.want)
		}
	}
}

// TestProtojsonErrorPosition: protojson's position prefix, which points
// into the one-field document the decoder builds, is cut whichever space
// protojson's randomized formatting put after "proto:".
func TestProtojsonErrorPosition(t *testing.T) {
	for _, sep := range []string{" ", "\u00a0"} {
		for _, msg := range []string{"proto:" + sep + "(line 1:31): invalid value", "proto:" + sep + "syntax error" + sep + "(line 1:2): invalid value"} {
			if got := protojsonError(errors.New(msg)); got != "invalid value" {
				t.Errorf("%q -> %q, want %q", msg, got, "invalid value")
			}
		}
	}
}
