package proxy

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
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

// smapsField is a field of the /proc/self/smaps block of the mapping that
// starts at addr (Rss, VmFlags, …), without its name.
func smapsField(t *testing.T, addr uintptr, field string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	in := false
	for _, l := range strings.Split(string(b), "\n") {
		if m, ok := parseMapsLine([]byte(l + " x")); ok { // a mapping's head line ("x": a path for the anonymous)
			in = m.start == addr
			continue
		}
		if v, ok := strings.CutPrefix(l, field+":"); ok && in {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no %s for the mapping at %#x in /proc/self/smaps", field, addr)
	return ""
}

// rssKB is the Rss of the mapping that starts at addr.
func rssKB(t *testing.T, addr uintptr) int {
	t.Helper()
	v := smapsField(t, addr, "Rss")
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(v, "kB")))
	if err != nil {
		t.Fatalf("Rss %q: %v", v, err)
	}
	return n
}

// TestReleasedMappingFaultsSingly: a released file mapping is unmapped,
// and a page touched afterwards comes back alone, not with the 64 KiB the
// kernel maps around a fault (or the large folio the page cache holds it
// in): 32 scattered touches make at most 2×32 pages resident, where
// fault-around made 16×32. The file is freshly written (dirty, as a
// binary make bench just built), which is what the write-back is for.
func TestReleasedMappingFaultsSingly(t *testing.T) {
	const size, touches, stride = 16 << 20, 32, 512 << 10
	f, err := os.Create(filepath.Join(t.TempDir(), "mapped"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(bytes.Repeat([]byte{1}, size)); err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	addr := uintptr(unsafe.Pointer(&m[0]))
	sum := 0
	for i := 0; i < size; i += 4096 {
		sum += int(m[i])
	}
	if got := rssKB(t, addr); got < size>>10/2 {
		t.Fatalf("Rss %d kB after touching all %d kB: the mapping is not resident to begin with", got, size>>10)
	}

	if err := releaseFileMapping(addr, size, int(f.Fd()), 0); err != nil {
		t.Fatal(err)
	}
	if got := rssKB(t, addr); got != 0 {
		t.Fatalf("Rss %d kB right after the release, want 0", got)
	}
	if flags := smapsField(t, addr, "VmFlags"); !slices.Contains(strings.Fields(flags), "rr") {
		t.Fatalf("VmFlags %q: no random-access advice (rr)", flags)
	}
	for i := range touches {
		sum += int(m[i*stride+100])
	}
	if sum != size/4096+touches {
		t.Fatalf("read back %d, want %d: the mapping's bytes changed", sum, size/4096+touches)
	}
	got := rssKB(t, addr)
	t.Logf("Rss after %d scattered touches: %d kB", touches, got)
	if got > 2*touches*4 {
		t.Fatalf("Rss %d kB after %d one-page touches: want at most %d kB (pages mapped around each fault)", got, touches, 2*touches*4)
	}
}

// TestReleasedExecutableAdvisedRandom: after the release, every read-only
// mapping of the executable is advised random (VmFlags rr), so what the
// proxy touches of it later comes back a page at a time.
func TestReleasedExecutableAdvisedRandom(t *testing.T) {
	if _, err := releaseStartupPages(); err != nil {
		t.Fatal(err)
	}
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range bytes.Split(maps, []byte("\n")) {
		m, ok := parseMapsLine(l)
		if !ok || m.path != exe || m.writable {
			continue
		}
		n++
		if flags := smapsField(t, m.start, "VmFlags"); !slices.Contains(strings.Fields(flags), "rr") {
			t.Errorf("mapping %x-%x of %s: VmFlags %q, no rr", m.start, m.end, exe, flags)
		}
	}
	if n < 2 {
		t.Fatalf("%d read-only mappings of %s found, want code and read-only data at least", n, exe)
	}
}

func TestParseMapsLine(t *testing.T) {
	for _, c := range []struct {
		line string
		want mapping
		ok   bool
	}{
		{"00400000-01266000 r-xp 00000000 fe:00 10027811                           /usr/local/bin/meshtun",
			mapping{start: 0x400000, end: 0x1266000, path: "/usr/local/bin/meshtun"}, true},
		{"025f8000-026a0000 rw-p 021f8000 fe:00 10027811   /opt/my dir/meshtun (deleted)",
			mapping{start: 0x25f8000, end: 0x26a0000, writable: true, offset: 0x21f8000, path: "/opt/my dir/meshtun (deleted)"}, true},
		{"7f8796adc000-7f8796b9c000 rw-p 00000000 00:00 0 ", mapping{}, false}, // anonymous
		{"zz-01 r--p 0 fe:00 1 /x", mapping{}, false},
		{"", mapping{}, false},
	} {
		got, ok := parseMapsLine([]byte(c.line))
		if ok != c.ok || got != c.want {
			t.Errorf("parseMapsLine(%q) = %+v, %v; want %+v, %v", c.line, got, ok, c.want, c.ok)
		}
	}
}

// TestReleaseWithoutWritePermission: the release works for a process that
// may not write its executable, as the proxy in the image (uid 1337, a
// root-owned binary): MADV_PAGEOUT of such a file's pages does nothing
// there, and it was what the release used. The file is root's, mode 0644;
// the release runs on a thread whose effective uid is nobody's (the
// kernel checks a thread's own credentials), restored afterwards.
func TestReleaseWithoutWritePermission(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs root (a file the releasing thread may not write)")
		}
		t.Skip("needs root (a file the releasing thread may not write)")
	}
	const size = 4 << 20
	name := filepath.Join(t.TempDir(), "mapped")
	if err := os.WriteFile(name, bytes.Repeat([]byte{1}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	addr := uintptr(unsafe.Pointer(&m[0]))
	sum := 0
	for i := 0; i < size; i += 4096 {
		sum += int(m[i])
	}
	if got := rssKB(t, addr); got < size>>10/2 || sum != size/4096 {
		t.Fatalf("Rss %d kB after touching all %d kB (read %d): not resident to begin with", got, size>>10, sum)
	}

	errc := make(chan error, 1)
	go func() {
		// Locked, and left locked (the thread then exits with the
		// goroutine) unless its credentials are back to root's.
		runtime.LockOSThread()
		const nobody, keep = 65534, ^uintptr(0)
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, keep, nobody, keep); e != 0 {
			errc <- fmt.Errorf("setresuid: %w", e)
			return
		}
		err := releaseFileMapping(addr, size, int(f.Fd()), 0)
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, keep, 0, keep); e != 0 {
			errc <- errors.Join(err, fmt.Errorf("setresuid back to root: %w", e))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if got := rssKB(t, addr); got != 0 {
		t.Fatalf("Rss %d kB after a release by a thread that may not write the file: want 0", got)
	}
}

// TestCleanMappingsSkipsWritten: a read-only mapping of the executable
// holding private copies of pages (RELRO data the dynamic linker relocated)
// is not released, nor a writable one; an anonymous mapping's pages are
// not counted against the file mapping before it.
func TestCleanMappingsSkipsWritten(t *testing.T) {
	const smaps = `00400000-00800000 r-xp 00000000 08:01 42 /bin/meshtun
Size:               4096 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
00800000-00900000 r--p 00400000 08:01 42 /bin/meshtun
Size:               1024 kB
Anonymous:             8 kB
VmFlags: rd mr mw me
00900000-00a00000 r--p 00500000 08:01 42 /bin/meshtun
Anonymous:             0 kB
00a00000-00b00000 rw-p 00000000 00:00 0
Anonymous:           512 kB
00b00000-00c00000 rw-p 00600000 08:01 42 /bin/meshtun
Anonymous:             0 kB
00c00000-00d00000 r--p 00000000 08:01 43 /lib/other.so
Anonymous:             0 kB
`
	got := cleanMappings([]byte(smaps), "/bin/meshtun")
	var starts []uintptr
	for _, m := range got {
		starts = append(starts, m.start)
	}
	want := []uintptr{0x400000, 0x900000}
	if fmt.Sprint(starts) != fmt.Sprint(want) {
		t.Fatalf("clean mappings start at %x, want %x", starts, want)
	}
	if got[1].offset != 0x500000 {
		t.Errorf("offset %x, want 500000", got[1].offset)
	}
}
