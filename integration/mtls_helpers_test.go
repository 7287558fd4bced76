//go:build linux

package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The mTLS tests (issue 14) run two meshed pods, A and B, each with its
// own `meshtun agent` (identity from `meshtun controlplane`'s CA, capture
// on), behind one services namespace that routes between them and runs
// the control plane:
//
//	pod A eth0 10.X.0.2 ── services vsXXXX 10.X.0.1 (CP: 15010, 15012, 15014)
//	pod B eth0 10.X.2.2 ── services vbXXXX 10.X.2.1
//	pod C eth0 10.X.3.2 ── services vbYYYY 10.X.3.1 (meshOpts.podC only)
//
// The wire between A and the services namespace (vsXXXX) is where the
// tests read what A's proxy sends to B.

// trustDomain is the control plane's default trust domain.
const trustDomain = "cluster.local"

// spiffeID is the SPIFFE ID the control plane's CA issues to default/sa.
func spiffeID(sa string) string { return "spiffe://" + trustDomain + "/ns/default/sa/" + sa }

// addPod adds pod B (10.X.2.2) to topo: addPodAt with subnet 2.
func addPod(t *testing.T, topo *topology) *topology { return addPodAt(t, topo, 2) }

// addPodAt adds another pod namespace to topo, joined to the services
// namespace by its own veth on 10.X.<subnet>.0/24 (pod .2, gateway .1),
// the services namespace forwarding between all pods. Each pod needs its
// own subnet: the control plane finds a workload by its address, and two
// pods on one address would share an identity. Subnets 0 (pod A) and 1
// (the services' addresses) are taken. The returned topology shares
// Services with topo; its Pod, PodV4, GwV4, SvcIface and StateDir are
// the new pod's (no IPv6).
func addPodAt(t *testing.T, topo *topology, subnet byte) *topology {
	t.Helper()
	if subnet < 2 {
		t.Fatalf("addPodAt: subnet %d is taken (0 is pod A's, 1 the services')", subnet)
	}
	x := topo.PodV4.As4()[1]
	suffix := randHex(3)
	b := &topology{Pod: fmt.Sprintf("mt%s-p%d", suffix, subnet), Services: topo.Services, PodIface: "eth0", SvcIface: "vb" + suffix,
		PodV4:    netip.AddrFrom4([4]byte{10, x, subnet, 2}),
		GwV4:     netip.AddrFrom4([4]byte{10, x, subnet, 1}),
		SvcV4:    topo.SvcV4,
		Svc2V4:   topo.Svc2V4,
		StateDir: t.TempDir(),
	}
	if _, err := run("ip", "netns", "add", b.Pod); err != nil {
		t.Fatalf("pod %s: %v", b.PodV4, err)
	}
	t.Cleanup(func() {
		if _, err := run("ip", "netns", "del", b.Pod); err != nil {
			t.Errorf("pod %s cleanup: %v", b.PodV4, err)
		}
	})
	ipn := func(ns string, args ...string) []string { return append([]string{"ip", "-n", ns}, args...) }
	steps := [][]string{
		{"ip", "netns", "exec", topo.Services, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"},
		ipn(b.Pod, "link", "set", "lo", "up"),
		ipn(b.Pod, "link", "add", b.PodIface, "type", "veth", "peer", "name", b.SvcIface, "netns", b.Services),
		ipn(b.Pod, "addr", "add", b.PodV4.String()+"/24", "dev", b.PodIface),
		ipn(b.Services, "addr", "add", b.GwV4.String()+"/24", "dev", b.SvcIface),
		ipn(b.Pod, "link", "set", b.PodIface, "up"),
		ipn(b.Services, "link", "set", b.SvcIface, "up"),
		ipn(b.Pod, "-4", "route", "add", "default", "via", b.GwV4.String()),
	}
	for _, s := range steps {
		if _, err := run(s[0], s[1:]...); err != nil {
			t.Fatalf("pod %s: %v", b.PodV4, err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, end := range [][2]string{{b.Pod, b.PodIface}, {b.Services, b.SvcIface}} {
		for {
			out, err := run("ip", "-n", end[0], "-o", "link", "show", end[1])
			if err == nil && strings.Contains(out, "LOWER_UP") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("pod %s: %s/%s has no carrier after 5s: %s %v", b.PodV4, end[0], end[1], out, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return b
}

// meshProfile is the control plane's profile for the mTLS tests: Istio's
// defaults (auto mTLS on, peer authentication mode as given) and the
// access log on /dev/stdout, so HTTP requests are logged too.
func meshProfile(name, peerAuth string) string {
	return "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: " + name + "}\nspec:\n" +
		"  enableAutoMtls: true\n  peerAuthentication: " + peerAuth + "\n  accessLogFile: /dev/stdout\n"
}

// meshPortDoc is one port of a registry service.
type meshPortDoc struct {
	name     string
	port     uint16
	protocol string
}

// meshServiceDoc is a registry service in namespace default whose
// endpoints are meshed when meshed is set: workloads with a sidecar (the
// injector's security.istio.io/tlsMode=istio pod), service account
// "default", so the control plane gives them istiod's
// `envoy.transport_socket_match: {tlsMode: istio}` metadata.
func meshServiceDoc(name string, vipAddr netip.Addr, ports []meshPortDoc, meshed bool, endpoints ...netip.Addr) string {
	var ps []string
	for _, p := range ports {
		ps = append(ps, fmt.Sprintf("{name: %s, port: %d, protocol: %s}", p.name, p.port, p.protocol))
	}
	s := fmt.Sprintf("- name: %s\n  namespace: default\n  vip: %s\n  ports: [%s]\n  endpoints:\n", name, vipAddr, strings.Join(ps, ", "))
	for _, e := range endpoints {
		if meshed {
			s += fmt.Sprintf("  - {address: %s, sidecar: true}\n", e)
		} else {
			s += fmt.Sprintf("  - {address: %s}\n", e)
		}
	}
	return s
}

// startMeshCP runs `meshtun controlplane` with its CA and ADS over TLS on
// GwV4:15012, serving registry with profile (a file it watches).
func startMeshCP(t *testing.T, topo *topology, registry, profile string) *meshtunCP {
	t.Helper()
	p := filepath.Join(t.TempDir(), "profile.yaml")
	if err := os.WriteFile(p, []byte(profile), 0o644); err != nil {
		t.Fatal(err)
	}
	return startMeshtunControlPlane(t, topo, registry, "--secure-address", ap(topo.GwV4, 15012), "--profile", p)
}

// meshToken mints a token for default/sa with the control plane cp.
func meshToken(t *testing.T, topo *topology, cp *meshtunCP, sa string) string {
	t.Helper()
	code, tok, stderr := meshtunCmd(t, topo.Services, "controlplane", "token", "--namespace", "default", "--service-account", sa,
		"--state-dir", filepath.Dir(cp.tokenFile))
	if code != 0 {
		t.Fatalf("controlplane token %s: %d %s", sa, code, stderr)
	}
	return strings.TrimSpace(tok)
}

// meshedAgent is a pod's `meshtun agent` with its workload identity.
type meshedAgent struct {
	*agentRun
	pod       *topology
	tokenFile string
	socket    string
}

// startMeshedAgent runs `meshtun agent` in pod (capture on) as pod podName
// of namespace default with service account sa: INSTANCE_IP is the pod's
// address (the control plane finds the workload by it), its token minted
// by cp, its CA and ADS cp's TLS port on topo's GwV4:15012. It waits (30 s
// at most) until the agent is ready: certificate issued, LDS and CDS in.
func startMeshedAgent(t *testing.T, topo, pod *topology, cp *meshtunCP, podName, sa string, env []string, extra ...string) *meshedAgent {
	t.Helper()
	dir := t.TempDir()
	tokenFile, socket := filepath.Join(dir, "istio-token"), filepath.Join(dir, "sds", "socket")
	if err := os.MkdirAll(filepath.Dir(socket), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokenFile, []byte(meshToken(t, topo, cp, sa)), 0o600); err != nil {
		t.Fatal(err)
	}
	e := agentEnv(append([]string{"ECC_SIGNATURE_ALGORITHM=ECDSA", "POD_NAME=" + podName, "INSTANCE_IP=" + pod.PodV4.String(),
		"SERVICE_ACCOUNT=" + sa}, env...)...)
	ag := startAgentNoWait(t, pod, e, append([]string{"--discovery-address", ap(topo.GwV4, 15012),
		"--ca-root-file", filepath.Join(filepath.Dir(cp.tokenFile), "ca", "root-cert.pem"),
		"--token-file", tokenFile, "--sds-socket", socket}, extra...)...)
	ag.name = "meshtun agent " + podName
	untilReadiness(t, pod, ag, 30*time.Second, "200", func(code int, _ string) bool { return code == 200 })
	return &meshedAgent{agentRun: ag, pod: pod, tokenFile: tokenFile, socket: socket}
}

// recHTTP is an HTTP server in a pod (the app) that answers
// "<name> <path> <proto>" and records each request it got.
type recHTTP struct {
	name string
	mu   sync.Mutex
	reqs []recReq
	n    atomic.Int64
}

// recReq is what the app saw of one request.
type recReq struct {
	Path, Proto, Remote string
	Header              http.Header
}

func startRecHTTP(t *testing.T, ns, addr, name string) *recHTTP {
	t.Helper()
	ln, err := listenTCP(ns, addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &recHTTP{name: name}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		s.mu.Lock()
		s.reqs = append(s.reqs, recReq{Path: r.URL.Path, Proto: r.Proto, Remote: r.RemoteAddr, Header: r.Header.Clone()})
		s.mu.Unlock()
		s.n.Add(1)
		fmt.Fprintf(w, "%s %s %s", s.name, r.URL.Path, r.Proto)
	})}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	go srv.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	return s
}

// requests returns the requests the app saw with the given path.
func (s *recHTTP) requests(path string) []recReq {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []recReq
	for _, r := range s.reqs {
		if r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

// getFrom does one HTTP/1.1 GET of url with host from inside ns and
// returns the status and body.
func getFrom(ns, url, host string, timeout time.Duration) (int, string, error) {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) { return dialTCP(ns, addr, timeout) },
		DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	req.Host = host
	resp, err := (&http.Client{Transport: tr, Timeout: timeout}).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// getUntil retries getFrom until it answers want (a configuration on its
// way: the first push, a profile flip), failing after d.
func getUntil(t *testing.T, ns, url, host string, want int, d time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		code, body, err := getFrom(ns, url, host, 2*time.Second)
		if err == nil && code == want {
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s (Host %s) from %s: %d %q %v after %v, want %d", url, host, ns, code, body, err, d, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// statsMap reads the proxy's /stats in pod as name → value (counters and
// gauges; histograms and text lines are skipped).
func statsMap(t *testing.T, pod *topology) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	for _, l := range strings.Split(adminGet(t, pod, "/stats"), "\n") {
		name, v, ok := strings.Cut(l, ": ")
		if !ok {
			continue
		}
		var n uint64
		if _, err := fmt.Sscan(v, &n); err == nil {
			out[name] = n
		}
	}
	return out
}

// statsWith returns the stats of pod whose name contains every part, for
// failure messages and sums over listeners whose addresses a test does
// not know in advance.
func statsWith(t *testing.T, pod *topology, parts ...string) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	for k, v := range statsMap(t, pod) {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(k, p)
		}
		if ok {
			out[k] = v
		}
	}
	return out
}

// sumStats adds the values of m whose name ends with suffix.
func sumStats(m map[string]uint64, suffix string) uint64 {
	var n uint64
	for k, v := range m {
		if strings.HasSuffix(k, suffix) {
			n += v
		}
	}
	return n
}

// ---------------------------------------------------------------- the wire

// sniffer reads every frame of one interface (an AF_PACKET socket opened
// in its namespace, both directions) and keeps the TCP payloads per
// direction of each flow, so a test can see what actually crossed the
// wire: TLS ClientHellos, or plaintext that should not be there.
type sniffer struct {
	fd     int
	done   chan struct{}
	closed atomic.Bool

	mu    sync.Mutex
	flows map[flowKey]*flowBytes
	err   error
}

// flowKey is one direction of a TCP flow.
type flowKey struct{ Src, Dst netip.AddrPort }

// flowBytes is the payload of one direction, by sequence number.
type flowBytes struct {
	isn  uint32 // the SYN's sequence number, if seen
	syn  bool
	segs map[uint32][]byte
}

// startSniffer opens a packet socket on iface in ns; t.Cleanup closes it.
func startSniffer(t *testing.T, ns, iface string) *sniffer {
	t.Helper()
	s := &sniffer{fd: -1, done: make(chan struct{}), flows: map[flowKey]*flowBytes{}}
	err := nsDo(ns, func() error {
		ifi, err := net.InterfaceByName(iface)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind AF_PACKET to %s: %w", iface, err)
		}
		// A receive timeout lets the reader see Close without a signal.
		tv := unix.Timeval{Usec: 100_000}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return err
		}
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 8<<20)
		s.fd = fd
		return nil
	})
	if err != nil {
		t.Fatalf("sniffer on %s/%s: %v", ns, iface, err)
	}
	go s.read()
	t.Cleanup(s.close)
	return s
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (s *sniffer) close() {
	if s.closed.Swap(true) {
		return
	}
	<-s.done
	unix.Close(s.fd)
}

func (s *sniffer) read() {
	defer close(s.done)
	buf := make([]byte, 256<<10) // GSO frames on a veth exceed the MTU
	for !s.closed.Load() {
		n, _, err := unix.Recvfrom(s.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			s.mu.Lock()
			s.err = err
			s.mu.Unlock()
			return
		}
		s.frame(buf[:n])
	}
}

// frame records the TCP payload of one Ethernet frame (IPv4 or IPv6).
func (s *sniffer) frame(b []byte) {
	if len(b) < 14 {
		return
	}
	et := binary.BigEndian.Uint16(b[12:14])
	b = b[14:]
	var src, dst netip.Addr
	var tcp []byte
	switch et {
	case 0x0800:
		if len(b) < 20 || b[9] != 6 {
			return
		}
		ihl := int(b[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(b[2:4]))
		if total == 0 || total > len(b) { // GSO frames may carry 0 or be cut
			total = len(b)
		}
		if ihl < 20 || total < ihl {
			return
		}
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
		tcp = b[ihl:total]
	case 0x86dd:
		if len(b) < 40 || b[6] != 6 { // no extension headers in these tests
			return
		}
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
		tcp = b[40:]
	default:
		return
	}
	if len(tcp) < 20 {
		return
	}
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return
	}
	k := flowKey{netip.AddrPortFrom(src, binary.BigEndian.Uint16(tcp[0:2])), netip.AddrPortFrom(dst, binary.BigEndian.Uint16(tcp[2:4]))}
	seq := binary.BigEndian.Uint32(tcp[4:8])
	syn := tcp[13]&0x02 != 0
	payload := tcp[off:]
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.flows[k]
	if f == nil {
		f = &flowBytes{segs: map[uint32][]byte{}}
		s.flows[k] = f
	}
	if syn {
		f.isn, f.syn = seq, true
	}
	if len(payload) > 0 {
		if old, ok := f.segs[seq]; !ok || len(old) < len(payload) {
			f.segs[seq] = append([]byte(nil), payload...)
		}
	}
}

// stream is the payload of one direction in sequence order, from the SYN
// on (or the lowest sequence seen), up to the first gap.
func (f *flowBytes) stream() []byte {
	seqs := make([]uint32, 0, len(f.segs))
	for q := range f.segs {
		seqs = append(seqs, q)
	}
	start := func(q uint32) uint32 {
		if f.syn {
			return q - (f.isn + 1) // relative: wraps correctly
		}
		return q
	}
	sort.Slice(seqs, func(i, j int) bool { return start(seqs[i]) < start(seqs[j]) })
	var out []byte
	var next uint32
	for i, q := range seqs {
		rel := start(q)
		seg := f.segs[q]
		if i == 0 {
			if f.syn && rel != 0 {
				return nil // the first bytes were missed
			}
			next = rel
		}
		if rel > next {
			break // gap
		}
		if end := rel + uint32(len(seg)); end > next {
			out = append(out, seg[next-rel:]...)
			next = end
		}
	}
	return out
}

// streams returns the payload of every direction sent to dst, by flow.
func (s *sniffer) streams(dst netip.AddrPort) map[flowKey][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[flowKey][]byte{}
	for k, f := range s.flows {
		if k.Dst == dst {
			out[k] = f.stream()
		}
	}
	return out
}

// allPayload is every TCP payload byte seen, in any direction and order:
// for "this must not appear on the wire" checks.
func (s *sniffer) allPayload() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []byte
	for _, f := range s.flows {
		for _, seg := range f.segs {
			out = append(out, seg...)
			out = append(out, 0)
		}
	}
	return out
}

func (s *sniffer) failure() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// clientHello is what a test checks of a TLS ClientHello.
type clientHello struct {
	SNI  string
	ALPN []string
}

// parseClientHello reads the ClientHello at the start of a client's
// stream: one or more TLS handshake records (a post-quantum key share can
// make it span several).
func parseClientHello(b []byte) (clientHello, error) {
	var hs []byte
	for len(b) >= 5 && b[0] == 0x16 {
		n := int(binary.BigEndian.Uint16(b[3:5]))
		if len(b) < 5+n {
			return clientHello{}, fmt.Errorf("TLS record of %d bytes cut at %d", n, len(b)-5)
		}
		hs = append(hs, b[5:5+n]...)
		b = b[5+n:]
		if len(hs) >= 4 && len(hs) >= 4+int(hs[1])<<16|int(hs[2])<<8|int(hs[3]) {
			break
		}
	}
	if len(hs) < 4 || hs[0] != 1 {
		return clientHello{}, fmt.Errorf("not a TLS ClientHello (first bytes %q)", head(b, 16))
	}
	n := int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3])
	if len(hs) < 4+n {
		return clientHello{}, fmt.Errorf("ClientHello of %d bytes cut at %d", n, len(hs)-4)
	}
	p := hs[4 : 4+n]
	// version(2) random(32) session_id cipher_suites compression extensions
	skip := func(k int) bool {
		if len(p) < k {
			return false
		}
		p = p[k:]
		return true
	}
	vec := func(lenBytes int) ([]byte, bool) {
		if len(p) < lenBytes {
			return nil, false
		}
		var l int
		for i := 0; i < lenBytes; i++ {
			l = l<<8 | int(p[i])
		}
		if len(p) < lenBytes+l {
			return nil, false
		}
		v := p[lenBytes : lenBytes+l]
		p = p[lenBytes+l:]
		return v, true
	}
	if !skip(34) {
		return clientHello{}, errors.New("ClientHello too short")
	}
	for _, lb := range []int{1, 2, 1} {
		if _, ok := vec(lb); !ok {
			return clientHello{}, errors.New("ClientHello truncated before its extensions")
		}
	}
	exts, ok := vec(2)
	if !ok {
		return clientHello{}, errors.New("ClientHello without extensions")
	}
	var ch clientHello
	for len(exts) >= 4 {
		typ := binary.BigEndian.Uint16(exts[0:2])
		l := int(binary.BigEndian.Uint16(exts[2:4]))
		if len(exts) < 4+l {
			return ch, errors.New("ClientHello extension truncated")
		}
		body := exts[4 : 4+l]
		exts = exts[4+l:]
		switch typ {
		case 0: // server_name: list(2) of type(1) name(2)
			if len(body) >= 5 && body[2] == 0 {
				nl := int(binary.BigEndian.Uint16(body[3:5]))
				if len(body) >= 5+nl {
					ch.SNI = string(body[5 : 5+nl])
				}
			}
		case 16: // ALPN: list(2) of name(1)
			if len(body) >= 2 {
				body = body[2:]
				for len(body) >= 1 && len(body) >= 1+int(body[0]) {
					ch.ALPN = append(ch.ALPN, string(body[1:1+int(body[0])]))
					body = body[1+int(body[0]):]
				}
			}
		}
	}
	return ch, nil
}

func head(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// helloTo waits (5 s at most) for a client flow to dst on the wire and
// returns the ClientHello it started with, or fails the test saying what
// the flow started with instead.
func (s *sniffer) helloTo(t *testing.T, dst netip.AddrPort) clientHello {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	var last string
	for {
		for k, b := range s.streams(dst) {
			if len(b) == 0 {
				continue
			}
			ch, err := parseClientHello(b)
			if err == nil {
				return ch
			}
			last = fmt.Sprintf("%v → %v: %v", k.Src, k.Dst, err)
			if len(b) > 0 && b[0] != 0x16 {
				t.Fatalf("flow %v → %v is not TLS on the wire: starts %q", k.Src, k.Dst, head(b, 64))
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no ClientHello to %v on the wire within 5s (sniffer error %v; last: %s)", dst, s.failure(), last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// checkNotOnWire fails the test if any of the markers crossed the wire.
func (s *sniffer) checkNotOnWire(t *testing.T, what string, markers ...string) {
	t.Helper()
	all := s.allPayload()
	for _, m := range markers {
		if bytes.Contains(all, []byte(m)) {
			t.Errorf("%s: %q is on the wire in plaintext", what, m)
		}
	}
}

// checkHello checks SNI and ALPN of a ClientHello: the SNI exactly, the
// ALPN list exactly (Istio's istio.alpn rewrite, never
// istio-peer-exchange).
func checkHello(t *testing.T, what string, ch clientHello, sni string, alpn []string) {
	t.Helper()
	if ch.SNI != sni {
		t.Errorf("%s: ClientHello SNI %q, want %q", what, ch.SNI, sni)
	}
	if !slices.Equal(ch.ALPN, alpn) {
		t.Errorf("%s: ClientHello ALPN %q, want %q", what, ch.ALPN, alpn)
	}
	if slices.Contains(ch.ALPN, "istio-peer-exchange") {
		t.Errorf("%s: ClientHello offers istio-peer-exchange (%q)", what, ch.ALPN)
	}
}

// accessJSON is an access line as a map, for the fields AccessEntry does
// not name.
func accessJSON(e AccessEntry) map[string]any {
	var m map[string]any
	_ = json.Unmarshal([]byte(e.Raw), &m)
	return m
}
