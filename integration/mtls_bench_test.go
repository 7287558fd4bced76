//go:build linux && bench

package integration

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

// The mTLS benchmark's knobs: a measurement for `make bench`, not a
// pass/fail test of speed.
const (
	mbRounds   = 3
	mbSeconds  = 5 * time.Second // bulk throughput per sample
	mbRR       = 5000            // 64 B request/response on one flow
	mbRRWarmup = 500
	mbConns    = 300 // connect + RR + close
	portSink   = 9001
	portResume = 9002 // A's static listener: TLS with session resumption off
)

// sinkServer counts what it reads and, at the client's FIN, answers with
// the count (8 bytes, big endian), so the client knows when every byte
// arrived.
func sinkServer(c *net.TCPConn) {
	buf := make([]byte, 256<<10)
	var n uint64
	for {
		k, err := c.Read(buf)
		n += uint64(k)
		if err != nil {
			break
		}
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], n)
	_, _ = c.Write(b[:])
}

// bulk sends for d on one connection to dst from ns and returns the
// bits/s the sink received (its byte count over the time to its answer).
func bulk(ns, dst string, d time.Duration) (float64, error) {
	c, err := dialTCP(ns, dst, dialTimeout)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, 128<<10)
	start := time.Now()
	_ = c.SetDeadline(start.Add(d + 30*time.Second))
	for time.Since(start) < d {
		if _, err := c.Write(buf); err != nil {
			return 0, err
		}
	}
	if err := c.CloseWrite(); err != nil {
		return 0, err
	}
	var ack [8]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		return 0, fmt.Errorf("sink's count: %w", err)
	}
	return float64(binary.BigEndian.Uint64(ack[:])) * 8 / time.Since(start).Seconds(), nil
}

// rrLatency does n timed 64-byte exchanges (after warm untimed ones) on
// one connection to an echo server and returns p50 and p99 in µs.
func rrLatency(ns, dst string, warm, n int) (float64, float64, error) {
	c, err := dialTCP(ns, dst, dialTimeout)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	_ = c.SetNoDelay(true)
	_ = c.SetDeadline(time.Now().Add(5 * time.Minute))
	msg, got := make([]byte, 64), make([]byte, 64)
	lat := make([]float64, 0, n)
	for i := 0; i < warm+n; i++ {
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			return 0, 0, err
		}
		if _, err := io.ReadFull(c, got); err != nil {
			return 0, 0, err
		}
		if i >= warm {
			lat = append(lat, float64(time.Since(t0).Nanoseconds())/1e3)
		}
	}
	slices.Sort(lat)
	return lat[len(lat)/2], lat[len(lat)*99/100], nil
}

