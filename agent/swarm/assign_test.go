package swarm

import (
	"fmt"
	"net/netip"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/membership/membershiptest"
	"github.com/shoal-dev/shoal/agent/plan"
	"github.com/shoal-dev/shoal/agent/rendezvous"
)

// TestSeederOfFollowsTheSegmentKeys: a segment's seeder is its assigned member while that one
// is alive, and otherwise the live member ranking highest for the segment's key, the key every
// node derives from the plan.
func TestSeederOfFollowsTheSegmentKeys(t *testing.T) {
	members := membershiptest.Addrs(8)
	d := v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%064x", 1)}
	p, err := plan.New(d, 256<<20, DefaultSegmentSize, DefaultPieceLength, DefaultRampSegments, DefaultMinSegments)
	if err != nil {
		t.Fatal(err)
	}
	assignment := assignSeeders(p, members)
	if len(assignment) != p.Segments() {
		t.Fatalf("%d seeders for %d segments", len(assignment), p.Segments())
	}
	for k := range p.Segments() {
		dead := assignment[k]
		alive := func(m netip.AddrPort) bool { return m != dead }
		if got, _ := seederOf(p, k, assignment, members, func(netip.AddrPort) bool { return true }); got != dead {
			t.Errorf("segment %d: seeder %v with everyone alive, assigned %v", k, got, dead)
		}
		want := rendezvous.Rank(p.Key(k), members)[0]
		if want == dead {
			want = rendezvous.Rank(p.Key(k), members)[1]
		}
		if got, _ := seederOf(p, k, assignment, members, alive); got != want {
			t.Errorf("segment %d: seeder %v once %v died, want %v, the next by rank for %s", k, got, dead, want, p.Key(k))
		}
	}
}

// TestAssignSeedersBalancesBytes: with short segments at the start of a blob (see plan.Plan),
// the share is counted in bytes: nobody seeds three long segments while others seed short ones,
// and the short segments go to different members, to be fetched in parallel.
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
