package httpconn

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// sseUpstream is an upstream of server-sent events that moves one step
// at a time, when the test says: the response head first, then each
// event, so a test can see that each reached the client before the next
// was sent.
type sseUpstream struct {
	step chan struct{} // one receive per step after the head
	done chan struct{}
}

func (u *sseUpstream) handler(events ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		defer close(u.done)
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		for _, ev := range events {
			select {
			case <-u.step:
			case <-r.Context().Done():
				return
			}
			w.Write([]byte("data: " + ev + "\n\n"))
			http.NewResponseController(w).Flush()
		}
	}
}

// within runs f and fails the test with f's error, or when f has not
// returned after d: the step it waits for never came (a stall, not
// slowness: d is generous).
func within(t *testing.T, d time.Duration, what string, f func() error) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(d):
		t.Fatalf("%s: nothing after %v", what, d)
	}
}

// TestStreamingResponseFlushed (issue #15 defect 9): an upstream that
// sends its response head and then waits gives the client the head at
// once, and each event of a server-sent-events stream reaches the client
// before the upstream sends the next, over HTTP/1.1 and h2c, to an
// HTTP/1.1 and an h2c upstream. Before the fix the head waited for the
// first body byte: the client's Do never returned while the upstream
// waited for it.
func TestStreamingResponseFlushed(t *testing.T) {
	for _, tc := range []struct {
		name     string
		down, up bool
	}{{"h1-h1", false, false}, {"h2-h1", true, false}, {"h1-h2", false, true}, {"h2-h2", true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			u := &sseUpstream{step: make(chan struct{}), done: make(chan struct{})}
			up := startUpstream(t, u.handler("one", "two"))
			pb := xdstest.StaticCluster("c", up.addr)
			if tc.up {
				pb = withH2(pb)
			}
			p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), newEnv(t, pb))
			c := client(tc.down)
			defer c.CloseIdleConnections()
			var resp *http.Response
			within(t, 5*time.Second, "response head while the upstream waits", func() (err error) {
				resp, err = c.Get("http://" + p.addr + "/events")
				return err
			})
			defer resp.Body.Close()
			if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
				t.Fatalf("head: %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
			}
			br := bufio.NewReader(resp.Body)
			for _, want := range []string{"data: one\n", "data: two\n"} {
				u.step <- struct{}{}
				within(t, 5*time.Second, "event "+want, func() error {
					line, err := br.ReadString('\n')
					if line != want {
						return fmt.Errorf("read %q (%v), want %q", line, err, want)
					}
					_, err = br.ReadString('\n') // the blank line ending the event
					return err
				})
			}
			<-u.done
		})
	}
}

// TestBidiStreamingH1Upstream (issue #15 item 12, "bidirectional
// streaming to an HTTP/1.1 upstream where the protocol allows"): a
// request body of unknown length streams to an HTTP/1.1 upstream while
// its response streams back, in lock step (each line echoed before the
// next is sent), from HTTP/1.1 and h2c clients. Before, the h1 transport
// wrote the whole request before reading the response: the first echo
// never came.
func TestBidiStreamingH1Upstream(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		rc.EnableFullDuplex()
		w.WriteHeader(http.StatusOK)
		rc.Flush()
		br := bufio.NewReader(r.Body)
		for {
			line, err := br.ReadString('\n')
			if line != "" {
				w.Write([]byte("echo " + line))
				rc.Flush()
			}
			if err != nil {
				return
			}
		}
	})
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), newEnv(t, xdstest.StaticCluster("c", u.addr)))
	for _, h2 := range []bool{false, true} {
		t.Run(map[bool]string{false: "h1", true: "h2c"}[h2], func(t *testing.T) {
			pr, pw := io.Pipe()
			defer pw.Close()
			req, _ := http.NewRequest("POST", "http://"+p.addr+"/bidi", pr)
			c := client(h2)
			defer c.CloseIdleConnections()
			var resp *http.Response
			within(t, 5*time.Second, "response head while the request streams", func() (err error) {
				resp, err = c.Do(req)
				return err
			})
			defer resp.Body.Close()
			br := bufio.NewReader(resp.Body)
			for i := 0; i < 5; i++ {
				msg := fmt.Sprintf("line %d\n", i)
				within(t, 5*time.Second, "echo of "+msg, func() error {
					if _, err := io.WriteString(pw, msg); err != nil {
						return err
					}
					got, err := br.ReadString('\n')
					if got != "echo "+msg {
						return fmt.Errorf("read %q (%v)", got, err)
					}
					return nil
				})
			}
			pw.Close()
			within(t, 5*time.Second, "the end", func() error {
				rest, err := io.ReadAll(br)
				if err != nil || len(rest) != 0 {
					return fmt.Errorf("after the request's end: %q %v", rest, err)
				}
				return nil
			})
		})
	}
}
