package agent

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshtun/meshtun/mesh/bootstrap"
	"github.com/meshtun/meshtun/tun"
	"github.com/meshtun/meshtun/xdsclient"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// injectorEnv is the environment the Istio sidecar injector gives a
// bookinfo reviews pod (plus variables that are not the agent's).
var injectorEnv = []string{
	"PATH=/usr/local/bin:/usr/bin",
	"HOME=/",
	"POD_NAME=reviews-v1-5d8f7c9b4-x2x9q",
	"POD_NAMESPACE=bookinfo",
	"INSTANCE_IP=10.244.1.7",
	"INSTANCE_IPS=10.244.1.7,fd00:10:244:1::7",
	"SERVICE_ACCOUNT=bookinfo-reviews",
	`PROXY_CONFIG={"discoveryAddress":"istiod.istio-system.svc:15010","terminationDrainDuration":"10s","holdApplicationUntilProxyStarts":true,"concurrency":2,"tracing":{"zipkin":{"address":"zipkin.istio-system:9411"}}}`,
	`ISTIO_META_POD_PORTS=[{"name":"http","containerPort":9080,"protocol":"TCP"}]`,
	"ISTIO_META_APP_CONTAINERS=reviews",
	"ISTIO_META_CLUSTER_ID=Kubernetes",
	"ISTIO_META_INTERCEPTION_MODE=REDIRECT",
	"ISTIO_META_WORKLOAD_NAME=reviews-v1",
	"ISTIO_META_OWNER=kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v1",
	"ISTIO_META_MESH_ID=cluster.local",
	`ISTIO_METAJSON_LABELS={"app":"reviews","version":"v1","pod-template-hash":"5d8f7c9b4"}`,
}

