package rendezvous

import (
	"fmt"
	"net/netip"
	"testing"
)

// movedShare is the share of keys whose member differs between two assignments.
func movedShare(a, b []netip.AddrPort) float64 {
	moved := 0
	for i := range a {
		if a[i] != b[i] {
			moved++
		}
	}
	return float64(moved) / float64(len(a))
}

func testMembers(n int) []netip.AddrPort {
	ms := make([]netip.AddrPort, n)
	for i := range ms {
		ms[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i / 250), byte(1 + i%250)}), 7070)
	}
	return ms
}

// TestAssignMovesABoundedShare measures, over many blobs, the share of a blob's segments whose
// seeder changes when one member joins or leaves the balanced assignment. Plain rendezvous
// hashing moves 1/(N+1) on a join and 1/N on a leave; taking the least loaded member moves
// more, since one changed choice shifts the loads every later segment is weighed by (the
// figures, logged by go test -v, are in docs/swarm.md). A join or a leave must never move
// most of a blob, nor, from 32 members up, more than three times what plain hashing moves.
func TestAssignMovesABoundedShare(t *testing.T) {
	for _, n := range []int{4, 8, 16, 32, 64} {
		members := testMembers(n + 1)
		before, joined := members[:n], members
		var joinSum, leaveSum, joinMax, leaveMax float64
		const blobs = 200
		for b := range blobs {
			segments := 8 + b%57
			keys := make([]string, segments)
			lengths := make([]int64, segments)
			for k := range keys {
				keys[k] = fmt.Sprintf("blob-%d/segment-%d", b, k)
				lengths[k] = 16 << 20
			}
			lengths[segments-1] = int64(1+b%16) << 20 // a shorter last segment
			base := Assign(keys, lengths, before)
			j := movedShare(base, Assign(keys, lengths, joined))
			l := movedShare(base, Assign(keys, lengths, before[1:])) // member 0 leaves
			joinSum, leaveSum = joinSum+j, leaveSum+l
			joinMax, leaveMax = max(joinMax, j), max(leaveMax, l)
		}
		joinMean, leaveMean := joinSum/blobs, leaveSum/blobs
		t.Logf("N=%2d: join moves %.3f of segments on average (max %.2f; plain hashing %.3f), leave %.3f (max %.2f; plain %.3f)",
			n, joinMean, joinMax, 1/float64(n+1), leaveMean, leaveMax, 1/float64(n))
		if joinMax > 0.8 || leaveMax > 0.8 || joinMean > 0.55 || leaveMean > 0.55 {
			t.Errorf("N=%d: a join moves %.3f (max %.2f), a leave %.3f (max %.2f) of a blob's segments; want at most 0.55 on average and 0.8 of any blob",
				n, joinMean, joinMax, leaveMean, leaveMax)
		}
		if n >= 32 && (joinMean > 3/float64(n+1) || leaveMean > 3/float64(n)) {
			t.Errorf("N=%d: a join moves %.3f, a leave %.3f of the segments on average; want at most three times plain hashing (%.3f, %.3f)",
				n, joinMean, leaveMean, 3/float64(n+1), 3/float64(n))
		}
	}
}
