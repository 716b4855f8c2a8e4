package membership

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine is still running once they have ended:
// every goroutine the package starts must end with the component that started it.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
