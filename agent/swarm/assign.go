package swarm

import (
	"net/netip"

	"github.com/shoal-dev/shoal/agent/plan"
	"github.com/shoal-dev/shoal/agent/rendezvous"
)

// seederOf returns the seeder of segment k: its seeder in the balanced assignment over all
// members if that one is alive, else the live member that ranks highest for the segment by
// rendezvous hashing. Members dying or coming back thus move only their own segments.
func seederOf(p plan.Plan, k int, assignment, members []netip.AddrPort, alive func(netip.AddrPort) bool) (netip.AddrPort, bool) {
	if k < len(assignment) && alive(assignment[k]) {
		return assignment[k], true
	}
	for _, m := range rendezvous.Rank(p.Key(k), members) {
		if alive(m) {
			return m, true
		}
	}
	return netip.AddrPort{}, false
}

// assignSeeders gives every segment of a blob its seeder among all members, alive or not:
// segments are taken in order and each goes to the member that has the fewest of the blob's
// bytes to seed so far, the one ranking highest for the segment by rendezvous hashing among
// equals. Plain rendezvous hashing would be lumpy (with 16 segments over 8 members one member
// often gets 4, and a seeder fetches its segments one after the other, so the blob is published
// at the pace of the busiest seeder). Counting bytes rather than segments matters because
// segments differ in length (see plan); taking the least loaded rather than capping each
// member's share also spreads neighbouring segments, which are fetched from upstream at the
// same time, over different members (the short segments at the start always go to different
// members when there are enough). Liveness is applied on top by seederOf, so that the
// assignment changes only when the member list does. Every node computes the same assignment
// from the same member list.
func assignSeeders(p plan.Plan, live []netip.AddrPort) []netip.AddrPort {
	k := p.Segments()
	if len(live) == 0 {
		return make([]netip.AddrPort, k)
	}
	load := make(map[netip.AddrPort]int64, len(live))
	seeders := make([]netip.AddrPort, k)
	for i := range k {
		_, length := p.Segment(i)
		ranked := rendezvous.Rank(p.Key(i), live)
		seeders[i] = ranked[0]
		for _, m := range ranked[1:] {
			if load[m] < load[seeders[i]] {
				seeders[i] = m
			}
		}
		load[seeders[i]] += length
	}
	return seeders
}
