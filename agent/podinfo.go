package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/meshtun/meshtun/tun"
)

// Istio's traffic annotations, as the injector copies them into the pod.
const (
	annotationExcludeOutboundPorts    = "traffic.sidecar.istio.io/excludeOutboundPorts"
	annotationExcludeOutboundIPRanges = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
	annotationExcludeInboundPorts     = "traffic.sidecar.istio.io/excludeInboundPorts"
	annotationIncludeInboundPorts     = "traffic.sidecar.istio.io/includeInboundPorts"
	annotationIncludeOutboundIPRanges = "traffic.sidecar.istio.io/includeOutboundIPRanges"
	annotationIncludeOutboundPorts    = "traffic.sidecar.istio.io/includeOutboundPorts"
)

// Exclusions are what capture leaves alone, from the pod's annotations.
type Exclusions struct {
	OutboundPorts []tun.PortRange
	OutboundCIDRs []netip.Prefix
	InboundPorts  []tun.PortRange
	// NoInbound: includeInboundPorts is "" (Istio: capture no inbound).
	NoInbound bool
}

// parseDownwardAPI reads a downward-API file: one key="value" per line,
// the value quoted as Go quotes strings (Kubernetes' format).
func parseDownwardAPI(s string) (map[string]string, error) {
	out := map[string]string{}
	for i, line := range strings.Split(s, "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("line %d: want key=\"value\", got %q", i+1, line)
		}
		uv, err := strconv.Unquote(v)
		if err != nil {
			return nil, fmt.Errorf("line %d: value of %s: want a quoted string, got %s", i+1, k, v)
		}
		out[k] = uv
	}
	return out, nil
}

// exclusionsFrom reads the capture annotations; source names where they
// came from in errors. Annotations meshtun cannot honour exactly are
// reported as warnings, and capture stays the wider of the two.
func exclusionsFrom(annots map[string]string, source string) (Exclusions, []string, error) {
	var ex Exclusions
	var warnings []string
	field := func(name string) string { return "annotation " + name + " (" + source + ")" }
	var err error
	if v, ok := annots[annotationExcludeOutboundPorts]; ok {
		if ex.OutboundPorts, err = tun.ParsePorts(v); err != nil {
			return ex, nil, fmt.Errorf("%s: %w", field(annotationExcludeOutboundPorts), err)
		}
	}
	if v, ok := annots[annotationExcludeOutboundIPRanges]; ok {
		if strings.TrimSpace(v) == "*" {
			ex.OutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
		} else if ex.OutboundCIDRs, err = tun.ParseCIDRs(v); err != nil {
			return ex, nil, fmt.Errorf("%s: %w", field(annotationExcludeOutboundIPRanges), err)
		}
	}
	if v, ok := annots[annotationExcludeInboundPorts]; ok {
		if ex.InboundPorts, err = tun.ParsePorts(v); err != nil {
			return ex, nil, fmt.Errorf("%s: %w", field(annotationExcludeInboundPorts), err)
		}
	}
	if v, ok := annots[annotationIncludeInboundPorts]; ok {
		switch strings.TrimSpace(v) {
		case "":
			ex.NoInbound = true
		case "*":
		default:
			if _, err := tun.ParsePorts(v); err != nil {
				return ex, nil, fmt.Errorf("%s: %w", field(annotationIncludeInboundPorts), err)
			}
			warnings = append(warnings, field(annotationIncludeInboundPorts)+": a port list is not supported; every inbound port is captured (use excludeInboundPorts)")
		}
	}
	if v, ok := annots[annotationIncludeOutboundIPRanges]; ok && strings.TrimSpace(v) == "" {
		// Istio: no outbound destination is captured.
		ex.OutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
	}
	for _, name := range []string{annotationIncludeOutboundIPRanges, annotationIncludeOutboundPorts} {
		if v, ok := annots[name]; ok && !slices.Contains([]string{"*", ""}, strings.TrimSpace(v)) {
			warnings = append(warnings, field(name)+": not supported; all outbound TCP/UDP is captured (use the exclude annotations)")
		}
	}
	return ex, warnings, nil
}
