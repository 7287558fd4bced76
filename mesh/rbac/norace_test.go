//go:build !race

package rbac

// raceEnabled: see race_test.go.
const raceEnabled = false
