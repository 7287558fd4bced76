package mesh

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/netstack"
	"github.com/meshtun/meshtun/xdsclient"
)

// Server owns the configuration in force: it swaps snapshots into the
// Dispatcher and keeps one kernel socket per listener that binds (an IP
// address or a Unix domain socket). Listeners that do not bind, and the
// virtual listeners capture feeds, get no socket.
type Server struct {
	D   *Dispatcher
	Log zerolog.Logger
	// Gate, when set, counts connections accepted on bound sockets and
	// resets them once all listeners are drained.
	Gate *Gate

	mu     sync.Mutex
	bound  map[string]*boundListener // by bind key
	closed bool
	drain  proxyDrain // StartDrain, EndDrain; applied to each snapshot swapped in
}

type boundListener struct {
	key string
	ln  net.Listener
	wg  sync.WaitGroup
}

func bindKey(l *Listener) string {
	if l.Pipe != "" {
		return "unix:" + l.Pipe
	}
	return "tcp:" + l.Addr.String()
}

// Apply makes snap the configuration for new flows: sockets for new
// binding listeners are opened first, then the EDS host sets snap's build
// staged are committed, then the snapshot is swapped in, then sockets of
// listeners that are gone are closed. A bind failure changes nothing (the
// sockets opened for snap are closed again) and is returned as an
// xdsclient.ResourceError naming the listener when it came over LDS, so
// the xDS client rejects that listener alone; every failing listener is
// named. Connections already accepted keep running on the snapshot they
// started with.
func (s *Server) Apply(snap *Snapshot) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("server closed")
	}
	if s.bound == nil {
		s.bound = make(map[string]*boundListener)
	}
	want := snap.bound
	var opened []*boundListener
	var rejected xdsclient.ResourceErrors
	var static error
	for _, key := range sortedKeys(want) {
		if s.bound[key] != nil {
			continue
		}
		l := want[key]
		b, err := s.listen(key, l)
		switch {
		case err == nil:
			opened = append(opened, b)
		case l.dynamic:
			rejected = append(rejected, xdsclient.ResourceError{TypeURL: xdsclient.ListenerType, Name: l.Name, Err: err})
		case static == nil:
			static = fmt.Errorf("listener %q: %w", l.Name, err)
		}
	}
	if static != nil || len(rejected) > 0 {
		for _, o := range opened {
			o.ln.Close()
		}
		if static != nil {
			return static
		}
		return rejected
	}
	snap.commit()
	s.D.Swap(snap)
	s.drain.applyTo(snap)
	for _, b := range opened {
		s.bound[b.key] = b
		b.wg.Add(1)
		go s.acceptLoop(b)
	}
	for key, b := range s.bound {
		if want[key] == nil {
			b.ln.Close()
			delete(s.bound, key)
		}
	}
	return nil
}

func (s *Server) listen(key string, l *Listener) (*boundListener, error) {
	var ln net.Listener
	var err error
	if l.Pipe != "" {
		// A socket file left by a previous run would make bind fail.
		if fi, statErr := os.Lstat(l.Pipe); statErr == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(l.Pipe)
		}
		ln, err = net.Listen("unix", l.Pipe)
		if err == nil && l.Proto.GetAddress().GetPipe().GetMode() != 0 {
			err = os.Chmod(l.Pipe, os.FileMode(l.Proto.GetAddress().GetPipe().GetMode()))
		}
	} else {
		ln, err = net.Listen("tcp", l.Addr.String())
	}
	if err != nil {
		return nil, err
	}
	return &boundListener{key: key, ln: ln}, nil
}

// acceptLoop serves one bound socket. The listener configuration is looked
// up per connection in the snapshot in force, so an update that keeps the
// address changes chains without touching the socket.
func (s *Server) acceptLoop(b *boundListener) {
	defer b.wg.Done()
	var backoff time.Duration
	for {
		c, err := b.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and friends: back off instead of spinning.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.Log.Warn().Err(err).Str("listener", b.key).Msg("accept")
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		go s.serveConn(b.key, c)
	}
}

func (s *Server) serveConn(key string, c net.Conn) {
	if g := s.Gate; g != nil {
		if g.closedOut.Load() {
			resetConn(c)
			return
		}
		g.active.Add(1)
		defer g.active.Add(-1)
	}
	snap := s.D.Snapshot()
	l := snap.bound[key] // precomputed: no per-connection scan
	if l == nil {
		c.Close()
		return
	}
	fid := netstack.FlowID{Src: addrPortOf(c.RemoteAddr()), Dst: addrPortOf(c.LocalAddr())}
	if l.Pipe != "" {
		fid.Dst = netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	}
	e := accesslog.Entry{Transport: "tcp", Direction: "listener", Start: time.Now(), DownstreamLocal: fid.Dst, DownstreamPeer: fid.Src}
	l.Stats.DownstreamCxTotal.Add(1)
	l.Stats.DownstreamCxActive.Add(1)
	serveFlow(snap, l, &accepted{conn: c, fid: fid}, &e, s.D)
	l.Stats.DownstreamCxActive.Add(-1)
	l.Stats.DownstreamCxDestroy.Add(1)
	s.D.o.Access.Log(&e)
}

func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// Close closes every bound socket and waits for the accept loops.
func (s *Server) Close() {
	s.mu.Lock()
	s.closed = true
	bound := s.bound
	s.bound = nil
	s.mu.Unlock()
	for _, b := range bound {
		b.ln.Close()
		b.wg.Wait()
	}
}
