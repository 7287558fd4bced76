package agent

import (
	"context"
	"crypto/sha256"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// watcher notices changes to files and directories (the bootstrap's
// inputs, mounted certificates and config) by comparing their contents
// every Interval; a change is reported once the new contents held still
// for an Interval. Polling is deliberate: Kubernetes updates ConfigMap and
// Secret volumes by swapping a symlink (..data), which inotify on the
// visible names does not report, and the files are small.
type watcher struct {
	Paths    []string
	Interval time.Duration
	// OnChange is called with the paths whose contents changed.
	OnChange func(changed []string)
}

// Start runs the watcher in a goroutine of its own; stop ends it and
// returns once it has, so no OnChange is in progress or to come.
func (w *watcher) Start() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	prev := w.fingerprints() // a change from now on is seen
	go func() {
		defer close(done)
		w.poll(ctx, prev)
	}()
	return func() {
		cancel()
		<-done
	}
}

// Run polls until ctx ends; an OnChange in progress finishes first.
func (w *watcher) Run(ctx context.Context) {
	w.poll(ctx, w.fingerprints())
}

func (w *watcher) fingerprints() map[string][32]byte {
	prev := make(map[string][32]byte, len(w.Paths))
	for _, p := range w.Paths {
		prev[p] = fingerprint(p)
	}
	return prev
}

func (w *watcher) poll(ctx context.Context, prev map[string][32]byte) {
	if len(w.Paths) == 0 {
		return
	}
	interval := w.Interval
	if interval <= 0 {
		interval = time.Second
	}
	// A change is reported once the contents held still for one interval:
	// a file written in place is seen empty or half written first.
	pending := make(map[string][32]byte)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var changed []string
		for _, p := range w.Paths {
			fp := fingerprint(p)
			if fp == prev[p] {
				delete(pending, p)
				continue
			}
			if pf, ok := pending[p]; ok && pf == fp {
				delete(pending, p)
				prev[p] = fp
				changed = append(changed, p)
				continue
			}
			pending[p] = fp
		}
		if len(changed) > 0 && ctx.Err() == nil {
			w.OnChange(changed)
		}
	}
}

// fingerprint hashes what path holds: a file's contents, or a directory's
// files (names and contents, recursively, following symlinks, without
// Kubernetes' ..data bookkeeping entries). A missing path has a
// fingerprint of its own, so appearing and disappearing are changes.
func fingerprint(path string) [32]byte {
	h := sha256.New()
	var walk func(p string, depth int)
	walk = func(p string, depth int) {
		fi, err := os.Stat(p) // follows symlinks
		switch {
		case errors.Is(err, fs.ErrNotExist):
			h.Write([]byte("\x00missing\x00"))
			return
		case err != nil:
			h.Write([]byte("\x00error\x00" + err.Error()))
			return
		}
		if !fi.IsDir() {
			b, err := os.ReadFile(p)
			if err != nil {
				h.Write([]byte("\x00error\x00" + err.Error()))
				return
			}
			sum := sha256.Sum256(b)
			h.Write(sum[:])
			return
		}
		if depth > 8 {
			return
		}
		ents, err := os.ReadDir(p)
		if err != nil {
			h.Write([]byte("\x00error\x00" + err.Error()))
			return
		}
		names := make([]string, 0, len(ents))
		for _, e := range ents {
			if !strings.HasPrefix(e.Name(), "..") {
				names = append(names, e.Name())
			}
		}
		slices.Sort(names)
		for _, n := range names {
			h.Write([]byte("\x00" + n + "\x00"))
			walk(filepath.Join(p, n), depth+1)
		}
	}
	walk(path, 0)
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}
