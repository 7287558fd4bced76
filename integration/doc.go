// Package integration holds meshtun's end-to-end tests: each test builds
// its own network namespaces (a "pod" with capture, a "services" side
// reached over veth), runs the meshtun binary named by $MESHTUN_BIN in the
// pod, and drives real traffic through it. They need root; under CI=true a
// missing privilege fails the test instead of skipping it.
package integration
