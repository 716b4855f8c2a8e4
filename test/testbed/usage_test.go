package testbed

import (
	"math"
	"testing"
)

// TestParseMachineCPU: busy time is everything but idle and iowait, and steal is reported apart
// (it is busy time from this machine's point of view, spent on other machines).
func TestParseMachineCPU(t *testing.T) {
	// user nice system idle iowait irq softirq steal guest guest_nice, in 1/100 s
	m, err := parseMachineCPU("cpu  1000 100 500 3000 200 0 100 400 50 0")
	if err != nil {
		t.Fatal(err)
	}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	if !near(m.Total, 53) || !near(m.Busy, 21) || !near(m.Steal, 4) {
		t.Fatalf("got %+v, want Total 53 s, Busy 21 s, Steal 4 s", m)
	}
	d := m.Sub(MachineCPU{Busy: 1, Total: 3, Steal: 2})
	if !near(d.StealShare(), 2.0/50) {
		t.Fatalf("steal share of %+v = %v, want 0.04", d, d.StealShare())
	}
	if _, err := parseMachineCPU("intr 1 2 3"); err == nil {
		t.Fatal("a line that is not the cpu line parsed")
	}
}
