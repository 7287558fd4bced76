// Command rrbench measures TCP request/response latency for scripts/bench.sh.
//
//	rrbench server -listen ADDR
//	    echo server: every byte read on a connection is written back (TCP_NODELAY).
//	rrbench client -addr ADDR [-size 64] [-n 20000] [-warmup 1000] [-conns 1] [-connect]
//	    RR mode: on each of -conns connections, send -size bytes and wait for
//	    the full echo, n/conns times after -warmup untimed exchanges.
//	    -connect: each sample is a new connection: dial + one RR (+ close,
//	    untimed), so it measures connection setup latency.
//	    Prints one JSON line: {"mode","size","conns","n","p50_us","p90_us","p99_us","mean_us","max_us"}.
//	rrbench httpserver -listen ADDR
//	    HTTP/1.1 server answering every request with 64 bytes.
//	rrbench httpclient -url URL [-host H] [-conns 10] [-rate 1000] [-duration 10s]
//	    keep-alive GETs, fixed rate (open loop) or -rate 0 (as fast as
//	    possible); prints {"mode","conns","n","rps","p50_us","p90_us","p99_us","max_us","errors"}.
//	rrbench redirect [-listen 0.0.0.0:15101] [-mark 0x539]
//	    the iptables REDIRECT reference proxy (SO_ORIGINAL_DST, splice).
//	rrbench iperfsum FILE
//	    prints end.sum_received.bits_per_second of an `iperf3 -J` report.
//
// Only the standard library: this is a measuring tool, not part of meshtun.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "server":
		err = server(os.Args[2:])
	case "client":
		err = client(os.Args[2:])
	case "iperfsum":
		err = iperfSum(os.Args[2:])
	case "httpserver":
		err = httpServer(os.Args[2:])
	case "httpclient":
		err = httpClient(os.Args[2:])
	case "redirect":
		err = redirect(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "rrbench:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: rrbench server -listen ADDR | client -addr ADDR [-size 64 -n 20000 -warmup 1000 -conns 1 -connect] | redirect [-listen ADDR] | iperfsum FILE")
	os.Exit(2)
}

func server(args []string) error {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	listen := fs.String("listen", ":7777", "TCP listen addresses, comma-separated")
	_ = fs.Parse(args)
	addrs := strings.Split(*listen, ",")
	lns := make([]net.Listener, len(addrs))
	for i, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			return err
		}
		lns[i] = ln
	}
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		go func() { errc <- serveEcho(ln) }()
	}
	return <-errc
}

// serveEcho accepts on ln until it fails, echoing each connection.
func serveEcho(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		go echo(c.(*net.TCPConn))
	}
}

