package swarm

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"
)

// testMembers returns n member addresses, 10.x.y.z:7070.
func testMembers(n int) []netip.AddrPort {
	ms := make([]netip.AddrPort, n)
	for i := range ms {
		ms[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 7070)
	}
	return ms
}

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
