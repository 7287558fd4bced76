package controlplane

import (
	"context"
	"crypto/sha256"
	"os"
	"time"

	"github.com/rs/zerolog"
)

// defaultPollInterval is how often a watcher looks at its file.
const defaultPollInterval = 200 * time.Millisecond

// racyWindow: a file modified this recently may change again without its
// modification time or size changing (coarse timestamps), so it is read
// and hashed on every poll until it is older (git's "racy clean").
const racyWindow = 2 * time.Second

// watcher polls a file (modification time, size, then a SHA-256 of the
// content) and hands every new content to Apply. Content Apply refuses is
// reported to Reject and logged once; the configuration in force stays.
// Editors that replace the file by a rename are seen like any write; a
// file that is missing for a while is reported once and then waited for.
type watcher struct {
	Path     string
	Interval time.Duration // defaultPollInterval when 0
	// Apply validates data and puts it in force, or returns why not.
	Apply  func(data []byte) error
	Reject func(err error) // optional
	Log    zerolog.Logger

	mod     time.Time
	size    int64
	sum     [sha256.Size]byte
	missing bool
}

// Load reads the file and applies it: the start, where an invalid file is
// an error for the caller rather than a rejection.
func (w *watcher) Load() error {
	fi, err := os.Stat(w.Path)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(w.Path)
	if err != nil {
		return err
	}
	if err := w.Apply(data); err != nil {
		return err
	}
	w.mod, w.size, w.sum = fi.ModTime(), fi.Size(), sha256.Sum256(data)
	return nil
}

// Run polls until ctx is done.
func (w *watcher) Run(ctx context.Context) {
	iv := w.Interval
	if iv <= 0 {
		iv = defaultPollInterval
	}
	t := time.NewTicker(iv)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.poll()
		}
	}
}

func (w *watcher) poll() {
	fi, err := os.Stat(w.Path)
	if err != nil {
		if !w.missing {
			w.Log.Warn().Err(err).Str("file", w.Path).Msg("cannot read the file; the configuration in force keeps serving")
			w.missing = true
		}
		return
	}
	w.missing = false
	if fi.ModTime().Equal(w.mod) && fi.Size() == w.size && time.Since(fi.ModTime()) > racyWindow {
		return
	}
	data, err := os.ReadFile(w.Path)
	if err != nil {
		w.Log.Warn().Err(err).Str("file", w.Path).Msg("cannot read the file; the configuration in force keeps serving")
		return
	}
	w.mod, w.size = fi.ModTime(), fi.Size()
	sum := sha256.Sum256(data)
	if sum == w.sum {
		return // touched, or already seen
	}
	w.sum = sum
	if err := w.Apply(data); err != nil {
		if w.Reject != nil {
			w.Reject(err)
		}
		w.Log.Error().Str("file", w.Path).Str("error", err.Error()).Msg("change rejected; the previous configuration keeps serving")
	}
}
