package swarm

import (
	"net/netip"
)

// seederOf returns the seeder of segment k: its seeder in the balanced assignment over all
// members if that one is alive, else the live member that ranks highest for the segment by
// rendezvous hashing. Members dying or coming back thus move only their own segments.
func seederOf(p plan, k int, assignment, members []netip.AddrPort, alive func(netip.AddrPort) bool) (netip.AddrPort, bool) {
	if k < len(assignment) && alive(assignment[k]) {
		return assignment[k], true
	}
	for _, m := range Rank(p.key(k), members) {
		if alive(m) {
			return m, true
		}
	}
	return netip.AddrPort{}, false
}

// assignSeeders gives every segment of a blob its seeder among all members, alive or not:
// segments are taken in order and each goes to the member that ranks highest for it by
// rendezvous hashing among those that have not yet reached their share, ceil(segments/members).
// Plain rendezvous hashing would be lumpy (with 16 segments over 8 members one member often gets
// 4, and a seeder fetches its segments one after the other, so the blob is published at the pace
// of the busiest seeder); the cap bounds every member's upstream work. Liveness is applied on
// top by seederOf, so that the assignment changes only when the member list does. Every node
// computes the same assignment from the same member list.
func assignSeeders(p plan, live []netip.AddrPort) []netip.AddrPort {
	k := p.segments()
	if len(live) == 0 {
		return make([]netip.AddrPort, k)
	}
	share := (k + len(live) - 1) / len(live)
	load := make(map[netip.AddrPort]int, len(live))
	seeders := make([]netip.AddrPort, k)
	for i := range k {
		for _, m := range Rank(p.key(i), live) {
			if load[m] < share {
				seeders[i] = m
				load[m]++
				break
			}
		}
	}
	return seeders
}
