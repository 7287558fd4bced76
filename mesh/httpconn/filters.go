package httpconn

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	udpatype "github.com/cncf/xds/go/udpa/type/v1"
	xdstype "github.com/cncf/xds/go/xds/type/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshtun/meshtun/mesh/rbac"

	"github.com/meshtun/meshtun/mesh/strmatch"
)

// HTTP filter names as Envoy and Istio write them.
const (
	RouterFilter = "envoy.filters.http.router"
	FaultFilter  = "envoy.filters.http.fault"
)

// noOpNames are the HTTP filters accepted and not run: Istio's telemetry
// and peer-metadata filters, gRPC stats and CORS (no effect on where a
// request goes; CORS preflights are proxied like any request), and the
// response compressor (Istio's bootstrap puts brotli/zstd/gzip on the
// :15090 stats listener; an uncompressed response is valid for any
// Accept-Encoding). Read only; no other package needs the list.
var noOpNames = map[string]bool{
	"istio.metadata_exchange":       true,
	"istio.alpn":                    true,
	"istio.stats":                   true,
	"envoy.filters.http.grpc_stats": true,
	"envoy.filters.http.cors":       true,
}

// noOpTypeURLs recognise the same filters by their config type.
var noOpTypeURLs = map[string]bool{
	"type.googleapis.com/io.istio.http.peer_metadata.Config":                        true,
	"type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig": true,
	"type.googleapis.com/stats.PluginConfig":                                        true,
	"type.googleapis.com/io.istio.stats.PluginConfig":                               true,
	"type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig":  true,
	"type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors":                true,
	"type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor":    true,
}

const (
	routerType = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
	faultType  = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
	filterCfg  = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
)

// typeURLOf returns the type a typed_config carries, looking through the
// TypedStruct wrappers (udpa.type.v1 and xds.type.v3).
func typeURLOf(a *anypb.Any) string {
	url, _ := unwrapTypedStruct(a)
	return url
}

func unwrapTypedStruct(a *anypb.Any) (string, *structpb.Struct) {
	if a == nil {
		return "", nil
	}
	switch a.GetTypeUrl() {
	case "type.googleapis.com/xds.type.v3.TypedStruct":
		var ts xdstype.TypedStruct
		if a.UnmarshalTo(&ts) == nil {
			return ts.GetTypeUrl(), ts.GetValue()
		}
	case "type.googleapis.com/udpa.type.v1.TypedStruct":
		var ts udpatype.TypedStruct
		if a.UnmarshalTo(&ts) == nil {
			return ts.GetTypeUrl(), ts.GetValue()
		}
	}
	return a.GetTypeUrl(), nil
}

// unmarshalConfig decodes a typed_config into m, also when it is a
// TypedStruct (its JSON value is decoded with protojson).
func unmarshalConfig(a *anypb.Any, m proto.Message) error {
	if _, st := unwrapTypedStruct(a); st != nil {
		js, err := protojson.Marshal(st)
		if err != nil {
			return err
		}
		return protojson.Unmarshal(js, m)
	}
	return a.UnmarshalTo(m)
}

// httpFilters is the compiled http_filters list: only what runs.
type httpFilters struct {
	faultName      string // name of the fault filter ("" when absent)
	fault          *faultConfig
	rbac           []rbacFilter // envoy.filters.http.rbac, in order
	faultFirst     bool         // the fault filter comes before the RBAC filters
	suppressEnvoy  bool         // router suppress_envoy_headers
	noOps          []string
	skippedOptions []string
}

