package swarm

import (
	"net/url"
	"strconv"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// checkCovers fails unless p's segments tile the blob in order: each starts where the previous
// one ended, each but the last is a whole number of pieces, none is empty or longer than the
// segment size, and the last ends at the blob's end.
func checkCovers(t *testing.T, p plan) {
	t.Helper()
	var next int64
	n := p.segments()
	for k := range n {
		offset, length := p.segment(k)
		switch {
		case offset != next:
			t.Fatalf("%v: segment %d starts at %d, want %d", p, k, offset, next)
		case length <= 0 || length > p.segmentSize:
			t.Fatalf("%v: segment %d is %d bytes long", p, k, length)
		case k < n-1 && length%p.pieceLength != 0:
			t.Fatalf("%v: segment %d (%d bytes) is not a whole number of pieces", p, k, length)
		case p.pieces(k) > maxSegmentPieces:
			t.Fatalf("%v: segment %d has %d pieces", p, k, p.pieces(k))
		}
		next = offset + length
	}
	if next != p.size {
		t.Fatalf("%v: segments end at %d, want %d", p, next, p.size)
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
			p, err := newPlan(d, tt.size, tt.segment, tt.piece, tt.ramp, tt.min)
			if err != nil {
				t.Fatal(err)
			}
			checkCovers(t, p)
			if got := p.segments(); got != tt.segments {
				t.Fatalf("%v: %d segments, want %d", p, got, tt.segments)
			}
			if _, got := p.segment(0); got != tt.firstLength {
				t.Errorf("%v: first segment %d bytes, want %d", p, got, tt.firstLength)
			}
			if _, got := p.segment(tt.segments - 1); got != tt.lastLength {
				t.Errorf("%v: last segment %d bytes, want %d", p, got, tt.lastLength)
			}
		})
	}
}

func TestPlanRejectsBadRamp(t *testing.T) {
	d := v1.Hash{Algorithm: "sha256", Hex: "ab"}
	for _, ramp := range []int{-1, maxRampSegments + 1} {
		if _, err := newPlan(d, 1<<20, 16<<20, 1<<20, ramp, 0); err == nil {
			t.Errorf("ramp %d accepted", ramp)
		}
	}
}

// FuzzParseSegmentRequest feeds the control API's parser arbitrary blob geometry: it must never
// panic, and a plan it accepts must tile the blob.
func FuzzParseSegmentRequest(f *testing.F) {
	f.Add(int64(256<<20), int64(16<<20), int64(1<<20), 4, 16, 3)
	f.Add(int64(1), int64(16<<20), int64(1<<20), 0, 0, 0)
	f.Add(int64(64<<20+1), int64(16<<20), int64(1<<20), 4, 16, 18)
	f.Add(int64(1<<40), int64(16<<20), int64(16<<10), 64, 1024, 100)
	f.Fuzz(func(t *testing.T, size, segmentSize, pieceLength int64, ramp, minSegments, k int) {
		q := url.Values{
			"digest":       {"sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
			"segment":      {strconv.Itoa(k)},
			"size":         {strconv.FormatInt(size, 10)},
			"segment_size": {strconv.FormatInt(segmentSize, 10)},
			"piece_length": {strconv.FormatInt(pieceLength, 10)},
			"ramp":         {strconv.Itoa(ramp)},
			"min_segments": {strconv.Itoa(minSegments)},
			"registry":     {"registry.test"},
			"repository":   {"app"},
			"peer":         {"127.0.0.1:7000"},
		}
		r, p, err := parseSegmentRequest(q)
		if err != nil {
			return
		}
		if r.k < 0 || r.k >= p.segments() {
			t.Fatalf("accepted segment %d of %d", r.k, p.segments())
		}
		if p.segments() <= 1<<16 {
			checkCovers(t, p)
		}
	})
}

// TestInfoOfAnotherCutIsRefused: segment 4 is 16 MiB long both with and without the short
// segments at the start, but covers other bytes; an info built under one cut must not pass for
// the other, or a node would fill those bytes with pieces of another range.
func TestInfoOfAnotherCutIsRefused(t *testing.T) {
	d := v1.Hash{Algorithm: "sha256", Hex: "ab"}
	ramp, err := newPlan(d, 256<<20, 16<<20, 1<<20, 4, DefaultMinSegments)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := newPlan(d, 256<<20, 16<<20, 1<<20, 0, DefaultMinSegments)
	if err != nil {
		t.Fatal(err)
	}
	const k = 4
	if _, a := ramp.segment(k); a != 16<<20 {
		t.Fatalf("segment %d of %v is %d bytes, want 16 MiB", k, ramp, a)
	}
	info, err := buildInfo(plain, k, make([]byte, plain.pieces(k)*20))
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
