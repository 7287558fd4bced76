package xdsclient

import (
	"context"
	"errors"
	"io"
	"maps"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// session is the client's state for one ADS stream: the server's view of each
// resource type (recv), the warming lanes, subscriptions and timers. It runs on a
// single goroutine; only the receive loop and timers run elsewhere, and they hand
// their work to it.
type session struct {
	c   *Client
	ctx context.Context // Run's context; Apply gets it
	log zerolog.Logger
	w   wire

	// recv is what the server sent, accepted or not: for delta, the base its next
	// diff applies to. It starts as the accepted state.
	recv        [numKinds]entries
	recvVersion [numKinds]string
	// ackedVersion is the version_info of the last response of each kind ACKed on
	// this stream (the accepted one at first): what a NACKed update leaves in force.
	ackedVersion [numKinds]string
	seen         [numKinds]bool            // a response of the kind arrived on this stream
	subs         [numKinds]map[string]bool // dependent kinds: names subscribed
	requested    [numKinds]bool            // a request of the kind went out on this stream
	lanes        [2]lane

	cdsResolved      bool // a CDS response was applied or rejected
	listenersStarted bool
	fetchTimers      [numKinds]map[string]*fetchBatch
	nacks            [numKinds]nackRepeat

	events  chan func() // work from timers, run on the session goroutine
	done    chan struct{}
	wg      sync.WaitGroup
	sendErr error
}

func newSession(c *Client, ctx context.Context) *session {
	s := &session{
		c:      c,
		ctx:    ctx,
		log:    c.log,
		lanes:  [2]lane{{primary: kindCluster, dep: kindEndpoint}, {primary: kindListener, dep: kindRoute}},
		events: make(chan func()),
		done:   make(chan struct{}),
	}
	acc := c.current()
	for k := range numKinds {
		s.recv[k] = maps.Clone(acc.entries[k])
		s.recvVersion[k] = acc.res.Versions[kinds[k].url]
		s.ackedVersion[k] = s.recvVersion[k]
		s.fetchTimers[k] = map[string]*fetchBatch{}
	}
	for i := range s.lanes {
		s.subs[s.lanes[i].dep] = s.wanted(&s.lanes[i])
	}
	s.subs[kindSecret] = c.wantedSecrets()
	return s
}

func (s *session) laneOf(k kind) *lane {
	if k == kindCluster || k == kindEndpoint {
		return &s.lanes[0]
	}
	return &s.lanes[1]
}

// subscription implements subscriptions.
func (s *session) subscription(k kind) (map[string]bool, bool) {
	if k == kindCluster || k == kindListener {
		return nil, true
	}
	return s.subs[k], false
}

// knownVersions implements subscriptions: the accepted per-resource versions, sent
// as initial_resource_versions when a delta stream (re)starts.
func (s *session) knownVersions(k kind) map[string]string {
	names, wildcard := s.subscription(k)
	if wildcard {
		names = nil
	}
	return s.c.current().resourceVersions(k, names)
}

type recvItem struct {
	r   *response
	err error
}

// run processes the stream until it fails or ctx is done.
func (s *session) run() error {
	inbox := make(chan recvItem)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			r, err := s.w.recv()
			select {
			case inbox <- recvItem{r, err}:
			case <-s.done:
				return
			}
			if err != nil {
				return
			}
		}
	}()

	s.start()
	for {
		if s.sendErr != nil {
			return s.sendFailure(inbox)
		}
		select {
		case <-s.ctx.Done():
			return s.ctx.Err()
		case it := <-inbox:
			if it.err != nil {
				return streamError(it.err)
			}
			if it.r != nil {
				s.w.observe(it.r)
				done := s.busy(it.r)
				if it.r.kind == kindSecret {
					s.handleSecrets(it.r)
				} else {
					s.handle(it.r)
				}
				done()
			}
		case f := <-s.events:
			f()
		case <-s.c.secretsChanged:
			s.resubscribeSecrets()
		}
	}
}

// busy tells Config.Busy that r is large; the result ends it.
func (s *session) busy(r *response) (done func()) {
	if s.c.cfg.Busy == nil || len(r.resources)+len(r.removed) < LargeResponse {
		return func() {}
	}
	return s.c.cfg.Busy()
}

// sendFailure returns why the stream failed after a Send error. io.EOF from Send
// means the server ended the stream; the status comes from Recv.
func (s *session) sendFailure(inbox <-chan recvItem) error {
	if !errors.Is(s.sendErr, io.EOF) {
		return s.sendErr
	}
	for {
		select {
		case <-s.ctx.Done():
			return s.ctx.Err()
		case it := <-inbox:
			if it.err != nil {
				return streamError(it.err)
			}
		}
	}
}

// errStreamClosed: the server ended the stream with status OK (Recv's io.EOF).
var errStreamClosed = errors.New("control plane closed the stream")

func streamError(err error) error {
	if errors.Is(err, io.EOF) {
		return errStreamClosed
	}
	return err
}

// stop ends the session's goroutines; the stream must be cancelled already or next.
func (s *session) stop() {
	close(s.done)
	for k := range numKinds {
		for _, b := range s.fetchTimers[k] {
			b.t.Stop()
		}
		if t := s.nacks[k].timer; t != nil {
			t.Stop()
		}
	}
}

// after runs f on the session goroutine after d, unless the session ended.
func (s *session) after(d time.Duration, f func()) *time.Timer {
	return time.AfterFunc(d, func() {
		select {
		case s.events <- f:
		case <-s.done:
		}
	})
}

// start sends the first requests. On the very first stream only CDS is requested;
// LDS follows once the clusters are initialized (Envoy's ordering). A stream that
// replaces a lost one requests every type at once, in ADS order.
func (s *session) start() {
	s.request(kindCluster)
	s.request(kindSecret) // none until a secret is named
	if s.c.initialized.Load() {
		s.request(kindEndpoint)
		s.startListeners()
		return
	}
	if d := s.c.cfg.InitialFetchTimeout; d > 0 {
		s.after(d, func() {
			if !s.listenersStarted {
				s.log.Warn().Dur("initial_fetch_timeout", d).Msg("xds: clusters not initialized in time, requesting listeners")
				s.startListeners()
			}
		})
	}
}

func (s *session) startListeners() {
	s.listenersStarted = true
	s.c.initialized.Store(true)
	s.request(kindListener)
	s.request(kindRoute)
}

func (s *session) maybeStartListeners() {
	if !s.listenersStarted && s.cdsResolved && !s.lanes[0].pending {
		s.startListeners()
	}
}

// request sends the current subscription of k. A dependent kind is not requested
// on a stream before it has a name to ask for (an empty first request would be a
// wildcard). A NACK being held back for k goes out with it.
func (s *session) request(k kind) {
	if _, wildcard := s.subscription(k); !wildcard && !s.requested[k] && len(s.subs[k]) == 0 {
		return
	}
	n := &s.nacks[k]
	if n.timer != nil {
		n.timer.Stop()
		acks, err := n.acks, n.err
		n.timer, n.acks, n.err = nil, nil, nil
		s.send(k, acks, err)
		return
	}
	s.send(k, nil, nil)
}

func (s *session) send(k kind, acks []held, nack error) {
	if s.sendErr != nil {
		return
	}
	s.requested[k] = true
	if err := s.w.send(k, acks, nack); err != nil {
		s.sendErr = err
	}
}
