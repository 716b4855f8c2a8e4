package swarm

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/plan"
)

// TestInfoOfAnotherCutIsRefused: segment 4 is 16 MiB long both with and without the short
// segments at the start, but covers other bytes; an info built under one cut must not pass for
// the other, or a node would fill those bytes with pieces of another range.
func TestInfoOfAnotherCutIsRefused(t *testing.T) {
	d := v1.Hash{Algorithm: "sha256", Hex: "ab"}
	ramp, err := plan.New(d, 256<<20, 16<<20, 1<<20, 4, DefaultMinSegments)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := plan.New(d, 256<<20, 16<<20, 1<<20, 0, DefaultMinSegments)
	if err != nil {
		t.Fatal(err)
	}
	const k = 4
	if _, a := ramp.Segment(k); a != 16<<20 {
		t.Fatalf("segment %d of %v is %d bytes, want 16 MiB", k, ramp, a)
	}
	info, err := buildInfo(plain, k, make([]byte, plain.Pieces(k)*20))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := checkInfo(plain, k, info); err != nil {
		t.Fatalf("an info does not pass for its own cut: %v", err)
	}
	if _, err := checkInfo(ramp, k, info); err == nil {
		t.Fatal("segment 4 of a blob cut without short segments passed for segment 4 of one cut with them")
	}
}

// TestSegmentForgetsPeersThatLeft: a seeder hands out, as neighbours, only peers that are still
// members.
func TestSegmentForgetsPeersThatLeft(t *testing.T) {
	self := netip.MustParseAddrPort("10.0.0.1:7070")
	gone := netip.MustParseAddrPort("10.0.0.2:7070")
	stays := netip.MustParseAddrPort("10.0.0.3:7070")
	asker := netip.MustParseAddrPort("10.0.0.4:7070")
	everyone := func(netip.Addr) bool { return true }
	seg := newSegment(0)
	now := time.Now()
	seg.addPeer("key", self, gone, now, 8, everyone)
	seg.addPeer("key", self, stays, now, 8, everyone)
	member := func(a netip.Addr) bool { return a != gone.Addr() }
	got := seg.addPeer("key", self, asker, now, 8, member)
	if slices.Contains(got, gone) || !slices.Contains(got, stays) || !slices.Contains(got, self) {
		t.Errorf("neighbours %v, want %v and %v but not %v, which left", got, self, stays, gone)
	}
	if _, kept := seg.peers[gone]; kept {
		t.Errorf("the segment still remembers %v, which left", gone)
	}
}
