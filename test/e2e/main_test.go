// Package e2e tests the shoal agent end to end on one machine: a real registry
// (docker-registry), a real containerd 1.6 pulling through the CRI API as kubelet does, and
// the shoal binary built from this checkout, all in a network namespace of the test's own.
//
// Run as root: go test ./test/e2e/... (SHOAL_E2E=1 turns "cannot isolate" into a failure;
// SHOAL_BINARY=/path/to/shoal skips the build).
package e2e

import (
	"os"
	"testing"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

func TestMain(m *testing.M) {
	// The agent is built before isolating: `go build` may need the module proxy.
	os.Exit(harness.IsolateNetwork(m, harness.BuildShoalFirst(), harness.BuildShoalAtFirst(previousRelease),
		testbed.BuildFetchFirst(), testbed.RaiseNeighbourLimits()))
}

// shoalBinary is the agent under test, built once per run by TestMain.
func shoalBinary(t *testing.T) string {
	t.Helper()
	bin, err := harness.ShoalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}
