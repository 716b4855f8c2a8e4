package plan

import (
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// checkCovers fails unless p's segments tile the blob in order: each starts where the previous
// one ended, each but the last is a whole number of pieces, none is empty or longer than the
// segment size, and the last ends at the blob's end.
func checkCovers(t *testing.T, p Plan) {
	t.Helper()
	var next int64
	n := p.Segments()
	for k := range n {
		offset, length := p.Segment(k)
		switch {
		case offset != next:
			t.Fatalf("%v: segment %d starts at %d, want %d", p, k, offset, next)
		case length <= 0 || length > p.SegmentSize:
			t.Fatalf("%v: segment %d is %d bytes long", p, k, length)
		case k < n-1 && length%p.PieceLength != 0:
			t.Fatalf("%v: segment %d (%d bytes) is not a whole number of pieces", p, k, length)
		case p.Pieces(k) > maxSegmentPieces:
			t.Fatalf("%v: segment %d has %d pieces", p, k, p.Pieces(k))
		case p.FirstPiece(k) != int(offset/p.PieceLength):
			t.Fatalf("%v: segment %d starts at piece %d, its offset %d says %d", p, k, p.FirstPiece(k), offset, offset/p.PieceLength)
		}
		next = offset + length
	}
	if next != p.Size {
		t.Fatalf("%v: segments end at %d, want %d", p, next, p.Size)
	}
}

func TestPlanStartsWithShortSegments(t *testing.T) {
	const mib = 1 << 20
	d := v1.Hash{Algorithm: "sha256", Hex: "ab"}
	for _, tt := range []struct {
		name                    string
		size, segment, piece    int64
		ramp, min               int
		segments                int
		firstLength, lastLength int64
	}{
		{"256 MiB", 256 * mib, 16 * mib, mib, 4, 16, 4 + 15, 4 * mib, 16 * mib},
		{"no ramp", 256 * mib, 16 * mib, mib, 0, 16, 16, 16 * mib, 16 * mib},
		{"64 MiB: sixteenths", 64 * mib, 16 * mib, mib, 4, 16, 4 + 15, mib, 4 * mib},
		{"64 MiB, no minimum", 64 * mib, 16 * mib, mib, 4, 0, 4 + 3, 4 * mib, 16 * mib},
		{"small blob: one piece a segment", 10 * mib, 16 * mib, mib, 4, 16, 10, mib, mib},
		{"blob within the ramp", 3 * mib, 16 * mib, mib, 4, 16, 3, mib, mib},
		{"blob within the ramp, no minimum", 10 * mib, 16 * mib, mib, 4, 0, 3, 4 * mib, 2 * mib},
		{"ramp ends inside the blob", 16*mib + 1, 16 * mib, mib, 4, 0, 5, 4 * mib, 1},
		{"sixteenth rounded down to pieces", 16*mib + 1, 16 * mib, mib, 4, 16, 4 + 13, mib, 1},
		{"quarter below a piece", 64 * mib, 2 * mib, mib, 4, 16, 4 + 30, mib, 2 * mib},
		{"quarter not a whole piece", 256 * mib, 12 * mib, 2 * mib, 2, 16, 2 + 21, 2 * mib, 12 * mib},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p, err := New(d, tt.size, tt.segment, tt.piece, tt.ramp, tt.min)
			if err != nil {
				t.Fatal(err)
			}
			checkCovers(t, p)
			if got := p.Segments(); got != tt.segments {
				t.Fatalf("%v: %d segments, want %d", p, got, tt.segments)
			}
			if _, got := p.Segment(0); got != tt.firstLength {
				t.Errorf("%v: first segment %d bytes, want %d", p, got, tt.firstLength)
			}
			if _, got := p.Segment(tt.segments - 1); got != tt.lastLength {
				t.Errorf("%v: last segment %d bytes, want %d", p, got, tt.lastLength)
			}
		})
	}
}

func TestPlanRejectsBadRamp(t *testing.T) {
	d := v1.Hash{Algorithm: "sha256", Hex: "ab"}
	for _, ramp := range []int{-1, maxRampSegments + 1} {
		if _, err := New(d, 1<<20, 16<<20, 1<<20, ramp, 0); err == nil {
			t.Errorf("ramp %d accepted", ramp)
		}
	}
}

// TestSameCut: plans made from other parameters that cut the blob alike (a small blob's
// segments do not depend on the segment size once MinSegments decides them) are the same cut;
// plans that differ in any boundary are not.
func TestSameCut(t *testing.T) {
	const mib = 1 << 20
	d := v1.Hash{Algorithm: "sha256", Hex: "ab"}
	mk := func(size, segment int64, ramp, minSegments int) Plan {
		t.Helper()
		p, err := New(d, size, segment, mib, ramp, minSegments)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	base := mk(64*mib, 16*mib, 4, 16)
	for _, tt := range []struct {
		name string
		q    Plan
		want bool
	}{
		{"itself", base, true},
		{"a larger segment size, the same sixteenths", mk(64*mib, 32*mib, 4, 16), true},
		{"no minimum", mk(64*mib, 16*mib, 4, 0), false},
		{"another ramp", mk(64*mib, 16*mib, 2, 16), false},
		{"another size", mk(64*mib+1, 16*mib, 4, 16), false},
	} {
		if got := base.SameCut(tt.q); got != tt.want {
			t.Errorf("%s: %v and %v: SameCut %v, want %v", tt.name, base, tt.q, got, tt.want)
		}
	}
	if !mk(256*mib, 16*mib, 4, 16).LegacyCut() || base.LegacyCut() {
		t.Error("LegacyCut: want true for 256 MiB in segments of 16 MiB, false for 64 MiB in sixteenths")
	}
}

// TestNamesGolden pins the names every agent must compute alike: a segment's info name (checked
// by every asker against its own plan) and its rendezvous key (which picks its seeder).
// Changing either is a wire-protocol change.
func TestNamesGolden(t *testing.T) {
	const mib = 1 << 20
	d := v1.Hash{Algorithm: "sha256", Hex: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
	p, err := New(d, 64*mib+5, 16*mib, mib, 4, 16)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		k         int
		name, key string
	}{
		{0, d.Hex + ".0-1048576", d.String() + "/segment/0"},
		{4, d.Hex + ".4194304-8388608", d.String() + "/segment/4"},
		{18, d.Hex + ".62914560-67108864", d.String() + "/segment/18"},
		{19, d.Hex + ".67108864-67108869", d.String() + "/segment/19"},
	} {
		if got := p.InfoName(tt.k); got != tt.name {
			t.Errorf("InfoName(%d) = %q, want %q", tt.k, got, tt.name)
		}
		if got := p.Key(tt.k); got != tt.key {
			t.Errorf("Key(%d) = %q, want %q", tt.k, got, tt.key)
		}
	}
	if n := p.Segments(); n != 20 {
		t.Errorf("%v: %d segments, want 20", p, n)
	}
}
