package swarm

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

// TestIsTimeout: only timeouts are left to the probes; a refused or reset connection counts as
// a failure of the member at once.
func TestIsTimeout(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	_, refused := net.DialTimeout("tcp", addr, time.Second)
	if refused == nil || isTimeout(refused) {
		t.Errorf("refused connection: isTimeout(%v) = true or no error", refused)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Nanosecond)
	defer cancel()
	<-ctx.Done()
	_, timedOut := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if !isTimeout(timedOut) {
		t.Errorf("isTimeout(%v) = false for a dial cut by its deadline", timedOut)
	}
	if isTimeout(nil) || isTimeout(errors.New("connection reset by peer")) {
		t.Error("isTimeout is true for nil or a plain error")
	}
}
