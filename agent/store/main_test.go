package store

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine is still running once they have ended:
// Close must return only when the downloads it stopped have ended.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
