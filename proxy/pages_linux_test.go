package proxy

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

// rssFileKB is RssFile of /proc/self/status: the resident pages mapped
// from files, mostly the executable's.
func rssFileKB(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "RssFile:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}

// TestReleaseStartupPages: the executable's read-only mappings are
// advised out and most of what start-up made resident of them goes
// (the test binary, like meshtun, initializes the Envoy APIs).
func TestReleaseStartupPages(t *testing.T) {
	before := rssFileKB(t)
	n, err := releaseStartupPages()
	if err != nil {
		t.Fatal(err)
	}
	after := rssFileKB(t)
	t.Logf("advised %d kB; RssFile %d kB before, %d kB after", n>>10, before, after)
	if n == 0 {
		t.Fatal("no mapping of the executable advised")
	}
	if after > before/2 {
		t.Fatalf("RssFile %d kB after the release, %d kB before: want at most half", after, before)
	}
}
