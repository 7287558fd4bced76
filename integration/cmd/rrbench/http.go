package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

// httpServer answers every request with a 64-byte body (keep-alive).
func httpServer(args []string) error {
	fs := flag.NewFlagSet("httpserver", flag.ExitOnError)
	listen := fs.String("listen", ":8080", "TCP listen address")
	fs.Parse(args)
	body := make([]byte, 64)
	for i := range body {
		body[i] = 'x'
	}
	srv := &http.Server{Addr: *listen, ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			w.Header().Set("Content-Length", "64")
			w.Write(body)
		})}
	return srv.ListenAndServe()
}

// httpResult is one httpclient run.
type httpResult struct {
	Mode  string  `json:"mode"`
	Conns int     `json:"conns"`
	N     int     `json:"n"`
	Rate  float64 `json:"rps"` // achieved requests/s
	P50us float64 `json:"p50_us"`
	P90us float64 `json:"p90_us"`
	P99us float64 `json:"p99_us"`
	MaxUs float64 `json:"max_us"`
	Errs  int     `json:"errors"`
}

// httpClient sends GETs over -conns keep-alive connections: paced at a
// fixed -rate (requests/s over all connections) for -duration, or, with
// -rate 0, as fast as each connection can (closed loop). A request's
// latency runs from its send to the end of its response body.
func httpClient(args []string) error {
	fs := flag.NewFlagSet("httpclient", flag.ExitOnError)
	url := fs.String("url", "", "URL to GET")
	host := fs.String("host", "", "Host header (default: from the URL)")
	conns := fs.Int("conns", 10, "keep-alive connections")
	rate := fs.Float64("rate", 1000, "requests/s over all connections; 0: as fast as possible")
	dur := fs.Duration("duration", 10*time.Second, "measured time")
	warm := fs.Duration("warmup", time.Second, "untimed warm-up")
	fs.Parse(args)
	if *url == "" {
		return fmt.Errorf("httpclient: -url required")
	}
	go watchdog(10 * time.Second)
	tr := &http.Transport{MaxIdleConnsPerHost: *conns, MaxConnsPerHost: *conns, DisableCompression: true,
		DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext}
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	do := func() error {
		req, _ := http.NewRequest("GET", *url, nil)
		if *host != "" {
			req.Host = *host
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		progress.Add(1)
		return nil
	}
	var mu sync.Mutex
	var lat []int64
	errs := 0
	run := func(d time.Duration, record bool) time.Duration {
		start := time.Now()
		end := start.Add(d)
		var wg sync.WaitGroup
		for w := 0; w < *conns; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				var local []int64
				lerr := 0
				interval := time.Duration(0)
				next := start
				if *rate > 0 {
					interval = time.Duration(float64(time.Second) * float64(*conns) / *rate)
					next = start.Add(interval * time.Duration(w) / time.Duration(*conns))
				}
				for {
					if interval > 0 {
						if next.After(end) {
							break
						}
						if wait := time.Until(next); wait > 0 {
							time.Sleep(wait)
						}
					} else if time.Now().After(end) {
						break
					}
					// Latency counts from the send: the pacing sets the
					// offered load; timer wake-up jitter (hundreds of µs on a
					// busy 2-core machine) is not the proxy's.
					t0 := time.Now()
					if interval > 0 {
						next = next.Add(interval)
					}
					if err := do(); err != nil {
						lerr++
						continue
					}
					local = append(local, int64(time.Since(t0)))
				}
				if record {
					mu.Lock()
					lat = append(lat, local...)
					errs += lerr
					mu.Unlock()
				}
			}(w)
		}
		wg.Wait()
		return time.Since(start)
	}
	run(*warm, false)
	took := run(*dur, true)
	if len(lat) == 0 {
		return fmt.Errorf("httpclient: no successful request (%d errors)", errs)
	}
	r := summarize("http", 0, *conns, lat)
	mode := "fixed-rate"
	if *rate == 0 {
		mode = "max"
	}
	out := httpResult{Mode: mode, Conns: *conns, N: r.N, Rate: float64(r.N) / took.Seconds(),
		P50us: r.P50us, P90us: r.P90us, P99us: r.P99us, MaxUs: r.MaxUs, Errs: errs}
	return json.NewEncoder(os.Stdout).Encode(out)
}
