package rendezvous

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/shoal-dev/shoal/agent/membership/membershiptest"
)

// testKeys returns n keys shaped like the swarm's: 8 segments of n/8 digests.
func testKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("sha256:%064x/segment/%d", i/8, i%8)
	}
	return keys
}

// TestRankGolden pins the hash: agents of different versions must agree on owners, so changing
// the ranking is a wire-protocol change. The expected orders were computed independently (in
// Python, from the formula in Rank's doc comment).
func TestRankGolden(t *testing.T) {
	members := []netip.AddrPort{
		netip.MustParseAddrPort("10.0.0.1:7070"),
		netip.MustParseAddrPort("10.0.0.2:7070"),
		netip.MustParseAddrPort("10.0.0.3:7070"),
		netip.MustParseAddrPort("[fd00::4]:7070"),
	}
	const d = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
	tests := []struct {
		key  string
		want []string
	}{
		{d, []string{"10.0.0.3:7070", "10.0.0.1:7070", "10.0.0.2:7070", "[fd00::4]:7070"}},
		{d + "/segment/0", []string{"10.0.0.1:7070", "10.0.0.3:7070", "[fd00::4]:7070", "10.0.0.2:7070"}},
		{d + "/segment/1", []string{"10.0.0.1:7070", "10.0.0.2:7070", "[fd00::4]:7070", "10.0.0.3:7070"}},
	}
	for _, tt := range tests {
		if got := addrStrings(Rank(tt.key, members)); !slices.Equal(got, tt.want) {
			t.Errorf("Rank(%q) = %v, want %v", tt.key, got, tt.want)
		}
		if got, ok := Owner(tt.key, members); !ok || got.String() != tt.want[0] {
			t.Errorf("Owner(%q) = %v, %v, want %v", tt.key, got, ok, tt.want[0])
		}
	}
}

func TestRankIsAPermutationAndLeavesInputAlone(t *testing.T) {
	members := membershiptest.Addrs(20)
	orig := slices.Clone(members)
	got := Rank("sha256:abc", members)
	if !slices.Equal(members, orig) {
		t.Fatalf("Rank modified its input")
	}
	sorted := slices.SortedFunc(slices.Values(got), netip.AddrPort.Compare)
	if !slices.Equal(sorted, orig) {
		t.Fatalf("Rank = %v, not a permutation of %v", got, orig)
	}
}

func TestRankIndependentOfInputOrder(t *testing.T) {
	members := membershiptest.Addrs(32)
	rng := rand.New(rand.NewPCG(1, 2))
	for _, key := range testKeys(200) {
		want := Rank(key, members)
		shuffled := slices.Clone(members)
		rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		if got := Rank(key, shuffled); !slices.Equal(got, want) {
			t.Fatalf("Rank(%q) depends on input order:\n%v\n%v", key, got, want)
		}
		if got, _ := Owner(key, shuffled); got != want[0] {
			t.Fatalf("Owner(%q) = %v, want Rank's first %v", key, got, want[0])
		}
	}
}

func TestRankUnmapsIPv4InIPv6(t *testing.T) {
	plain := []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:7070"), netip.MustParseAddrPort("10.0.0.2:7070"), netip.MustParseAddrPort("10.0.0.3:7070")}
	mapped := make([]netip.AddrPort, len(plain))
	for i, p := range plain {
		mapped[i] = netip.AddrPortFrom(netip.AddrFrom16(p.Addr().As16()), p.Port())
	}
	for _, key := range testKeys(64) {
		want, got := Rank(key, plain), Rank(key, mapped)
		for i := range want {
			if got[i].Addr().Unmap() != want[i].Addr() {
				t.Fatalf("Rank(%q): mapped %v, plain %v", key, got, want)
			}
		}
	}
}

func TestRankTiesAreOrderedByAddress(t *testing.T) {
	a, b := netip.MustParseAddrPort("10.0.0.1:7070"), netip.MustParseAddrPort("10.0.0.2:7070")
	for _, members := range [][]netip.AddrPort{{a, b, a}, {a, a, b}, {b, a, a}} {
		got := Rank("sha256:abc", members)
		i := slices.Index(got, a)
		if i < 0 || i+1 >= len(got) || got[i+1] != a {
			t.Errorf("Rank(%v) = %v: the two copies of %v are not adjacent", members, got, a)
		}
	}
}

func TestOwnerEmpty(t *testing.T) {
	if got, ok := Owner("sha256:abc", nil); ok {
		t.Errorf("Owner of no members = %v, true", got)
	}
	if got := Rank("sha256:abc", nil); len(got) != 0 {
		t.Errorf("Rank of no members = %v", got)
	}
}

func TestRankBalance(t *testing.T) {
	members := membershiptest.Addrs(16)
	keys := testKeys(10000)
	count := map[netip.AddrPort]int{}
	for _, key := range keys {
		o, _ := Owner(key, members)
		count[o]++
	}
	mean := float64(len(keys)) / float64(len(members))
	for _, m := range members {
		if n := float64(count[m]); n < 0.75*mean || n > 1.25*mean {
			t.Errorf("%v owns %v keys, want within 25%% of %v", m, n, mean)
		}
	}
}