func echo(c *net.TCPConn) {
	defer c.Close()
	_ = c.SetNoDelay(true)
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

type result struct {
	Mode   string  `json:"mode"`
	Size   int     `json:"size"`
	Conns  int     `json:"conns"`
	N      int     `json:"n"`
	P50us  float64 `json:"p50_us"`
	P90us  float64 `json:"p90_us"`
	P99us  float64 `json:"p99_us"`
	MeanUs float64 `json:"mean_us"`
	MaxUs  float64 `json:"max_us"`
}

// progress counts completed exchanges; a watchdog ends a stalled run.
var progress atomic.Int64

func client(args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	addr := fs.String("addr", "", "server address (host:port)")
	size := fs.Int("size", 64, "message size in bytes")
	n := fs.Int("n", 20000, "timed samples in total (split across -conns)")
	warmup := fs.Int("warmup", 1000, "untimed samples per connection (per worker with -connect) before timing")
	conns := fs.Int("conns", 1, "concurrent connections (workers with -connect)")
	connect := fs.Bool("connect", false, "each sample is a new connection: dial + one RR")
	timeout := fs.Duration("timeout", 10*time.Second, "fail when no exchange completes for this long")
	_ = fs.Parse(args)
	if *addr == "" || *size < 1 || *n < 1 || *warmup < 0 || *conns < 1 {
		return errors.New("client: need -addr, and -size, -n, -conns >= 1, -warmup >= 0")
	}
	if *conns > *n {
		*conns = *n
	}
	go watchdog(*timeout)

	samples := make([][]int64, *conns)
	errs := make([]error, *conns)
	var wg sync.WaitGroup
	for w := range *conns {
		count := *n / *conns
		if w < *n%*conns {
			count++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if *connect {
				samples[w], errs[w] = connectWorker(*addr, *size, *warmup, count)
			} else {
				samples[w], errs[w] = rrWorker(*addr, *size, *warmup, count)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	all := slices.Concat(samples...)
	mode := "rr"
	if *connect {
		mode = "connect"
	}
	return json.NewEncoder(os.Stdout).Encode(summarize(mode, *size, *conns, all))
}

func watchdog(timeout time.Duration) {
	last, since := progress.Load(), time.Now()
	for range time.Tick(200 * time.Millisecond) {
		if p := progress.Load(); p != last {
			last, since = p, time.Now()
		} else if time.Since(since) > timeout {
			fmt.Fprintf(os.Stderr, "rrbench: no exchange completed for %v (after %d)\n", timeout, p)
			os.Exit(1)
		}
	}
}

func dial(addr string) (*net.TCPConn, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := c.(*net.TCPConn)
	_ = tc.SetNoDelay(true)
	return tc, nil
}

// rr sends msg and reads len(msg) bytes of echo into buf.
func rr(c *net.TCPConn, msg, buf []byte) error {
	if _, err := c.Write(msg); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("reading echo: %w", err)
	}
	progress.Add(1)
	return nil
}

func rrWorker(addr string, size, warmup, count int) ([]int64, error) {
	c, err := dial(addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	msg, buf := make([]byte, size), make([]byte, size)
	for i := range msg {
		msg[i] = byte(i)
	}
	for range warmup {
		if err := rr(c, msg, buf); err != nil {
			return nil, err
		}
	}
	out := make([]int64, count)
	for i := range out {
		t0 := time.Now()
		if err := rr(c, msg, buf); err != nil {
			return nil, err
		}
		out[i] = int64(time.Since(t0))
	}
	return out, nil
}

func connectWorker(addr string, size, warmup, count int) ([]int64, error) {
	msg, buf := make([]byte, size), make([]byte, size)
	one := func() (time.Duration, error) {
		t0 := time.Now()
		c, err := dial(addr)
		if err != nil {
			return 0, err
		}
		err = rr(c, msg, buf)
		d := time.Since(t0)
		c.Close()
		return d, err
	}
	for range warmup {
		if _, err := one(); err != nil {
			return nil, err
		}
	}
	out := make([]int64, count)
	for i := range out {
		d, err := one()
		if err != nil {
			return nil, err
		}
		out[i] = int64(d)
	}
	return out, nil
}

func summarize(mode string, size, conns int, ns []int64) result {
	slices.Sort(ns)
	var sum float64
	for _, v := range ns {
		sum += float64(v)
	}
	us := func(v float64) float64 { return math.Round(v/10) / 100 } // ns → µs, 2 decimals
	// nearest-rank percentile
	pct := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(ns)))) - 1
		return us(float64(ns[max(i, 0)]))
	}
	return result{
		Mode: mode, Size: size, Conns: conns, N: len(ns),
		P50us: pct(0.50), P90us: pct(0.90), P99us: pct(0.99),
		MeanUs: us(sum / float64(len(ns))), MaxUs: us(float64(ns[len(ns)-1])),
	}
}

// iperfSum prints end.sum_received.bits_per_second of an iperf3 -J report.
func iperfSum(args []string) error {
	if len(args) != 1 {
		return errors.New("iperfsum: want one iperf3 -J output file")
	}
	b, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	var rep struct {
		Error string `json:"error"`
		End   struct {
			SumReceived *struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		return fmt.Errorf("iperfsum %s: %w", args[0], err)
	}
	if rep.Error != "" {
		return fmt.Errorf("iperfsum %s: iperf3 error: %s", args[0], rep.Error)
	}
	if rep.End.SumReceived == nil {
		return fmt.Errorf("iperfsum %s: no end.sum_received", args[0])
	}
	fmt.Printf("%.0f\n", rep.End.SumReceived.BitsPerSecond)
	return nil
}
