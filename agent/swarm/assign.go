package swarm

import (
	"net/netip"

	"github.com/shoal-dev/shoal/agent/plan"
	"github.com/shoal-dev/shoal/agent/rendezvous"
)

// seederOf returns the seeder of segment k of p: its seeder in the balanced assignment over all
// members (assignment, from assignSeeders) if that one is alive, else the live member that ranks
// highest for the segment's key (see rendezvous.Pick).
func seederOf(p plan.Plan, k int, assignment, members []netip.AddrPort, alive func(netip.AddrPort) bool) (netip.AddrPort, bool) {
	var assigned netip.AddrPort
	if k < len(assignment) {
		assigned = assignment[k]
	}
	return rendezvous.Pick(p.Key(k), assigned, members, alive)
}

// assignSeeders gives every segment of p its seeder among members, alive or not, balanced by
// the bytes each member has to fetch (see rendezvous.Assign). Every node computes the same
// assignment from the same member list.
func assignSeeders(p plan.Plan, members []netip.AddrPort) []netip.AddrPort {
	n := p.Segments()
	keys, lengths := make([]string, n), make([]int64, n)
	for k := range n {
		keys[k] = p.Key(k)
		_, lengths[k] = p.Segment(k)
	}
	return rendezvous.Assign(keys, lengths, members)
}
