package rendezvous

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/shoal-dev/shoal/agent/membership/membershiptest"
)

// segmentKeys returns the keys of n segments of blob i, shaped like the swarm's, each of
// length bytes.
func segmentKeys(i, n int, length int64) ([]string, []int64) {
	keys, lengths := make([]string, n), make([]int64, n)
	for k := range n {
		keys[k] = fmt.Sprintf("sha256:%064x/segment/%d", i, k)
		lengths[k] = length
	}
	return keys, lengths
}

func TestAssignIsBalancedAndDeterministic(t *testing.T) {
	for _, tt := range []struct{ members, keys int }{{8, 16}, {8, 5}, {32, 16}, {3, 100}, {1, 7}} {
		members := membershiptest.Addrs(tt.members)
		for blob := range 20 {
			keys, lengths := segmentKeys(blob, tt.keys, 16<<20)
			got := Assign(keys, lengths, members)
			if len(got) != len(keys) {
				t.Fatalf("%d keys, %d assigned", len(keys), len(got))
			}
			share := (tt.keys + tt.members - 1) / tt.members
			load := map[netip.AddrPort]int{}
			for k, m := range got {
				if !slices.Contains(members, m) {
					t.Fatalf("key %d assigned to %v, not a member", k, m)
				}
				load[m]++
			}
			for m, n := range load {
				if n > share {
					t.Errorf("%d members, %d keys: %v has %d, share is %d", tt.members, tt.keys, m, n, share)
				}
			}
			reversed := slices.Clone(members)
			slices.Reverse(reversed)
			if again := Assign(keys, lengths, reversed); !slices.Equal(got, again) {
				t.Errorf("assignment depends on the order of the member list")
			}
		}
	}
}

// TestAssignFollowsRankWithoutLoad: keys that weigh nothing never make a member busier than
// another, so every key goes to its rendezvous owner.
func TestAssignFollowsRankWithoutLoad(t *testing.T) {
	members := membershiptest.Addrs(8)
	keys, lengths := segmentKeys(1, 64, 0)
	for k, m := range Assign(keys, lengths, members) {
		if owner, _ := Owner(keys[k], members); m != owner {
			t.Errorf("key %d: %v, rendezvous owner %v", k, m, owner)
		}
	}
	if got := Assign(keys[:3], lengths[:3], nil); len(got) != 3 || got[0].IsValid() {
		t.Errorf("no members: %v", got)
	}
}

// TestAssignCountsLengthsNotKeys: a member given one long key gets no other until the others
// carry as much.
func TestAssignCountsLengthsNotKeys(t *testing.T) {
	members := membershiptest.Addrs(2)
	keys, lengths := segmentKeys(1, 51, 1)
	lengths[0] = 100
	got := Assign(keys, lengths, members)
	for k, m := range got[1:] {
		if m == got[0] {
			t.Fatalf("key %d (1 byte) went to %v, which already has key 0 (100 bytes) while the other member has at most 50", k+1, m)
		}
	}
}

// TestPickMovesOnlyTheDeadMembersKeys: when a member dies, exactly its keys move (each to the
// live member ranking highest for it), and when it comes back they return.
func TestPickMovesOnlyTheDeadMembersKeys(t *testing.T) {
	members := membershiptest.Addrs(16)
	all := func(netip.AddrPort) bool { return true }
	for blob := range 100 {
		keys, lengths := segmentKeys(blob, 32, 16<<20)
		assignment := Assign(keys, lengths, members)
		gone := members[blob%len(members)]
		withoutGone := func(m netip.AddrPort) bool { return m != gone }
		for k, key := range keys {
			before, _ := Pick(key, assignment[k], members, all)
			after, _ := Pick(key, assignment[k], members, withoutGone)
			switch {
			case before != assignment[k]:
				t.Fatalf("key %d: %v with everyone alive, assignment says %v", k, before, assignment[k])
			case before == gone && after == gone:
				t.Fatalf("key %d still goes to the dead member", k)
			case before == gone:
				live := slices.DeleteFunc(slices.Clone(members), func(m netip.AddrPort) bool { return m == gone })
				if want, _ := Owner(key, live); after != want {
					t.Fatalf("key %d moved to %v, want its rendezvous owner among the living %v", k, after, want)
				}
			case after != before:
				t.Fatalf("key %d of a live member moved from %v to %v when %v died", k, before, after, gone)
			}
		}
	}
}

func TestPickWithoutAssignmentOrLiveMembers(t *testing.T) {
	members := membershiptest.Addrs(8)
	const key = "sha256:abc/segment/0"
	if got, ok := Pick(key, netip.AddrPort{}, members, func(netip.AddrPort) bool { return true }); !ok || got != Rank(key, members)[0] {
		t.Errorf("no assigned member: got %v, %v, want the owner %v", got, ok, Rank(key, members)[0])
	}
	if got, ok := Pick(key, members[0], members, func(netip.AddrPort) bool { return false }); ok {
		t.Errorf("nobody alive: got %v", got)
	}
}
