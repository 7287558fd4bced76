package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/logging"
	"github.com/meshtun/meshtun/tun"
)

// CaptureOptions are the agent's capture settings; the pod annotations'
// exclusions are added to the ones given here.
type CaptureOptions struct {
	// Mode is "sidecar" (the agent installs capture), "none", or "" to
	// follow INTERCEPTION_MODE (NONE means none, else sidecar).
	Mode                 string
	TunName              string
	TunMTU               int
	StateDir             string
	Mark                 uint32
	PodInterface         string
	PodIPs               []netip.Addr
	Inbound              bool
	ExcludeOutboundPorts []tun.PortRange
	ExcludeOutboundCIDRs []netip.Prefix
	ExcludeInboundPorts  []tun.PortRange
	// CIDRs are laptop mode's (Mode "local") captured destinations.
	CIDRs []netip.Prefix
}

func (co *CaptureOptions) setDefaults() {
	if co.TunName == "" {
		co.TunName = "meshtun0"
	}
	if co.TunMTU == 0 {
		co.TunMTU = 65535
	}
	if co.Mark == 0 {
		co.Mark = 0x539
	}
}

// setupCapture opens the TUN and installs capture, blocked until a proxy
// serves.
func (a *Agent) setupCapture(in *Inputs) error {
	co := a.cfg.Capture
	mode := co.Mode
	if mode == "" {
		mode = "sidecar"
		if in.InterceptionMode == "NONE" {
			mode = "none"
		}
	}
	a.cfg.Capture.Mode = mode
	a.podIPs = co.PodIPs
	if mode == "none" || mode == "local" {
		// Laptop mode: the proxy routes the CIDRs into its own TUN and
		// takes them down when it exits; there is no pod traffic to hold.
		return nil
	}
	if mode != "sidecar" {
		return fmt.Errorf("capture mode %q: want sidecar or none", mode)
	}
	dev, capt, err := installCapture(co, in.Exclusions, a.root)
	if err != nil {
		return err
	}
	if err := capt.Block(); err != nil {
		_ = capt.Teardown()
		dev.Close()
		return err
	}
	a.dev, a.capture, a.podIPs = dev, capt, capt.PodIPs()
	return nil
}

// installCapture opens the TUN and sets up capture with the exclusions of
// the flags and of the annotations together. log is the root logger.
func installCapture(co CaptureOptions, ex Exclusions, log zerolog.Logger) (*tun.Device, *tun.Capture, error) {
	dev, err := tun.Open(tun.DeviceConfig{Name: co.TunName, MTU: co.TunMTU})
	if err != nil {
		return nil, nil, err
	}
	capt, err := tun.SetupCapture(tun.CaptureConfig{
		TunName:              dev.Name(),
		Mark:                 co.Mark,
		PodInterface:         co.PodInterface,
		PodIPs:               co.PodIPs,
		Inbound:              co.Inbound && !ex.NoInbound,
		ExcludeOutboundPorts: append(slices.Clone(co.ExcludeOutboundPorts), ex.OutboundPorts...),
		ExcludeOutboundCIDRs: append(slices.Clone(co.ExcludeOutboundCIDRs), ex.OutboundCIDRs...),
		ExcludeInboundPorts:  append(slices.Clone(co.ExcludeInboundPorts), ex.InboundPorts...),
		StateDir:             co.StateDir,
	}, logging.Component(log, "capture"))
	if err != nil {
		dev.Close()
		return nil, nil, err
	}
	return dev, capt, nil
}

func (a *Agent) teardownCapture() {
	if a.capture != nil {
		if err := a.capture.Teardown(); err != nil {
			a.log.Error().Err(err).Msg("capture teardown")
		}
	}
	if a.dev != nil {
		a.dev.Close()
	}
}

// CaptureOnly is `meshtun agent --capture-only`, the init container
// (istio-init): it installs capture, blocked, and exits leaving it in
// place. The TUN goes with the process, but blocked routes do not need
// it: until the sidecar's agent takes over (its setup replaces this
// capture), the pod's captured traffic is refused, never sent uncaptured.
func CaptureOnly(co CaptureOptions, src Sources, root zerolog.Logger) error {
	co.setDefaults()
	log := logging.Component(root, "agent")
	ex, warnings, err := LoadExclusions(src)
	if err != nil {
		return err
	}
	for _, w := range warnings {
		log.Warn().Msg(w)
	}
	dev, capt, err := installCapture(co, ex, root)
	if err != nil {
		return err
	}
	defer dev.Close()
	if err := capt.Block(); err != nil {
		_ = capt.Teardown()
		return err
	}
	log.Info().Msg("capture installed and blocked until the agent's proxy serves")
	return nil
}

// LoadExclusions reads only the capture annotations (an init container
// has no pod identity to build a bootstrap from).
func LoadExclusions(src Sources) (Exclusions, []string, error) {
	env := map[string]string{}
	for _, kv := range src.Environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	annots, err := podInfo(env, envAnnotsJSON, src.AnnotationsFile)
	if err != nil {
		return Exclusions{}, nil, err
	}
	return exclusionsFrom(annots, annotationSource(env, src.AnnotationsFile))
}
