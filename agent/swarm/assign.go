package swarm

import (
	"net/netip"
	"slices"

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

// assignment is a blob's seeders over one version of the member set.
type assignment struct {
	members []netip.AddrPort // the member set it was computed over
	seeders []netip.AddrPort // balanced seeder of every segment over members (assignSeeders)
	stale   <-chan struct{}  // closed once the member set has changed
}

// seedersOf returns b's seeder assignment over the current members, computed again when members
// have joined or left since it was last: every node computes the same one from the same
// members, and a join or a leave moves a bounded share of a blob's segments, including those of
// a blob being fetched (its segments already published stay where they are).
func (s *Swarm) seedersOf(b *blob) *assignment {
	b.assignMu.Lock()
	defer b.assignMu.Unlock()
	if a := b.assigned; a != nil && !closed(a.stale) {
		return a
	}
	stale := s.cfg.Membership.Changes() // before Members: a change in between makes it stale
	members := s.cfg.Membership.Members()
	if within := intersect(members, b.seedSet); len(within) > 0 {
		members = within
	}
	b.assigned = &assignment{members: members, seeders: assignSeeders(b.plan, members), stale: stale}
	return b.assigned
}

// restrictSeeders makes the blob's segments seeded by the members among seeders only (all
// members again when seeders is empty); the assignment is computed again if they changed.
func (b *blob) restrictSeeders(seeders []netip.AddrPort) {
	set := slices.Clone(seeders)
	slices.SortFunc(set, netip.AddrPort.Compare)
	set = slices.Compact(set)
	b.assignMu.Lock()
	defer b.assignMu.Unlock()
	if slices.Equal(set, b.seedSet) {
		return
	}
	b.seedSet = set
	b.assigned = nil
}

// intersect returns the members that are in set (sorted), in members' order.
func intersect(members, set []netip.AddrPort) []netip.AddrPort {
	if len(set) == 0 {
		return nil
	}
	var out []netip.AddrPort
	for _, m := range members {
		if _, ok := slices.BinarySearchFunc(set, m, netip.AddrPort.Compare); ok {
			out = append(out, m)
		}
	}
	return out
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