// connectRate opens n connections to an echo server one after the other,
// each connect + 64 B exchange + close, and returns connections/s (one
// client, one at a time), the p50
// of one in µs, and how many failed (counted, not retried: a benchmark
// reports them rather than stopping).
func connectRate(ns, dst string, n int) (float64, float64, int, error) {
	msg, got := make([]byte, 64), make([]byte, 64)
	lat := make([]float64, 0, n)
	var failed int
	var last error
	for i := 0; i < n; i++ {
		t0 := time.Now()
		c, err := dialTCP(ns, dst, dialTimeout)
		if err == nil {
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err = c.Write(msg); err == nil {
				_, err = io.ReadFull(c, got)
			}
			c.Close()
		}
		if err != nil {
			failed++
			last = err
			continue
		}
		lat = append(lat, float64(time.Since(t0).Nanoseconds())/1e3)
	}
	if len(lat) == 0 {
		return 0, 0, failed, fmt.Errorf("every connection failed, the last: %w", last)
	}
	// The rate is over the successful connections' own time: a failed
	// one waits for its connect timeout, which would swamp the rate; the
	// failures are reported apart.
	var busy float64
	for _, l := range lat {
		busy += l
	}
	rate := float64(len(lat)) / (busy / 1e6)
	slices.Sort(lat)
	return rate, lat[len(lat)/2], failed, nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// TestMTLSBench is issue 14's benchmark: two meshed pods (ECDSA P-256
// workload certificates from the control plane's CA), A → service b
// through capture on both sides, mTLS (PERMISSIVE, endpoints tlsMode
// istio) against plaintext (the same pods with peerAuthentication
// DISABLE), alternating each round: bulk throughput on one stream, 64 B
// request/response p50/p99 on an established flow, and new connections
// per second (connect + RR + close), with TLS session resumption as the
// generated clusters do it and, separately, with resumption off (a static
// cluster in A's bootstrap with max_session_keys 0). Medians of the rounds;
// the session_reused counters show what the connection rows measured.
func TestMTLSBench(t *testing.T) {
	requireRoot(t)
	var vipNoResume netip.Addr
	clNoResume := "outbound|9000||b-noresume.default.svc.cluster.local"
	m := newMeshTestHook(t, meshOpts{bPorts: []meshPortDoc{{"sink", portSink, "TCP"}}, bExtra: []string{"--log-level", "warn"}}, func(topo, podB *topology) []string {
		vipNoResume = vip(topo, false, 48)
		c := staticCluster(clNoResume, "ROUND_ROBIN", netip.AddrPortFrom(podB.PodV4, portTCP))
		ts := istioUpstreamTLS(sni(portTCP, "b-noresume.default.svc.cluster.local"), []string{"istio"}, spiffeID("default"))
		ts["typed_config"].(obj)["max_session_keys"] = 0
		c["transport_socket"] = ts
		f := t.TempDir() + "/extra.json"
		if err := writeFile(f, bootstrapExtra(t, []obj{serviceListener(vipNoResume, portResume, clNoResume)}, []obj{c})); err != nil {
			t.Fatal(err)
		}
		return []string{"--bootstrap-extra", f, "--log-level", "warn"}
	})
	startTCPServer(t, m.podB.Pod, fmt.Sprintf("0.0.0.0:%d", portSink), sinkServer)
	clB := "cluster.outbound|9000||" + hostB + ".ssl."
	echoDst, sinkDst := ap(m.vipB, portTCP), ap(m.vipB, portSink)
	noResumeDst := ap(vipNoResume, portResume)
	waitServes(t, m.topo, echoDst)

	// inForce waits until a new flow to b is (mtls) or is not TLS, by A's
	// ssl.handshake counter of the cluster.
	inForce := func(mtls bool) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			before := statsMap(t, m.topo)[clB+"handshake"]
			_, err := tcpEcho(m.topo.Pod, echoDst, 64)
			after := statsMap(t, m.topo)[clB+"handshake"]
			if err == nil && (after > before) == mtls {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("mTLS=%v not in force 15s after the profile change (handshakes %d → %d, %v)", mtls, before, after, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	setMode := func(mtls bool) {
		t.Helper()
		mode := "DISABLE"
		if mtls {
			mode = "PERMISSIVE"
		}
		if code, out, errs := m.cp.applyProfile(t, "bench.yaml", meshProfile("bench-"+strings.ToLower(mode), mode)); code != 0 {
			t.Fatalf("profile apply %s: %d %s%s", mode, code, out, errs)
		}
		inForce(mtls)
	}

	type sample struct{ tput, p50, p99, conns, connP50 float64 }
	connFailed := map[string]int{}
	res := map[string][]sample{}
	var resumeConns, resumeP50 []float64
	var reusedOn, handshakesOn, reusedOff, handshakesOff uint64
	measure := func(mode string) {
		t.Helper()
		var s sample
		var err error
		if s.tput, err = bulk(m.topo.Pod, sinkDst, mbSeconds); err != nil {
			t.Fatalf("%s bulk: %v", mode, err)
		}
		if s.p50, s.p99, err = rrLatency(m.topo.Pod, echoDst, mbRRWarmup, mbRR); err != nil {
			t.Fatalf("%s RR: %v", mode, err)
		}
		st0 := statsMap(t, m.topo)
		var failed int
		if s.conns, s.connP50, failed, err = connectRate(m.topo.Pod, echoDst, mbConns); err != nil {
			t.Fatalf("%s connect: %v", mode, err)
		}
		connFailed[mode] += failed
		if mode == "mtls" {
			st1 := statsMap(t, m.topo)
			reusedOn += st1[clB+"session_reused"] - st0[clB+"session_reused"]
			handshakesOn += st1[clB+"handshake"] - st0[clB+"handshake"]
			pre := "cluster." + clNoResume + ".ssl."
			r, p, failed, err := connectRate(m.topo.Pod, noResumeDst, mbConns)
			if err != nil {
				t.Fatalf("mtls without resumption: %v", err)
			}
			connFailed["mtls-noresume"] += failed
			st2 := statsMap(t, m.topo)
			reusedOff += st2[pre+"session_reused"] - st1[pre+"session_reused"]
			handshakesOff += st2[pre+"handshake"] - st1[pre+"handshake"]
			resumeConns, resumeP50 = append(resumeConns, r), append(resumeP50, p)
		}
		res[mode] = append(res[mode], s)
		t.Logf("sample %s: %.2f Gbit/s, RR p50 %.1f µs p99 %.1f µs, %.0f conn/s (p50 %.0f µs)", mode, s.tput/1e9, s.p50, s.p99, s.conns, s.connP50)
	}
	for r := 0; r < mbRounds; r++ {
		order := []bool{true, false}
		if r%2 == 1 {
			order = []bool{false, true}
		}
		for _, mtls := range order {
			setMode(mtls)
			if mtls {
				measure("mtls")
			} else {
				measure("plain")
			}
		}
	}

	col := func(mode string, f func(sample) float64) float64 {
		var v []float64
		for _, s := range res[mode] {
			v = append(v, f(s))
		}
		return median(v)
	}
	tp, tm := col("plain", func(s sample) float64 { return s.tput }), col("mtls", func(s sample) float64 { return s.tput })
	p50p, p50m := col("plain", func(s sample) float64 { return s.p50 }), col("mtls", func(s sample) float64 { return s.p50 })
	p99p, p99m := col("plain", func(s sample) float64 { return s.p99 }), col("mtls", func(s sample) float64 { return s.p99 })
	cp, cm := col("plain", func(s sample) float64 { return s.conns }), col("mtls", func(s sample) float64 { return s.conns })
	cpl, cml := col("plain", func(s sample) float64 { return s.connP50 }), col("mtls", func(s sample) float64 { return s.connP50 })
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "MISSED"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "mTLS bench, two meshed pods through capture, ECDSA P-256, medians of %d rounds\n", mbRounds)
	fmt.Fprintf(&b, "mTLS %-38s | %10s | %10s | %s\n", "metric", "plaintext", "mTLS", "mTLS vs plaintext")
	fmt.Fprintf(&b, "mTLS %-38s | %10.2f | %10.2f | %.3fx (target >= 0.70x: %s)\n", "TCP 1 stream (Gbit/s)", tp/1e9, tm/1e9, tm/tp, verdict(tm >= 0.7*tp))
	fmt.Fprintf(&b, "mTLS %-38s | %10.1f | %10.1f | %+.1f us (target <= +30 us: %s)\n", "RR 64 B p50 (us), established flow", p50p, p50m, p50m-p50p, verdict(p50m-p50p <= 30))
	fmt.Fprintf(&b, "mTLS %-38s | %10.1f | %10.1f | %+.1f us\n", "RR 64 B p99 (us), established flow", p99p, p99m, p99m-p99p)
	fmt.Fprintf(&b, "mTLS %-38s | %10.0f | %10.0f | %.3fx (session_reused %d of %d handshakes)\n", "connect+RR+close /s", cp, cm, cm/cp, reusedOn, handshakesOn)
	fmt.Fprintf(&b, "mTLS %-38s | %10.0f | %10.0f | %+.0f us\n", "connect+RR+close p50 (us)", cpl, cml, cml-cpl)
	fmt.Fprintf(&b, "mTLS %-38s | %10s | %10.0f | %.3fx (session_reused %d of %d handshakes)\n", "connect+RR+close /s, resumption off", "-", median(resumeConns), median(resumeConns)/cp, reusedOff, handshakesOff)
	fmt.Fprintf(&b, "mTLS %-38s | %10s | %10.0f | %+.0f us\n", "connect+RR+close p50 (us), resump. off", "-", median(resumeP50), median(resumeP50)-cpl)
	fmt.Fprintf(&b, "mTLS failed connections (all rounds): plaintext %d, mTLS %d, mTLS without resumption %d (of %d each)\n",
		connFailed["plain"], connFailed["mtls"], connFailed["mtls-noresume"], mbConns*mbRounds)
	t.Log("\n" + b.String())
	if handshakesOn == 0 || handshakesOff == 0 {
		t.Errorf("the mTLS connection rows counted no handshakes (%d, %d): they did not measure TLS", handshakesOn, handshakesOff)
	}
	if reusedOff != 0 {
		t.Errorf("max_session_keys 0: %d sessions reused, want none", reusedOff)
	}
}