// TestRankStableWhenMemberLeaves: only the leaving member's keys move, each to its second
// choice; and the rest of every ranking keeps its order.
func TestRankStableWhenMemberLeaves(t *testing.T) {
	members := membershiptest.Addrs(16)
	leaving := members[5]
	remaining := slices.DeleteFunc(slices.Clone(members), func(m netip.AddrPort) bool { return m == leaving })
	moved := 0
	for _, key := range testKeys(5000) {
		before, after := Rank(key, members), Rank(key, remaining)
		if want := slices.DeleteFunc(slices.Clone(before), func(m netip.AddrPort) bool { return m == leaving }); !slices.Equal(after, want) {
			t.Fatalf("%s: ranking after %v left = %v, want %v", key, leaving, after, want)
		}
		switch {
		case before[0] == leaving:
			moved++
			if after[0] != before[1] {
				t.Errorf("%s: moved to %v, want its second choice %v", key, after[0], before[1])
			}
		case after[0] != before[0]:
			t.Errorf("%s: moved from %v to %v though its owner stayed", key, before[0], after[0])
		}
	}
	if moved == 0 {
		t.Errorf("the leaving member owned no key: the test proves nothing")
	}
}

// TestRankStableWhenMemberJoins: only keys the newcomer now owns move.
func TestRankStableWhenMemberJoins(t *testing.T) {
	members := membershiptest.Addrs(17)
	newcomer := members[16]
	old := members[:16]
	moved := 0
	for _, key := range testKeys(5000) {
		before, _ := Owner(key, old)
		after, _ := Owner(key, members)
		if after == newcomer {
			moved++
		} else if after != before {
			t.Errorf("%s: moved from %v to %v, not to the newcomer", key, before, after)
		}
	}
	if moved == 0 {
		t.Errorf("the newcomer took no key: the test proves nothing")
	}
}

func BenchmarkRank(b *testing.B) {
	for _, n := range []int{64, 5000} {
		members := membershiptest.Addrs(n)
		b.Run(fmt.Sprintf("members=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				Rank(fmt.Sprintf("sha256:%064x/segment/%d", i, i%8), members)
			}
		})
	}
}

func BenchmarkOwner(b *testing.B) {
	for _, n := range []int{64, 5000} {
		members := membershiptest.Addrs(n)
		b.Run(fmt.Sprintf("members=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				Owner(fmt.Sprintf("sha256:%064x/segment/%d", i, i%8), members)
			}
		})
	}
}

func addrStrings(as []netip.AddrPort) []string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return s
}

// TestNeighboursBoundDegreeAndConnectEveryone builds the graph the seeder hands out for one
// segment at several cluster sizes: every node gets at most the degree asked for, the links
// (either end chose the other) keep every node's connection count bounded whatever the size,
// and the graph is connected, so a segment's data reaches everyone.
func TestNeighboursBoundDegreeAndConnectEveryone(t *testing.T) {
	const degree = 5
	for _, n := range []int{2, 4, 8, 32, 128, 512} {
		members := membershiptest.Addrs(n)
		key := fmt.Sprintf("sha256:%064x/segment/3", n)
		links := map[netip.AddrPort]map[netip.AddrPort]bool{}
		link := func(a, b netip.AddrPort) {
			if links[a] == nil {
				links[a] = map[netip.AddrPort]bool{}
			}
			links[a][b] = true
		}
		for _, m := range members {
			got := Neighbours(key, m, members, degree)
			if want := min(degree, n-1); len(got) != want {
				t.Fatalf("n=%d: %s got %d neighbours, want %d", n, m, len(got), want)
			}
			for _, o := range got {
				if o == m {
					t.Fatalf("n=%d: %s is its own neighbour", n, m)
				}
				link(m, o)
				link(o, m)
			}
		}
		most := 0
		for _, m := range members {
			most = max(most, len(links[m]))
		}
		t.Logf("n=%d: at most %d links per node", n, most)
		// Pair weights are symmetric, so a node is chosen mostly by the nodes it chose itself.
		if most > 3*degree {
			t.Errorf("n=%d: a node has %d links, want at most %d", n, most, 3*degree)
		}
		seen := map[netip.AddrPort]bool{members[0]: true}
		queue := []netip.AddrPort{members[0]}
		for len(queue) > 0 {
			m := queue[0]
			queue = queue[1:]
			for o := range links[m] {
				if !seen[o] {
					seen[o] = true
					queue = append(queue, o)
				}
			}
		}
		if len(seen) != n {
			t.Errorf("n=%d: only %d nodes reachable from %s", n, len(seen), members[0])
		}
	}
}

// TestNeighboursStableAsOthersJoin: a node keeps a neighbour when someone joins, unless the
// newcomer outranks it, so connections already open stay useful.
func TestNeighboursStableAsOthersJoin(t *testing.T) {
	members := membershiptest.Addrs(40)
	const key = "sha256:0000000000000000000000000000000000000000000000000000000000000001/segment/0"
	x := members[0]
	before := Neighbours(key, x, members[:39], 5)
	after := Neighbours(key, x, members, 5)
	kept := 0
	for _, m := range before {
		if slices.Contains(after, m) {
			kept++
		}
	}
	if newcomer := slices.Contains(after, members[39]); kept != 5 && (!newcomer || kept != 4) {
		t.Errorf("after one join %d of 5 neighbours kept (newcomer chosen: %v), want all or all but the one it displaced", kept, newcomer)
	}
	if got := Neighbours(key, x, slices.Concat(members[20:], members[:20]), 5); !slices.Equal(got, after) {
		t.Errorf("neighbours depend on the order of the candidates: %v vs %v", got, after)
	}
	if pairWeight(key, members[1], members[2]) != pairWeight(key, members[2], members[1]) {
		t.Error("pair weight is not symmetric")
	}
}
