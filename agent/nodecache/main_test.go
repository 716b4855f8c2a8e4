package nodecache

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine is still running once they have ended:
// Run must return only when its watch, its status writer and every item's fetch have ended.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
