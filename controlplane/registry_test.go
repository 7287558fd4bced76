package controlplane

import (
	"strings"
	"testing"
)

// TestRegistryErrorsNameFileEntryAndField: every rejection names the file,
// the entry (with its service name) and the field, and says what is valid.
func TestRegistryErrorsNameFileEntryAndField(t *testing.T) {
	const svc = "services:\n- name: reviews\n  namespace: shop\n  vip: 10.96.0.20\n"
	for _, tc := range []struct {
		name, doc, want string
	}{
		{"protocol typo", svc + "  ports: [{port: 80, protocol: TCPP}]\n",
			`reg.yaml: services[0] (reviews.shop): ports[0].protocol: "TCPP" is not valid; valid choices: TCP, HTTP, TLS, UDP`},
		{"unknown field", svc + "  ports: [{port: 80, protocol: TCP, protocl: TCP}]\n",
			`reg.yaml: services[0] (reviews.shop): ports[0]: unknown field "protocl"; valid fields: name, port, protocol, targetPort`},
		{"unknown top-level field", "service: []\n",
			`reg.yaml: unknown field "service"; valid fields: apiVersion, authorizationPolicies, externalHosts, kind, services`},
		{"wrong type", svc + "  ports: [{port: eighty, protocol: TCP}]\n",
			`reg.yaml: services[0] (reviews.shop): ports[0].port: want a whole number, got "eighty"`},
		{"bad vip", "services:\n- name: reviews\n  vip: 10.96.0.300\n  ports: [{port: 80, protocol: TCP}]\n",
			`reg.yaml: services[0] (reviews.default): vip: "10.96.0.300" is not a unicast IP address`},
		{"bad name", "services:\n- name: Reviews\n  vip: 10.96.0.1\n  ports: [{port: 80, protocol: TCP}]\n",
			`reg.yaml: services[0] (Reviews.default): name: "Reviews" is not a DNS label`},
		{"port range", svc + "  ports: [{port: 70000, protocol: TCP}]\n",
			`reg.yaml: services[0] (reviews.shop): ports[0].port: want 1 to 65535, got 70000`},
		{"no ports", svc,
			`reg.yaml: services[0] (reviews.shop): ports: at least one port is required`},
		{"duplicate port", svc + "  ports: [{port: 53, protocol: TCP}, {port: 53, protocol: UDP}]\n",
			`reg.yaml: services[0] (reviews.shop): ports[1].port: 53 is already used by ports[0]`},
		{"endpoint address", svc + "  ports: [{port: 80, protocol: TCP}]\n  endpoints: [{address: reviews-0}]\n",
			`reg.yaml: services[0] (reviews.shop): endpoints[0].address: "reviews-0" is not a unicast IP address`},
		{"endpoint port name", svc + "  ports: [{name: http, port: 80, protocol: HTTP}]\n  endpoints: [{address: 10.1.0.1, ports: {htp: 8080}}]\n",
			`reg.yaml: services[0] (reviews.shop): endpoints[0].ports.htp: no service port is named "htp"`},
		{"endpoint weight", svc + "  ports: [{port: 80, protocol: TCP}]\n  endpoints: [{address: 10.1.0.1, weight: 0}]\n",
			`reg.yaml: services[0] (reviews.shop): endpoints[0].weight: must be at least 1`},
		{"locality", svc + "  ports: [{port: 80, protocol: TCP}]\n  endpoints: [{address: 10.1.0.1, locality: a//c}]\n",
			`reg.yaml: services[0] (reviews.shop): endpoints[0].locality: "a//c": want region, region/zone or region/zone/subzone`},
		{"ambiguous endpoint port", svc + "  ports: [{port: 80, protocol: TCP}, {port: 81, protocol: TCP}]\n  endpoints: [{address: 10.1.0.1, port: 8080}]\n",
			`reg.yaml: services[0] (reviews.shop): endpoints[0].port: ambiguous with 2 service ports`},
		{"duplicate service", svc + "  ports: [{port: 80, protocol: TCP}]\n- name: reviews\n  namespace: shop\n  vip: 10.96.0.21\n  ports: [{port: 80, protocol: TCP}]\n",
			`reg.yaml: services[1] (reviews.shop): name: service reviews.shop.svc.cluster.local is already defined by services[0] (reviews.shop)`},
		{"vip port conflict", svc + "  ports: [{port: 80, protocol: TCP}]\n- name: ratings\n  vip: 10.96.0.20\n  ports: [{port: 80, protocol: TCP}]\n",
			`reg.yaml: services[1] (ratings.default): ports: TCP port 80 of ratings.default.svc.cluster.local conflicts with TCP port 80 of reviews.shop.svc.cluster.local (services[0] (reviews.shop)) on 10.96.0.20:80`},
		{"resolution", "externalHosts:\n- hosts: [api.example.com]\n  ports: [{port: 443, protocol: TLS}]\n  resolution: DNSS\n",
			`reg.yaml: externalHosts[0] (api.example.com): resolution: "DNSS" is not valid; valid choices: NONE, STATIC, DNS`},
		{"wildcard needs NONE", "externalHosts:\n- hosts: [\"*.example.com\"]\n  ports: [{port: 443, protocol: TLS}]\n  resolution: DNS\n",
			`reg.yaml: externalHosts[0] (*.example.com): hosts[0]: wildcard host "*.example.com" needs resolution NONE (got DNS)`},
		{"static needs endpoints", "externalHosts:\n- hosts: [db.example.com]\n  ports: [{port: 5432, protocol: TCP}]\n  resolution: STATIC\n",
			`reg.yaml: externalHosts[0] (db.example.com): endpoints: resolution STATIC needs at least one endpoint`},
		{"wildcard TCP conflict", "externalHosts:\n- hosts: [a.example.com]\n  ports: [{port: 5432, protocol: TCP}]\n- hosts: [b.example.com]\n  ports: [{port: 5432, protocol: TCP}]\n",
			`reg.yaml: externalHosts[1] (b.example.com): ports: TCP port 5432 of b.example.com conflicts with TCP port 5432 of a.example.com (externalHosts[0] (a.example.com)) on 0.0.0.0:5432 (no addresses: the wildcard listener); only TLS ports (told apart by SNI) or HTTP ports (told apart by Host) can share`},
		{"HTTP and TCP on one VIP", svc + "  ports: [{port: 80, protocol: HTTP}]\n- name: ratings\n  vip: 10.96.0.20\n  ports: [{port: 80, protocol: TCP}]\n",
			`reg.yaml: services[1] (ratings.default): ports: TCP port 80 of ratings.default.svc.cluster.local conflicts with HTTP port 80 of reviews.shop.svc.cluster.local (services[0] (reviews.shop)) on 10.96.0.20:80`},
		{"HTTP port and a TLS host without addresses", svc + "  ports: [{port: 443, protocol: HTTP}]\nexternalHosts:\n- hosts: [api.example.com]\n  ports: [{port: 443, protocol: TLS}]\n",
			`reg.yaml: externalHosts[0] (api.example.com): ports: TLS port 443 of api.example.com conflicts with HTTP port 443 of reviews.shop.svc.cluster.local (services[0] (reviews.shop)): both need the wildcard listener 0.0.0.0_443`},
		{"external unknown field", "externalHosts:\n- hosts: [a.example.com]\n  location: MESH_EXTERNAL\n",
			`reg.yaml: externalHosts[0] (a.example.com): unknown field "location"; valid fields: addresses, endpoints, hosts, ports, resolution`},
		{"kind", "kind: ServiceEntry\n", `reg.yaml: kind: "ServiceEntry" is not valid; valid choices: Registry`},
		{"yaml syntax", "services: [\n", `reg.yaml: yaml: line 1`},
		{"duplicate key", "services: []\nservices: []\n", `reg.yaml: yaml: unmarshal errors`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseRegistry("reg.yaml", []byte(tc.doc))
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error\n  %s\ndoes not contain\n  %s", err, tc.want)
			}
		})
	}
}

