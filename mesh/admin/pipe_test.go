package admin

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/bootstrap"

	"net/http/httptest"
)

// TestClustersPipeHost: a pipe host (Istio's sds-grpc) is printed by its
// socket path in the text /clusters, as Envoy prints a pipe address, and
// as a pipe address in ?format=json.
func TestClustersPipeHost(t *testing.T) {
	const sock = "./var/run/secrets/workload-spiffe-uds/socket"
	path := filepath.Join(t.TempDir(), "b.yaml")
	if err := os.WriteFile(path, []byte(`
node: {id: node1, cluster: c1}
static_resources:
  clusters:
  - name: sds-grpc
    type: STATIC
    load_assignment:
      cluster_name: sds-grpc
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {pipe: {path: `+sock+`}}}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := bootstrap.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	d := &mesh.Dispatcher{}
	d.Swap(build(t, b))
	ts := httptest.NewServer((&Server{D: d, Start: time.Now()}).Handler())
	t.Cleanup(ts.Close)

	_, body := get(t, ts, "/clusters")
	for _, want := range []string{"sds-grpc::" + sock + "::cx_active::0\n", "sds-grpc::" + sock + "::health_flags::healthy\n"} {
		if !strings.Contains(body, want) {
			t.Errorf("/clusters lacks %q:\n%s", want, body)
		}
	}
	var cs adminv3.Clusters
	if err := protojson.Unmarshal([]byte(bodyOfTS(t, ts, "/clusters?format=json")), &cs); err != nil {
		t.Fatal(err)
	}
	hs := cs.GetClusterStatuses()[0].GetHostStatuses()
	if len(hs) != 1 || hs[0].GetAddress().GetPipe().GetPath() != sock {
		t.Errorf("json host statuses = %v, want one pipe %q", hs, sock)
	}
}