// writeAnnotations writes a downward-API annotations file.
func writeAnnotations(t *testing.T, lines ...string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "annotations")
	if err := os.WriteFile(p, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func goldenSources(t *testing.T) Sources {
	return Sources{
		Environ: injectorEnv,
		AnnotationsFile: writeAnnotations(t,
			`sidecar.istio.io/status="{\"initContainers\":[\"istio-init\"],\"containers\":[\"istio-proxy\"]}"`,
			`traffic.sidecar.istio.io/excludeOutboundPorts="3306,9000-9010"`,
			`traffic.sidecar.istio.io/excludeInboundPorts="8081"`),
		LabelsFile: filepath.Join(t.TempDir(), "no-labels-file"),
	}
}

// TestBootstrapGolden is agent test 1: a fixed injector environment gives
// exactly the golden bootstrap, with the node metadata istiod reads, and
// that bootstrap passes the proxy's own readers.
func TestBootstrapGolden(t *testing.T) {
	in, err := Load(goldenSources(t))
	if err != nil {
		t.Fatal(err)
	}
	js, b, err := in.render()
	if err != nil {
		t.Fatalf("render: %v", err)
	}
	golden := filepath.Join("testdata", "bootstrap_golden.json")
	if *update {
		if err := os.WriteFile(golden, js, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if !bytes.Equal(js, want) {
		t.Errorf("bootstrap differs from %s (run with -update after checking):\n%s", golden, lineDiff(string(want), string(js)))
	}
	// Rendering is stable: a second run gives the same bytes.
	if again, _, err := in.render(); err != nil || !bytes.Equal(again, js) {
		t.Errorf("a second render differs (%v)", err)
	}

	node := b.GetNode()
	if id := "sidecar~10.244.1.7~reviews-v1-5d8f7c9b4-x2x9q.bookinfo~bookinfo.svc.cluster.local"; node.GetId() != id {
		t.Errorf("node id %q, want %q", node.GetId(), id)
	}
	if node.GetCluster() != "reviews.bookinfo" {
		t.Errorf("node cluster %q, want reviews.bookinfo (<app>.<ns>)", node.GetCluster())
	}
	md := node.GetMetadata().GetFields()
	for _, key := range []string{"NAME", "NAMESPACE", "INSTANCE_IPS", "LABELS", "ANNOTATIONS", "POD_PORTS", "INTERCEPTION_MODE",
		"ISTIO_VERSION", "CLUSTER_ID", "SERVICE_ACCOUNT", "PROXY_CONFIG", "WORKLOAD_NAME", "OWNER", "MESH_ID",
		"APP_CONTAINERS", "ENVOY_STATUS_PORT", "ENVOY_PROMETHEUS_PORT"} {
		if _, ok := md[key]; !ok {
			t.Errorf("node metadata lacks %s, which istiod reads", key)
		}
	}
	if got := md["INSTANCE_IPS"].GetStringValue(); got != "10.244.1.7,fd00:10:244:1::7" {
		t.Errorf("INSTANCE_IPS %q: istiod parses a comma-separated string", got)
	}
	if got := md["POD_PORTS"].GetStringValue(); !strings.Contains(got, `"containerPort":9080`) {
		t.Errorf("POD_PORTS %q: istiod parses the JSON list as a string", got)
	}
	labels := md["LABELS"].GetStructValue().GetFields()
	if labels["app"].GetStringValue() != "reviews" || labels["version"].GetStringValue() != "v1" || labels["pod-template-hash"] != nil {
		t.Errorf("LABELS %v: want app and version, without pod-template-hash", labels)
	}
	pc := md["PROXY_CONFIG"].GetStructValue().GetFields()
	if pc["terminationDrainDuration"].GetStringValue() != "10s" || !pc["holdApplicationUntilProxyStarts"].GetBoolValue() ||
		pc["concurrency"].GetNumberValue() != 2 {
		t.Errorf("PROXY_CONFIG %v does not carry the environment's values", pc)
	}
	// The whole ProxyConfig reaches istiod, as pilot-agent sends it:
	// Istio's defaults and the fields meshtun does not act on.
	zipkin := pc["tracing"].GetStructValue().GetFields()["zipkin"].GetStructValue().GetFields()
	if zipkin["address"].GetStringValue() != "zipkin.istio-system:9411" || pc["statNameLength"].GetNumberValue() != 189 ||
		pc["serviceCluster"].GetStringValue() != "istio-proxy" {
		t.Errorf("PROXY_CONFIG %v lacks the environment's tracing or Istio's defaults", pc)
	}
	if len(in.Warnings) != 0 || !slices.Equal(in.ProxyConfigNotActedOn, []string{"tracing"}) {
		t.Errorf("warnings %q, not acted on %q: want no warning and tracing listed as not acted on", in.Warnings, in.ProxyConfigNotActedOn)
	}
	wantEx := Exclusions{OutboundPorts: []tun.PortRange{{Start: 3306, End: 3306}, {Start: 9000, End: 9010}}, InboundPorts: []tun.PortRange{{Start: 8081, End: 8081}}}
	if got := in.Exclusions; got.String() != wantEx.String() {
		t.Errorf("exclusions from the annotations: %v, want %v", got, wantEx)
	}

	// What the proxy does with the file: parse, derive the xDS client,
	// build the static configuration (validate did the last).
	pb, err := bootstrap.Parse(js, "golden", false)
	if err != nil {
		t.Fatalf("mesh/bootstrap.Parse: %v", err)
	}
	xc, err := xdsclient.FromBootstrap(pb)
	if err != nil {
		t.Fatalf("xdsclient.FromBootstrap: %v", err)
	}
	if xc.Server != "istiod.istio-system.svc:15010" || !xc.Delta || xc.InitialFetchTimeout != 0 || xc.Node.GetId() != node.GetId() {
		t.Errorf("xDS client config: server %q delta %v initial fetch timeout %v node %q", xc.Server, xc.Delta, xc.InitialFetchTimeout, xc.Node.GetId())
	}
	if got := AdminAddress(pb); got != "127.0.0.1:15000" {
		t.Errorf("admin address %q", got)
	}
}

func (e Exclusions) String() string {
	var b strings.Builder
	for _, p := range e.OutboundPorts {
		b.WriteString("out:" + p.String() + " ")
	}
	for _, p := range e.OutboundCIDRs {
		b.WriteString("cidr:" + p.String() + " ")
	}
	for _, p := range e.InboundPorts {
		b.WriteString("in:" + p.String() + " ")
	}
	if e.NoInbound {
		b.WriteString("no-inbound")
	}
	return b.String()
}

func lineDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	var out []string
	for i := 0; i < max(len(al), len(bl)); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			out = append(out, "- "+x, "+ "+y)
			if len(out) > 40 {
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

func env(overrides ...string) []string {
	base := []string{"POD_NAME=app", "POD_NAMESPACE=default", "INSTANCE_IP=10.0.0.2", "SERVICE_ACCOUNT=app"}
	out := []string{}
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		overridden := false
		for _, o := range overrides {
			if ok, _, _ := strings.Cut(o, "="); ok == k {
				overridden = true
			}
		}
		if !overridden {
			out = append(out, kv)
		}
	}
	for _, o := range overrides {
		if strings.HasSuffix(o, "=<unset>") {
			continue
		}
		out = append(out, o)
	}
	return out
}

// TestBadEnvironment is agent test 6: each bad value fails the start with
// an error naming the variable (or file, or annotation) and the value.
func TestBadEnvironment(t *testing.T) {
	badAnnots := writeAnnotations(t, `traffic.sidecar.istio.io/excludeOutboundPorts="80,http"`)
	garbled := writeAnnotations(t, `traffic.sidecar.istio.io/excludeInboundPorts=8080`)
	badPCFile := filepath.Join(t.TempDir(), "proxyconfig.yaml")
	if err := os.WriteFile(badPCFile, []byte("drainDuration: 5s\nstatNameLenght: 200\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		src  Sources
		want []string
	}{
		{"bad IP", Sources{Environ: env("INSTANCE_IP=10.0.0.300")}, []string{"INSTANCE_IP", `"10.0.0.300"`, "not an IP address"}},
		{"bad IP in the list", Sources{Environ: env("INSTANCE_IPS=10.0.0.2,fd00::zz")}, []string{"INSTANCE_IPS", `"fd00::zz"`}},
		{"loopback IP", Sources{Environ: env("INSTANCE_IP=127.0.0.1")}, []string{"INSTANCE_IP", "127.0.0.1", "not a unicast pod address"}},
		{"no IP", Sources{Environ: env("INSTANCE_IP=<unset>")}, []string{"INSTANCE_IP or INSTANCE_IPS", "required"}},
		{"no pod name", Sources{Environ: env("POD_NAME=<unset>")}, []string{"POD_NAME", "required"}},
		{"no namespace", Sources{Environ: env("POD_NAMESPACE=")}, []string{"POD_NAMESPACE", "required"}},
		{"pod name with ~", Sources{Environ: env("POD_NAME=a~b")}, []string{"POD_NAME", `"a~b"`}},
		{"unknown PROXY_CONFIG field", Sources{Environ: env(`PROXY_CONFIG={"drainDuraton":"5s"}`)}, []string{"PROXY_CONFIG: drainDuraton: not a ProxyConfig field"}},
		{"imageTyp", Sources{Environ: env(`PROXY_CONFIG={"imageTyp": "x"}`)}, []string{"PROXY_CONFIG: imageTyp: not a ProxyConfig field"}},
		{"imageType at the top", Sources{Environ: env(`PROXY_CONFIG={"imageType": "distroless"}`)},
			[]string{"PROXY_CONFIG: imageType: not a ProxyConfig field", `imageType is a field of image: {"image": {"imageType": ...}}`}},
		{"unknown nested field", Sources{Environ: env(`PROXY_CONFIG={"tracing":{"zipkn":{}}}`)}, []string{"PROXY_CONFIG: tracing:", `"zipkn"`}},
		{"field set twice", Sources{Environ: env(`PROXY_CONFIG={"drainDuration":"5s","drain_duration":"6s"}`)}, []string{"PROXY_CONFIG", "drainDuration and drain_duration"}},
		{"oneof set twice", Sources{Environ: env(`PROXY_CONFIG={"serviceCluster":"a","tracingServiceName":"CANONICAL_NAME_ONLY"}`)},
			[]string{"PROXY_CONFIG", "serviceCluster and tracingServiceName"}},
		{"bad enum", Sources{Environ: env(`PROXY_CONFIG={"interceptionMode":"IPTABLES"}`)}, []string{"PROXY_CONFIG: interceptionMode:", "IPTABLES"}},
		{"bad file field", Sources{Environ: env(), ProxyConfigFile: badPCFile}, []string{"proxy config file " + badPCFile, "statNameLenght: not a ProxyConfig field"}},
		{"PROXY_CONFIG not an object", Sources{Environ: env(`PROXY_CONFIG=[1,2]`)}, []string{"PROXY_CONFIG", "want a ProxyConfig object"}},
		{"PROXY_CONFIG bad YAML", Sources{Environ: env("PROXY_CONFIG=drainDuration: [5s")}, []string{"PROXY_CONFIG", "not valid YAML"}},
		{"bad duration", Sources{Environ: env(`PROXY_CONFIG={"terminationDrainDuration":"5 seconds"}`)}, []string{"PROXY_CONFIG: terminationDrainDuration", `"5 seconds"`}},
		{"zero drain", Sources{Environ: env(`PROXY_CONFIG={"drainDuration":"0s"}`)}, []string{"PROXY_CONFIG: drainDuration", "more than 0s"}},
		{"port not a number", Sources{Environ: env(`PROXY_CONFIG={"proxyAdminPort":"admin"}`)}, []string{"PROXY_CONFIG: proxyAdminPort", `"admin"`}},
		{"negative duration", Sources{Environ: env(`PROXY_CONFIG={"terminationDrainDuration":"-5s"}`)}, []string{"terminationDrainDuration", "negative"}},
		{"bad admin port", Sources{Environ: env(`PROXY_CONFIG={"proxyAdminPort":70000}`)}, []string{"PROXY_CONFIG: proxyAdminPort", "70000"}},
		{"bad discovery address", Sources{Environ: env(`PROXY_CONFIG={"discoveryAddress":"istiod"}`)}, []string{"PROXY_CONFIG: discoveryAddress", `"istiod"`}},
		{"bad discovery port", Sources{Environ: env(`PROXY_CONFIG={"discoveryAddress":"istiod:xds"}`)}, []string{"discoveryAddress", `"xds"`}},
		{"port clash", Sources{Environ: env(`PROXY_CONFIG={"statusPort":15000}`)}, []string{"PROXY_CONFIG", "must differ"}},
		{"bad concurrency", Sources{Environ: env(`PROXY_CONFIG={"concurrency":-2}`)}, []string{"PROXY_CONFIG: concurrency", "-2"}},
		{"bad interception mode", Sources{Environ: env("ISTIO_META_INTERCEPTION_MODE=IPTABLES")}, []string{"ISTIO_META_INTERCEPTION_MODE", `"IPTABLES"`}},
		{"bad pod ports", Sources{Environ: env("ISTIO_META_POD_PORTS=8080")}, []string{"ISTIO_META_POD_PORTS", "JSON list"}},
		{"pod port out of range", Sources{Environ: env(`ISTIO_META_POD_PORTS=[{"containerPort":0}]`)}, []string{"ISTIO_META_POD_PORTS", "[0].containerPort"}},
		{"bad labels JSON", Sources{Environ: env("ISTIO_METAJSON_LABELS={app:x}")}, []string{"ISTIO_METAJSON_LABELS", "JSON object"}},
		{"bad exclusion annotation", Sources{Environ: env(), AnnotationsFile: badAnnots},
			[]string{"traffic.sidecar.istio.io/excludeOutboundPorts", badAnnots, `"http"`}},
		{"garbled downward-API file", Sources{Environ: env(), AnnotationsFile: garbled}, []string{garbled, "line 1", "excludeInboundPorts"}},
		{"bad discovery flag", Sources{Environ: env(), DiscoveryAddress: "10.0.0.1"}, []string{"discovery address", `"10.0.0.1"`}},
		{"missing proxy config file", Sources{Environ: env(), ProxyConfigFile: "/nonexistent/proxyconfig.yaml"}, []string{"/nonexistent/proxyconfig.yaml"}},
		{"missing extra bootstrap", Sources{Environ: env("ISTIO_BOOTSTRAP_OVERRIDE=/nonexistent/extra.yaml")}, []string{"extra bootstrap", "/nonexistent/extra.yaml"}},
	} {
		_, _, _, err := PrepareBootstrap(tc.src)
		if err == nil {
			t.Errorf("%s: no error", tc.name)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not mention %q", tc.name, err, w)
			}
		}
	}
}

// TestProxyConfigSources: the ProxyConfig file (YAML) is the base,
// PROXY_CONFIG overrides it field by field; proxyMetadata ISTIO_META_*
// entries become node metadata; the discovery flag wins over both.
func TestProxyConfigSources(t *testing.T) {
	file := filepath.Join(t.TempDir(), "proxyconfig.yaml")
	doc := "discoveryAddress: 10.9.9.9:15010\ndrainDuration: 20s\nproxyAdminPort: 15100\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  OTHER: x\n"
	if err := os.WriteFile(file, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := Load(Sources{Environ: env(`PROXY_CONFIG=drainDuration: 30s`), ProxyConfigFile: file})
	if err != nil {
		t.Fatal(err)
	}
	pc := in.ProxyConfig
	if pc.DiscoveryAddress != "10.9.9.9:15010" || pc.DrainDuration != 30*time.Second || pc.ProxyAdminPort != 15100 ||
		pc.TerminationDrainDuration != 5*time.Second || pc.StatusPort != 15020 || pc.Concurrency != 1 {
		t.Errorf("proxy config %+v", pc)
	}
	if in.Meta["DNS_CAPTURE"] != "true" || in.Meta["OTHER"] != "" {
		t.Errorf("metadata from proxyMetadata: %v", in.Meta)
	}
	_, b, err := in.render()
	if err != nil {
		t.Fatal(err)
	}
	if AdminAddress(b) != "127.0.0.1:15100" {
		t.Errorf("admin %s", AdminAddress(b))
	}
	// An IP discovery address gives a STATIC xds-grpc cluster.
	if c := b.GetStaticResources().GetClusters()[0]; c.GetName() != xdsCluster || c.GetType().String() != "STATIC" {
		t.Errorf("xds cluster %s type %s, want xds-grpc STATIC", c.GetName(), c.GetType())
	}
	in, err = Load(Sources{Environ: env(), ProxyConfigFile: file, DiscoveryAddress: "istiod.example:15010"})
	if err != nil {
		t.Fatal(err)
	}
	if in.ProxyConfig.DiscoveryAddress != "istiod.example:15010" {
		t.Errorf("discovery flag ignored: %s", in.ProxyConfig.DiscoveryAddress)
	}
}

// TestStaticOnlyWithExtra: with NoXDS the bootstrap has no dynamic
// resources, and the extra bootstrap's static listeners and clusters are
// merged in; an extra xds-grpc cluster is refused where one is generated.
func TestStaticOnlyWithExtra(t *testing.T) {
	dir := t.TempDir()
	extra := filepath.Join(dir, "extra.yaml")
	doc := `static_resources:
  listeners:
  - name: virtualOutbound
    address: {socket_address: {address: 0.0.0.0, port_value: 15001}}
    use_original_dst: true
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: PassthroughCluster
          cluster: PassthroughCluster
  clusters:
  - name: PassthroughCluster
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
`
	if err := os.WriteFile(extra, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	in, js, b, err := PrepareBootstrap(Sources{Environ: env(), ExtraBootstrap: extra, NoXDS: true})
	if err != nil {
		t.Fatal(err)
	}
	if b.GetDynamicResources() != nil || len(b.GetStaticResources().GetClusters()) != 1 || len(b.GetStaticResources().GetListeners()) != 1 {
		t.Errorf("static-only bootstrap:\n%s", js)
	}
	if in.ExtraPath != extra || b.GetNode().GetId() == "" {
		t.Errorf("extra %q node %q", in.ExtraPath, b.GetNode().GetId())
	}
	// With xDS the generated xds-grpc comes first, then the extra's.
	_, _, b, err = PrepareBootstrap(Sources{Environ: env("ISTIO_BOOTSTRAP_OVERRIDE=" + extra)})
	if err != nil {
		t.Fatal(err)
	}
	if cs := b.GetStaticResources().GetClusters(); len(cs) != 2 || cs[0].GetName() != xdsCluster || !hasADS(b) {
		t.Errorf("clusters %v", cs)
	}
	clash := filepath.Join(dir, "clash.yaml")
	if err := os.WriteFile(clash, []byte("static_resources:\n  clusters:\n  - name: xds-grpc\n    type: STATIC\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := PrepareBootstrap(Sources{Environ: env(), ExtraBootstrap: clash}); err == nil || !strings.Contains(err.Error(), "xds-grpc") {
		t.Errorf("an extra xds-grpc cluster: %v", err)
	}
	// An extra that the proxy would refuse is refused here, naming it.
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("static_resources:\n  listeners:\n  - name: l\n    address: {socket_address: {address: 10.0.0.1, port_value: 80}}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n        typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: x, cluster: nope}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := PrepareBootstrap(Sources{Environ: env(), ExtraBootstrap: bad, NoXDS: true}); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("an extra with a listener to a missing cluster: %v", err)
	}
}

// TestAnnotations: Istio's capture annotations, from the JSON variable or
// the downward-API file (which wins).
func TestAnnotations(t *testing.T) {
	file := writeAnnotations(t, `traffic.sidecar.istio.io/excludeOutboundIPRanges="10.96.0.0/12, fd00::/8"`,
		`traffic.sidecar.istio.io/includeInboundPorts=""`, `traffic.sidecar.istio.io/includeOutboundIPRanges="10.0.0.0/8"`)
	ex, warnings, err := loadExclusions(Sources{
		Environ:         []string{`ISTIO_METAJSON_ANNOTATIONS={"traffic.sidecar.istio.io/excludeOutboundPorts":"5432","traffic.sidecar.istio.io/excludeOutboundIPRanges":"*"}`},
		AnnotationsFile: file,
	})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := ex.String(), "out:5432 cidr:10.96.0.0/12 cidr:fd00::/8 no-inbound"; got != want {
		t.Errorf("exclusions %q, want %q", got, want)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "includeOutboundIPRanges") {
		t.Errorf("warnings %q", warnings)
	}
	ex, _, err = loadExclusions(Sources{Environ: []string{`ISTIO_METAJSON_ANNOTATIONS={"traffic.sidecar.istio.io/excludeOutboundIPRanges":"*"}`}})
	if err != nil || ex.String() != "cidr:0.0.0.0/0 cidr:::/0 " {
		t.Errorf("excludeOutboundIPRanges=*: %q %v", ex.String(), err)
	}
	m, err := parseDownwardAPI("a=\"1\"\nb=\"x=\\\"y\\\"\"\n\n")
	if err != nil || m["a"] != "1" || m["b"] != `x="y"` {
		t.Errorf("ParseDownwardAPI: %v %v", m, err)
	}
}