// TestRegistryTLSHostsShareWildcard: TLS external hosts without addresses
// share 0.0.0.0:443, one SNI chain each; the endpoint port rules hold.
func TestRegistryTLSHostsShareWildcard(t *testing.T) {
	r, err := parseRegistry("reg.yaml", []byte(`
externalHosts:
- hosts: [a.example.com, b.example.com]
  ports: [{name: https, port: 443, protocol: tls}]
  resolution: DNS
- hosts: ["*.example.org"]
  ports: [{port: 443, protocol: TLS}]
services:
- name: web
  vip: 10.0.0.1
  ports: [{name: http, port: 80, targetPort: 8080, protocol: HTTP}, {name: admin, port: 81, protocol: TCP}]
  endpoints:
  - {address: 10.1.0.1}
  - {address: 10.1.0.2, ports: {admin: 9901}}
`))
	if err != nil {
		t.Fatal(err)
	}
	var shared *listenerPlan
	for _, pl := range r.listeners {
		if pl.addr.String() == "0.0.0.0:443" {
			shared = pl
		}
	}
	if shared == nil || len(shared.routes) != 3 || shared.protocol != protocolTLS {
		t.Fatalf("0.0.0.0:443 plan: %+v", shared)
	}
	web := r.hosts[0]
	if web.Name != "web.default.svc.cluster.local" {
		t.Fatalf("first host %s", web.Name)
	}
	got := [4]uint32{web.Endpoints[0].PortFor(web.Ports[0]), web.Endpoints[0].PortFor(web.Ports[1]),
		web.Endpoints[1].PortFor(web.Ports[0]), web.Endpoints[1].PortFor(web.Ports[1])}
	if got != [4]uint32{8080, 81, 8080, 9901} {
		t.Errorf("endpoint ports %v, want [8080 81 8080 9901]", got)
	}
}
