//go:build race

package rbac

// raceEnabled: the race detector makes sync.Pool drop a quarter of what is
// put back (to expose reuse bugs), and regexp keeps its matching machines
// in one, so a regex match then allocates now and again: allocation counts
// are only meaningful without -race.
const raceEnabled = true
