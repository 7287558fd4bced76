package upstream

import "golang.org/x/sys/unix"

// The source port of an upstream connection.
//
// connect() picks an ephemeral port by walking the range from a point
// derived from the destination, even ports first (odd ones are left to
// bind(0)), and each port it meets whose 4-tuple is held, by a connection
// or a TIME_WAIT socket, costs a probe. The proxy's upstream connections
// share that walk with the application's own: a captured flow to dst and
// its upstream connection to the same dst are two sockets of the pod
// with the same source address, and each leaves a TIME_WAIT socket when
// the application closes first. At a few hundred new connections a
// second to one destination the even ports fill up with TIME_WAIT
// sockets, and every connect() then probes all of them (14,000 with the
// default range) before it tries an odd one: 2.4 ms of kernel CPU per
// upstream connect in `make bench`'s connect row, 70% of the proxy's CPU.
//
// IP_LOCAL_PORT_RANGE (Linux 6.3) gives a socket a range of its own:
// set, connect() walks it one port at a time with no parity, so an
// upstream connection takes the next free port, odd or even, after at
// most a probe or two. The range asked for is the widest; the kernel
// narrows it to net.ipv4.ip_local_port_range, so the pod's configured
// range and its reserved ports still hold. (The option was added for
// proxies that connect a lot.)
//
// IP_BIND_ADDRESS_NO_PORT (Linux 4.2) matters when the connection is
// bound to a source address (upstream_bind_config, such as Istio's
// 127.0.0.6 for inbound passthrough): without it bind() reserves a port
// for the source address alone, so every connection from it, and every
// TIME_WAIT socket it leaves, holds a port of its own and about 28,000 in
// a minute exhaust them (EADDRINUSE); with it the port is chosen at
// connect() and only needs to be unique for the 4-tuple, as Envoy does.
//
// Both are best effort: on a kernel without them the socket keeps the
// kernel's defaults.

// anyPortRange is IP_LOCAL_PORT_RANGE's value for "the whole range":
// high port in the upper 16 bits, low in the lower.
const anyPortRange = 65535<<16 | 1

func tuneTCP(fd int, bound bool) {
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_LOCAL_PORT_RANGE, anyPortRange)
	if bound {
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
	}
}
