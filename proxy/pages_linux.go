package proxy

import (
	"bytes"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// releaseStartupPages gives back the pages of the process's own
// executable (its read-only mappings: code and constant data) once the
// proxy is ready, and makes what the proxy touches of them afterwards
// come back one page at a time. Returns the bytes of mappings released.
//
// The binary holds the agent, the control plane and every Envoy and Istio
// API it decodes, and the Go runtime runs the package initializers of all
// of them at start: registering ~300 protobuf file descriptors touches
// most of the code and read-only data. That left ~24 MB of the binary
// resident in an idle proxy, two thirds of its RSS, for code that never
// runs again.
//
// Unmapping alone is not enough: the kernel maps file pages 64 KiB at a
// time around each fault (fault-around, or a whole large folio of the page
// cache), so the few hundred scattered pages one flow and one collection
// touch afterwards (code, type data, the function table) brought back
// ~9 MB. And MADV_PAGEOUT, which this used, does nothing to the pages of
// a file the process may not write: the proxy of the image (uid 1337, a
// root-owned binary) kept them all. Hence, for each mapping
// (releaseFileMapping): its pages are unmapped, later faults are advised
// random (MADV_RANDOM: no fault-around, no read-around), and the file's
// cached pages of the range that no process maps are dropped, so that a
// fault reads the 4 KiB page it needs instead of mapping the large folio
// cached around it. The pages are clean (written back first if the binary
// was just built): dropping them costs no write, pages another process
// maps (the agent runs the same binary) stay, and a page the proxy needs
// again is read back once, on its first use (~350 reads of 4 KiB for the
// first flow).
func releaseStartupPages() (int64, error) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, err
	}
	// smaps, not maps: a read-only mapping may still hold pages the
	// process wrote before making it read-only (the RELRO data of a PIE
	// or cgo build, relocated by the dynamic linker, then mprotected).
	// Those are private copies ("Anonymous" in smaps) that MADV_DONTNEED
	// would throw away, reverting the data to the file's: such a mapping
	// is left alone.
	maps, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		return 0, err
	}
	// The file, to drop its cached pages; an execute-only binary cannot be
	// read, and its mappings are then only unmapped and advised.
	fd, openErr := unix.Open("/proc/self/exe", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if openErr != nil {
		fd = -1
	} else {
		defer unix.Close(fd)
	}
	var total int64
	for _, m := range cleanMappings(maps, exe) {
		if err := releaseFileMapping(m.start, m.end-m.start, fd, m.offset); err != nil {
			return total, fmt.Errorf("executable mapping %x-%x: %w", m.start, m.end, err)
		}
		total += int64(m.end - m.start)
	}
	if openErr != nil {
		return total, fmt.Errorf("executable mappings unmapped, its cached pages kept: open /proc/self/exe: %w", openErr)
	}
	return total, nil
}

// releaseFileMapping releases n bytes at addr of a private read-only
// mapping of a file: the pages are unmapped (MADV_DONTNEED, which any user
// may do, unlike MADV_PAGEOUT of a file it cannot write), later faults map
// only the page touched (MADV_RANDOM), and, when fd is the file (else -1),
// its cached pages of the range [off, off+n) are written back if dirty and
// dropped unless some process maps them (POSIX_FADV_DONTNEED).
//
// The mapping must never have been written: MADV_DONTNEED discards a
// private mapping's modified pages.
func releaseFileMapping(addr, n uintptr, fd int, off int64) error {
	if _, _, e := unix.Syscall(unix.SYS_MADVISE, addr, n, unix.MADV_DONTNEED); e != 0 {
		return fmt.Errorf("madvise(MADV_DONTNEED): %w", e)
	}
	if _, _, e := unix.Syscall(unix.SYS_MADVISE, addr, n, unix.MADV_RANDOM); e != 0 {
		return fmt.Errorf("madvise(MADV_RANDOM): %w", e)
	}
	if fd < 0 {
		return nil
	}
	// Dirty or under writeback, a cached page is not dropped: a binary
	// built a moment ago (make bench) is written back first. A no-op for
	// an installed binary.
	if err := unix.SyncFileRange(fd, off, int64(n), unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER); err != nil {
		return fmt.Errorf("sync_file_range: %w", err)
	}
	if err := unix.Fadvise(fd, off, int64(n), unix.FADV_DONTNEED); err != nil {
		return fmt.Errorf("posix_fadvise(POSIX_FADV_DONTNEED): %w", err)
	}
	return nil
}

// cleanMappings returns the mappings of the file path in smaps (the text
// of /proc/self/smaps) that were never written: not writable, and holding
// no private (anonymous) copy of a page.
func cleanMappings(smaps []byte, path string) []mapping {
	var out []mapping
	var cur mapping
	var curOK, dirty bool
	flush := func() {
		if curOK && !dirty && !cur.writable && cur.path == path {
			out = append(out, cur)
		}
	}
	for _, line := range bytes.Split(smaps, []byte("\n")) {
		if isMapsHead(line) {
			flush()
			cur, curOK = parseMapsLine(line) // false for an anonymous mapping
			dirty = false
			continue
		}
		// "Anonymous:   12 kB": pages of the mapping the process copied.
		if v, ok := bytes.CutPrefix(line, []byte("Anonymous:")); ok {
			f := bytes.Fields(v)
			if len(f) == 0 || string(f[0]) != "0" {
				dirty = true
			}
		}
	}
	flush()
	return out
}

// isMapsHead reports whether line starts a mapping in smaps
// ("start-end perms offset dev inode [path]") rather than being one of
// its "Field: value" lines.
func isMapsHead(line []byte) bool {
	f := bytes.Fields(line)
	if len(f) < 5 {
		return false
	}
	a, b, ok := bytes.Cut(f[0], []byte("-"))
	if !ok {
		return false
	}
	_, err1 := strconv.ParseUint(string(a), 16, 64)
	_, err2 := strconv.ParseUint(string(b), 16, 64)
	return err1 == nil && err2 == nil
}

// mapping is one line of /proc/self/maps.
type mapping struct {
	start, end uintptr
	writable   bool
	offset     int64  // in the file
	path       string // as readlink shows it, " (deleted)" included
}

// parseMapsLine reads "start-end perms offset dev inode [path]".
func parseMapsLine(line []byte) (mapping, bool) {
	f := bytes.Fields(line)
	if len(f) < 6 || len(f[1]) < 2 {
		return mapping{}, false
	}
	start, end, ok := bytes.Cut(f[0], []byte("-"))
	if !ok {
		return mapping{}, false
	}
	a, err1 := strconv.ParseUint(string(start), 16, 64)
	b, err2 := strconv.ParseUint(string(end), 16, 64)
	off, err3 := strconv.ParseInt(string(f[2]), 16, 64)
	if err1 != nil || err2 != nil || err3 != nil || b <= a {
		return mapping{}, false
	}
	// The path is the rest of the line: it may hold spaces.
	path := line[bytes.Index(line, f[5]):]
	return mapping{start: uintptr(a), end: uintptr(b), writable: f[1][1] == 'w', offset: off, path: string(path)}, true
}
