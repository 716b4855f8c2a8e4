package swarm

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/membership/membershiptest"
	"github.com/shoal-dev/shoal/agent/plan"
	"github.com/shoal-dev/shoal/agent/rendezvous"
)

func testPlan(t *testing.T, i int, segments int64) plan.Plan {
	t.Helper()
	d := v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%064x", i)}
	p, err := plan.New(d, segments*DefaultSegmentSize, DefaultSegmentSize, DefaultPieceLength, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestAssignSeedersIsBalancedAndDeterministic(t *testing.T) {
	for _, tt := range []struct{ members, segments int }{{8, 16}, {8, 5}, {32, 16}, {3, 100}, {1, 7}} {
		members := membershiptest.Addrs(tt.members)
		for blob := range 20 {
			p := testPlan(t, blob, int64(tt.segments))
			got := assignSeeders(p, members)
			share := (p.Segments() + tt.members - 1) / tt.members
			load := map[netip.AddrPort]int{}
			for k, m := range got {
				if !slices.Contains(members, m) {
					t.Fatalf("segment %d assigned to %v, not a member", k, m)
				}
				load[m]++
			}
			for m, n := range load {
				if n > share {
					t.Errorf("%d members, %d segments: %v seeds %d, share is %d", tt.members, tt.segments, m, n, share)
				}
			}
			reversed := slices.Clone(members)
			slices.Reverse(reversed)
			if again := assignSeeders(p, reversed); !slices.Equal(got, again) {
				t.Errorf("assignment depends on the order of the member list")
			}
		}
	}
}

// TestSeederStability: when a member dies, exactly its segments move (each to the live member
// ranking highest for it), and when it comes back they return.
func TestSeederStability(t *testing.T) {
	members := membershiptest.Addrs(16)
	for blob := range 100 {
		p := testPlan(t, blob, 32)
		assignment := assignSeeders(p, members)
		gone := members[blob%len(members)]
		all := func(netip.AddrPort) bool { return true }
		withoutGone := func(m netip.AddrPort) bool { return m != gone }
		for k := range p.Segments() {
			before, _ := seederOf(p, k, assignment, members, all)
			after, _ := seederOf(p, k, assignment, members, withoutGone)
			switch {
			case before != assignment[k]:
				t.Fatalf("segment %d: seeder %v with everyone alive, assignment says %v", k, before, assignment[k])
			case before == gone && after == gone:
				t.Fatalf("segment %d still seeded by the dead member", k)
			case before == gone:
				live := slices.DeleteFunc(slices.Clone(members), func(m netip.AddrPort) bool { return m == gone })
				if want, _ := rendezvous.Owner(p.Key(k), live); after != want {
					t.Fatalf("segment %d moved to %v, want its rendezvous owner among the living %v", k, after, want)
				}
			case after != before:
				t.Fatalf("segment %d of a live member moved from %v to %v when %v died", k, before, after, gone)
			}
		}
	}
	p := testPlan(t, 1, 4)
	if _, ok := seederOf(p, 0, assignSeeders(p, members), members, func(netip.AddrPort) bool { return false }); ok {
		t.Error("a seeder was found with nobody alive")
	}
}

// TestAssignSeedersFollowsRendezvousWithoutContention: with room for everyone, every segment goes
// to its rendezvous owner.
func TestAssignSeedersFollowsRendezvousWithoutContention(t *testing.T) {
	members := membershiptest.Addrs(1)
	p := testPlan(t, 1, 3)
	for k, m := range assignSeeders(p, members) {
		if owner, _ := rendezvous.Owner(p.Key(k), members); m != owner {
			t.Errorf("segment %d: %v, rendezvous owner %v", k, m, owner)
		}
	}
	if got := assignSeeders(p, nil); len(got) != 3 || got[0].IsValid() {
		t.Errorf("no members: %v", got)
	}
}

// TestAssignSeedersBalancesBytes: with short segments at the start of a blob (see plan), the
// share is counted in bytes: nobody seeds three long segments while others seed short ones, and
// the short segments go to different members, to be fetched in parallel.
func TestAssignSeedersBalancesBytes(t *testing.T) {
	const mib = 1 << 20
	for _, tt := range []struct {
		members int
		worst   int64 // the most bytes any member may seed
	}{{8, 36 * mib}, {16, 20 * mib}, {32, 16 * mib}} {
		members := membershiptest.Addrs(tt.members)
		for blob := range 200 {
			d := v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%064x", blob)}
			p, err := plan.New(d, 256*mib, 16*mib, mib, DefaultRampSegments, DefaultMinSegments)
			if err != nil {
				t.Fatal(err)
			}
			got := assignSeeders(p, members)
			load := map[netip.AddrPort]int64{}
			shortSeeders := map[netip.AddrPort]bool{}
			for k, m := range got {
				_, length := p.Segment(k)
				load[m] += length
				if k < p.RampSegments {
					shortSeeders[m] = true
				}
			}
			for m, n := range load {
				if n > tt.worst {
					t.Fatalf("%d members, blob %d: %v seeds %d MiB, want at most %d", tt.members, blob, m, n/mib, tt.worst/mib)
				}
			}
			if tt.members >= p.RampSegments && len(shortSeeders) < p.RampSegments {
				t.Errorf("%d members, blob %d: the %d short segments went to %d members", tt.members, blob, p.RampSegments, len(shortSeeders))
			}
		}
	}
}
