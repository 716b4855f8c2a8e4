package rendezvous

import (
	"fmt"
	"net/netip"
)

// Assign gives each key its member, balanced by load: keys are taken in order and each goes to
// the member with the least load assigned so far (the sum of lengths[i] of its keys), the one
// ranking highest for the key among equals. keys and lengths must have the same length; the
// result has one member per key, all zero when members is empty. Every agent computes the same
// assignment from the same keys, lengths and member set, whatever the order of members.
//
// The swarm assigns a blob's segments to their seeders with it, keys "sha256:<hex>/segment/<k>"
// and lengths the segments' lengths in bytes, over all members, alive or not (liveness is
// applied on top by Pick, so that the assignment changes only when the member list does).
// Plain rendezvous hashing would be lumpy (with 16 segments over 8 members one member often
// gets 4, and a seeder fetches its segments one after the other, so the blob is published at
// the pace of the busiest seeder). Counting bytes rather than keys matters because segments
// differ in length; taking the least loaded rather than capping each member's share also
// spreads neighbouring segments, which are fetched from upstream at the same time, over
// different members (the short segments at the start of a blob always go to different members
// when there are enough).
func Assign(keys []string, lengths []int64, members []netip.AddrPort) []netip.AddrPort {
	if len(keys) != len(lengths) {
		panic(fmt.Sprintf("rendezvous.Assign: %d keys, %d lengths", len(keys), len(lengths)))
	}
	assigned := make([]netip.AddrPort, len(keys))
	if len(members) == 0 {
		return assigned
	}
	load := make(map[netip.AddrPort]int64, len(members))
	for i, key := range keys {
		ranked := Rank(key, members)
		assigned[i] = ranked[0]
		for _, m := range ranked[1:] {
			if load[m] < load[assigned[i]] {
				assigned[i] = m
			}
		}
		load[assigned[i]] += lengths[i]
	}
	return assigned
}

// Pick returns the member that serves key: assigned (its member in the balanced assignment, see
// Assign; the zero AddrPort for none) if that one is alive, else the live member that ranks
// highest for key. ok is false when no member is alive. Members dying or coming back thus move
// only their own keys.
func Pick(key string, assigned netip.AddrPort, members []netip.AddrPort, alive func(netip.AddrPort) bool) (member netip.AddrPort, ok bool) {
	if assigned.IsValid() && alive(assigned) {
		return assigned, true
	}
	for _, m := range Rank(key, members) {
		if alive(m) {
			return m, true
		}
	}
	return netip.AddrPort{}, false
}
