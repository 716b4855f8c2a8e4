package resolve

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine is still running once they have ended:
// resolutions, and the connections they open, end with the test that started them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
