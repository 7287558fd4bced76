package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/logging"
	"github.com/meshtun/meshtun/tun"
)

// CaptureOptions are the agent's capture settings; the pod annotations'
// exclusions are added to the ones given here.
type CaptureOptions struct {
	// Mode is "sidecar" (the agent installs capture), "attach" (the
	// init container installed it through a persistent TUN the agent's
	// user owns: the least-privilege sidecar attaches to it and changes
	// nothing on the host), "none", or "" to follow INTERCEPTION_MODE
	// (NONE means none, else sidecar).
	Mode string
	// TunOwner, with --capture-only, makes the TUN persistent and owned
	// by this uid (TunGroup: gid, -1 none), and exempts the uid's sockets
	// from capture: the unprivileged sidecar then attaches (Mode attach).
	TunOwner, TunGroup int
	// TunNode is the TUN clone device (default /dev/net/tun); an emptyDir
	// path shares the node the init container made with the sidecar.
	TunNode              string
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
	if co.Mark == 0 && co.Mode != "attach" {
		co.Mark = 0x539
	}
	if co.TunNode == "" {
		co.TunNode = "/dev/net/tun"
	}
}

// setupCapture opens the TUN and installs capture, blocked until a proxy
// serves.
func (a *agent) setupCapture(in *Inputs) error {
	co := a.cfg.Capture
	mode, err := captureMode(co.Mode, in.InterceptionMode)
	if err != nil {
		return err
	}
	a.cfg.Capture.Mode = mode
	a.podIPs = co.PodIPs
	if mode == "none" || mode == "local" {
		// Laptop mode: the proxy routes the CIDRs into its own TUN and
		// takes them down when it exits; there is no pod traffic to hold.
		return nil
	}
	if mode == "attach" {
		// Capture is the init container's; this agent only holds the
		// device for its proxies. It changes no route (it could not), so
		// nothing is blocked while no proxy serves: the kernel drops what
		// reaches the TUN while nobody reads it.
		dev, err := tun.Attach(co.TunName, co.TunNode, co.TunMTU)
		if err != nil {
			return err
		}
		_, ips, err := tun.PodAddrs(co.PodInterface, co.PodIPs)
		if err != nil {
			dev.Close()
			return err
		}
		a.dev, a.podIPs = dev, ips
		a.log.Info().Str("tun", co.TunName).Int("uid", os.Getuid()).Msg("attached to the init container's TUN; capture is the init container's")
		return nil
	}
	dev, capt, err := installCapture(co, in.Exclusions, agentPorts(in.ProxyConfig, in.ReadinessPort), a.root)
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

// agentPorts are the agent's and the proxy's own ports that inbound
// capture must leave alone, as it does Istio's defaults
// (tun.AlwaysExcludedInboundPorts()): the admin port, the status port and
// the readiness port, when configured elsewhere. A probe or a scrape must
// get an answer while no proxy serves.
func agentPorts(pc ProxyConfig, readinessPort int) []tun.PortRange {
	var out []tun.PortRange
	for _, p := range []int{pc.ProxyAdminPort, pc.StatusPort, readinessPort} {
		if p < 1 || p > 65535 {
			continue
		}
		pr := tun.PortRange{Start: uint16(p), End: uint16(p)}
		covered := slices.ContainsFunc(append(tun.AlwaysExcludedInboundPorts(), out...), func(r tun.PortRange) bool {
			return r.Start <= pr.Start && pr.End <= r.End
		})
		if !covered {
			out = append(out, pr)
		}
	}
	return out
}

// captureConfig is the capture of the flags' options, the annotations'
// exclusions and the agent's own ports together.
func captureConfig(co CaptureOptions, tunName string, ex Exclusions, ports []tun.PortRange) tun.CaptureConfig {
	return tun.CaptureConfig{
		TunName:              tunName,
		Mark:                 co.Mark,
		PodInterface:         co.PodInterface,
		PodIPs:               co.PodIPs,
		Inbound:              co.Inbound && !ex.NoInbound,
		ExcludeOutboundPorts: append(slices.Clone(co.ExcludeOutboundPorts), ex.OutboundPorts...),
		ExcludeOutboundCIDRs: append(slices.Clone(co.ExcludeOutboundCIDRs), ex.OutboundCIDRs...),
		ExcludeInboundPorts:  append(append(slices.Clone(co.ExcludeInboundPorts), ex.InboundPorts...), ports...),
		StateDir:             co.StateDir,
	}
}

// installCapture opens the TUN and sets up capture (captureConfig). log
// is the root logger.
func installCapture(co CaptureOptions, ex Exclusions, ports []tun.PortRange, log zerolog.Logger) (*tun.Device, *tun.Capture, error) {
	dev, err := tun.Open(tun.DeviceConfig{Name: co.TunName, MTU: co.TunMTU})
	if err != nil {
		return nil, nil, err
	}
	capt, err := tun.SetupCapture(captureConfig(co, dev.Name(), ex, ports), logging.Component(log, "capture"))
	if err != nil {
		dev.Close()
		return nil, nil, err
	}
	return dev, capt, nil
}

func (a *agent) teardownCapture() {
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
//
// Interception mode NONE (--capture none, or ISTIO_META_INTERCEPTION_MODE
// NONE without --capture) captures nothing: the injector adds no
// istio-init to such a pod, and its sidecar agent installs no capture, so
// the init container changes nothing and says so. Laptop mode has no init
// container: --capture local is an error.
func CaptureOnly(co CaptureOptions, src Sources, root zerolog.Logger) error {
	co.setDefaults()
	log := logging.Component(root, "agent")
	env := environ(src)
	im, err := interceptionMode(env)
	if err != nil {
		return err
	}
	mode, err := captureMode(co.Mode, im)
	if err != nil {
		return err
	}
	switch mode {
	case "local":
		return errors.New("--capture-only: laptop mode (--mode local, --capture local) has no init container; drop --capture-only (the proxy routes the CIDRs itself)")
	case "none":
		why := "--capture none"
		if co.Mode == "" {
			why = envInterception + "=NONE"
		}
		log.Info().Str("reason", why).Msg("capture-only: interception mode NONE, no capture installed; nothing changed")
		return nil
	}
	ex, warnings, err := loadExclusions(src)
	if err != nil {
		return err
	}
	for _, w := range warnings {
		log.Warn().Msg(w)
	}
	// The agent's ports stay uncaptured from the start; without
	// PROXY_CONFIG they are Istio's defaults, which capture always excludes.
	pc, _, err := loadProxyConfig(src, env)
	if err != nil {
		return err
	}
	readiness := src.ReadinessPort
	if readiness == 0 {
		readiness = defaultReadinessPort
	}
	if co.TunOwner > 0 {
		return persistentCapture(co, ex, agentPorts(pc, readiness), root)
	}
	dev, capt, err := installCapture(co, ex, agentPorts(pc, readiness), root)
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

// loadExclusions reads only the capture annotations (an init container
// has no pod identity to build a bootstrap from).
func loadExclusions(src Sources) (Exclusions, []string, error) {
	env := environ(src)
	annots, err := podInfo(env, envAnnotsJSON, src.AnnotationsFile)
	if err != nil {
		return Exclusions{}, nil, err
	}
	return exclusionsFrom(annots, annotationSource(env, src.AnnotationsFile))
}

// captureMode resolves --capture (flag; "" when unset) against the pod's
// interception mode: unset means sidecar, or none for interception mode
// NONE, as Istio installs no capture for such a pod.
func captureMode(flag, interception string) (string, error) {
	switch flag {
	case "":
		if interception == "NONE" {
			return "none", nil
		}
		return "sidecar", nil
	case "sidecar", "none", "local", "attach":
		return flag, nil
	}
	return "", fmt.Errorf("--capture %q: want sidecar, attach, none or local", flag)
}

// persistentCapture is --capture-only --tun-owner: the least-privilege
// split's init step. The TUN is made persistent and owned by the sidecar's
// user, capture goes through it unblocked (the sidecar cannot change
// routes later) with that user's own sockets exempt, and the process
// exits: until the sidecar attaches, the kernel drops what capture routes
// to the unread device, so nothing leaves uncaptured.
func persistentCapture(co CaptureOptions, ex Exclusions, ports []tun.PortRange, root zerolog.Logger) error {
	log := logging.Component(root, "agent")
	if err := tun.CreatePersistent(tun.DeviceConfig{Name: co.TunName, MTU: co.TunMTU}, co.TunNode, co.TunOwner, co.TunGroup); err != nil {
		return err
	}
	cfg := captureConfig(co, co.TunName, ex, ports)
	cfg.OwnerUID = co.TunOwner
	if _, err := tun.SetupCapture(cfg, logging.Component(root, "capture")); err != nil {
		return err
	}
	log.Info().Str("tun", co.TunName).Int("owner", co.TunOwner).Int("group", co.TunGroup).Str("node", co.TunNode).
		Msg("capture installed through a persistent TUN; dropped until the sidecar (as its owner) attaches")
	return nil
}