func parseHTTPFilters(fs []*hcmv3.HttpFilter, statPrefix string) (httpFilters, error) {
	var out httpFilters
	if len(fs) == 0 {
		return out, fieldf("http_filters", "empty; %s is required", RouterFilter)
	}
	for i, f := range fs {
		field := fmt.Sprintf("http_filters[%d] (%s)", i, f.GetName())
		if f.GetConfigDiscovery() != nil {
			return out, fieldf(field, "config_discovery (ECDS) is not supported")
		}
		url := typeURLOf(f.GetTypedConfig())
		last := i == len(fs)-1
		switch {
		case f.GetName() == RouterFilter || url == routerType:
			if !last {
				return out, fieldf(field, "the router is a terminal filter and must be last")
			}
			var r routerv3.Router
			if f.GetTypedConfig() != nil {
				if err := unmarshalConfig(f.GetTypedConfig(), &r); err != nil {
					return out, fieldf(field, "typed_config: %w", err)
				}
			}
			if len(r.GetUpstreamHttpFilters()) > 0 {
				return out, fieldf(field, "upstream_http_filters: not supported")
			}
			out.suppressEnvoy = r.GetSuppressEnvoyHeaders()
			return out, nil
		case f.GetDisabled():
			// Disabled by default and enabled per route: never enabled here.
			out.skippedOptions = append(out.skippedOptions, f.GetName())
		case f.GetName() == FaultFilter || url == faultType:
			fc := &faultConfig{}
			if f.GetTypedConfig() != nil {
				var pb faultv3.HTTPFault
				if err := unmarshalConfig(f.GetTypedConfig(), &pb); err != nil {
					return out, fieldf(field, "typed_config: %w", err)
				}
				var err error
				if fc, err = compileFault(&pb); err != nil {
					return out, at(field, err)
				}
			}
			out.faultName, out.fault = f.GetName(), fc
			out.faultFirst = len(out.rbac) == 0
		case f.GetName() == rbac.HTTPName || url == rbac.HTTPTypeURL:
			rf, err := parseRBACFilter(f, statPrefix, field)
			if err != nil {
				return out, err
			}
			out.rbac = append(out.rbac, rf)
		case noOpNames[f.GetName()] || noOpTypeURLs[url]:
			out.noOps = append(out.noOps, f.GetName())
		case f.GetIsOptional():
			out.skippedOptions = append(out.skippedOptions, f.GetName())
		default:
			return out, fieldf(field, "unknown HTTP filter (type %q)", url)
		}
	}
	return out, fieldf("http_filters", "the last filter must be %s", RouterFilter)
}

// faultConfig is a compiled HTTPFault (abort and delay).
type faultConfig struct {
	delay       time.Duration
	headerDelay bool
	delayPPM    uint32 // percentage in parts per million
	hasDelay    bool

	abortStatus int // HTTP status; 0 with abortGRPC ≥ 0 for a gRPC abort
	abortGRPC   int // -1: none
	headerAbort bool
	abortPPM    uint32
	hasAbort    bool
	abortBody   string

	headers   []strmatch.Header
	cluster   string // upstream_cluster
	maxActive uint32 // 0: unlimited
	active    atomic.Int64
}

func compileFault(pb *faultv3.HTTPFault) (*faultConfig, error) {
	if err := pb.ValidateAll(); err != nil {
		return nil, err
	}
	fc := &faultConfig{abortGRPC: -1, cluster: pb.GetUpstreamCluster()}
	if d := pb.GetDelay(); d != nil {
		fc.hasDelay = true
		fc.delay = d.GetFixedDelay().AsDuration()
		fc.headerDelay = d.GetHeaderDelay() != nil
		fc.delayPPM = ppm(d.GetPercentage())
	}
	if a := pb.GetAbort(); a != nil {
		fc.hasAbort = true
		fc.abortPPM = ppm(a.GetPercentage())
		fc.abortBody = a.GetResponseBody()
		switch a.GetErrorType().(type) {
		case *faultv3.FaultAbort_HttpStatus:
			fc.abortStatus = int(a.GetHttpStatus())
		case *faultv3.FaultAbort_GrpcStatus:
			fc.abortGRPC = int(a.GetGrpcStatus())
		case *faultv3.FaultAbort_HeaderAbort_:
			fc.headerAbort = true
		}
	}
	for i, h := range pb.GetHeaders() {
		hm, err := compileHeaderMatcher(h, fmt.Sprintf("headers[%d]", i))
		if err != nil {
			return nil, err
		}
		fc.headers = append(fc.headers, hm)
	}
	if len(pb.GetDownstreamNodes()) > 0 {
		return nil, fieldf("downstream_nodes", "not supported")
	}
	if pb.GetResponseRateLimit() != nil {
		return nil, fieldf("response_rate_limit", "not supported")
	}
	if v := pb.GetMaxActiveFaults(); v != nil {
		fc.maxActive = v.GetValue()
	}
	return fc, nil
}

