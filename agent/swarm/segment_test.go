package swarm

import (
	"testing"

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
