// Package rawsock reads and writes a non-blocking kernel TCP socket with
// raw system calls, behind net.TCPConn's own results.
//
// Why: net.TCPConn enters each system call through the Go runtime's
// bookkeeping, which wakes the runtime's monitor thread (sysmon) from its
// idle sleep on the first call after every idle spell; a woken sysmon
// then polls every 20 µs for as long as a timer is overdue, which one
// always is for up to a millisecond while the poller sleeps (it sleeps in
// whole milliseconds). A proxy that idles between requests, as every
// sidecar at a moderate load does, paid that on each request: at a fixed
// 1,000 req/s it was 30% of meshtun's CPU (2.8 sysmon sleeps and 1.3
// futex calls per request). The socket is non-blocking, so a raw call
// never waits: EAGAIN hands the wait to the runtime's poller through the
// socket's RawConn, and deadlines and Close still end a waiting call.
package rawsock

// WriteChunk bounds the bytes of one write system call: a raw call does
// not release its processor, so a large write is cut into pieces that the
// scheduler can run other goroutines between.
const WriteChunk = 64 << 10