// ppm converts a FractionalPercent to parts per million.
func ppm(p *typev3.FractionalPercent) uint32 {
	if p == nil {
		return 0
	}
	n := uint64(p.GetNumerator())
	switch p.GetDenominator() {
	case typev3.FractionalPercent_HUNDRED:
		n *= 10000
	case typev3.FractionalPercent_TEN_THOUSAND:
		n *= 100
	}
	return uint32(min(n, 1000000))
}

func hit(ppm uint32) bool { return ppm > 0 && (ppm >= 1000000 || rand.Uint32N(1000000) < ppm) }

// parsePerFilterFault reads a typed_per_filter_config value if it is a
// fault config (ok=false for other filters' configs). A FilterConfig with
// disabled: true yields a nil config (fault disabled on the route).
func parsePerFilterFault(a *anypb.Any) (*faultConfig, bool, error) {
	url := typeURLOf(a)
	if url == filterCfg {
		var fc routev3.FilterConfig
		if err := unmarshalConfig(a, &fc); err != nil {
			return nil, false, err
		}
		if fc.GetDisabled() {
			return nil, true, nil
		}
		if fc.GetConfig() == nil {
			return nil, false, nil
		}
		a, url = fc.GetConfig(), typeURLOf(fc.GetConfig())
	}
	if url != faultType {
		return nil, false, nil
	}
	var pb faultv3.HTTPFault
	if err := unmarshalConfig(a, &pb); err != nil {
		return nil, false, err
	}
	f, err := compileFault(&pb)
	return f, true, err
}

// faultResult is what the fault filter did to a request.
type faultResult struct {
	delayed bool
	abort   int // HTTP status to answer with, 0: none
	grpc    int // gRPC status of the abort, -1: none
	body    string
}

// apply runs the fault filter on one request: it may sleep (delay) and
// return an abort. cluster is the route's target cluster.
func (fc *faultConfig) apply(ctx context.Context, r *http.Request, cluster string) (faultResult, error) {
	res := faultResult{grpc: -1}
	if fc == nil || (!fc.hasDelay && !fc.hasAbort) {
		return res, nil
	}
	if fc.cluster != "" && fc.cluster != cluster {
		return res, nil
	}
	for i := range fc.headers {
		if !matchHeader(&fc.headers[i], r) {
			return res, nil
		}
	}
	if fc.maxActive > 0 {
		if fc.active.Add(1) > int64(fc.maxActive) {
			fc.active.Add(-1)
			return res, nil
		}
		defer fc.active.Add(-1)
	}
	if fc.hasDelay && hit(fc.delayPPM) {
		d := fc.delay
		if fc.headerDelay {
			d = 0
			if ms, err := strconv.Atoi(r.Header.Get("X-Envoy-Fault-Delay-Request")); err == nil && ms > 0 {
				d = time.Duration(ms) * time.Millisecond
			}
		}
		if d > 0 {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return res, ctx.Err()
			}
			res.delayed = true
		}
	}
	if fc.hasAbort && hit(fc.abortPPM) {
		switch {
		case fc.headerAbort:
			if s, err := strconv.Atoi(r.Header.Get("X-Envoy-Fault-Abort-Request")); err == nil && s >= 200 && s < 600 {
				res.abort = s
			} else if g, err := strconv.Atoi(r.Header.Get("X-Envoy-Fault-Abort-Grpc-Request")); err == nil && g >= 0 {
				res.abort, res.grpc = http.StatusOK, g
			}
		case fc.abortGRPC >= 0:
			res.abort, res.grpc = http.StatusOK, fc.abortGRPC
		default:
			res.abort = fc.abortStatus
		}
		res.body = fc.abortBody
		if res.body == "" {
			res.body = "fault filter abort"
		}
	}
	return res, nil
}
