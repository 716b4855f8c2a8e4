package store

import (
	"errors"
	"slices"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func sortedHashes(ds ...v1.Hash) []v1.Hash {
	out := slices.Clone(ds)
	slices.SortFunc(out, func(a, b v1.Hash) int { return strings.Compare(a.Hex, b.Hex) })
	return out
}

// PinnedBy lists what one owner pins, present or not, and nothing of other owners; the list
// survives a restart, so a component can reconcile its pins after one.
func TestPinnedByOwner(t *testing.T) {
	dir := t.TempDir()
	ts := openTestStore(t, dir)
	aData, _ := randomBlob(70, 100)
	a := mustFetch(t, ts.Store, aData)
	_, b := randomBlob(71, 100) // never stored
	_, c := randomBlob(72, 100)
	if err := ts.PinAll([]v1.Hash{a, b}, "nodecache"); err != nil {
		t.Fatal(err)
	}
	if err := ts.PinAll([]v1.Hash{a, c}, "prewarm/x"); err != nil {
		t.Fatal(err)
	}
	if got, want := ts.PinnedBy("nodecache"), sortedHashes(a, b); !slices.Equal(got, want) {
		t.Errorf("PinnedBy(nodecache) = %v, want %v", got, want)
	}
	if got := ts.PinnedBy("nobody"); len(got) != 0 {
		t.Errorf("PinnedBy(nobody) = %v, want none", got)
	}
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}

	ts = openTestStore(t, dir)
	if got, want := ts.PinnedBy("nodecache"), sortedHashes(a, b); !slices.Equal(got, want) {
		t.Errorf("after reopening, PinnedBy(nodecache) = %v, want %v", got, want)
	}
	// Unpinning one owner's pins leaves the other's on the same blob.
	if err := ts.UnpinAll([]v1.Hash{a, b}, "nodecache"); err != nil {
		t.Fatal(err)
	}
	if got := ts.PinnedBy("nodecache"); len(got) != 0 {
		t.Errorf("after UnpinAll, PinnedBy(nodecache) = %v, want none", got)
	}
	if got, want := ts.PinnedBy("prewarm/x"), sortedHashes(a, c); !slices.Equal(got, want) {
		t.Errorf("PinnedBy(prewarm/x) = %v, want %v", got, want)
	}
	if list := ts.List(); len(list) != 1 || !list[0].Pinned {
		t.Errorf("List = %+v, want a still pinned", list)
	}
}

// A batch with an invalid digest changes nothing, and pinning a digest twice in a batch is one
// pin.
func TestPinAllIsAllOrNothing(t *testing.T) {
	ts := openTestStore(t, "")
	_, a := randomBlob(73, 10)
	bad := v1.Hash{Algorithm: "sha256", Hex: "xyz"}
	if err := ts.PinAll([]v1.Hash{a, bad}, "o"); !errors.Is(err, ErrInvalidDigest) {
		t.Fatalf("PinAll with an invalid digest = %v, want ErrInvalidDigest", err)
	}
	if got := ts.PinnedBy("o"); len(got) != 0 {
		t.Errorf("PinnedBy after a refused batch = %v, want none", got)
	}
	if err := ts.PinAll([]v1.Hash{a, a}, "o"); err != nil {
		t.Fatal(err)
	}
	if err := ts.Unpin(a, "o"); err != nil {
		t.Fatal(err)
	}
	if got := ts.PinnedBy("o"); len(got) != 0 {
		t.Errorf("PinnedBy after one Unpin of a digest pinned twice in a batch = %v, want none", got)
	}
}

// PinnedBytes counts each complete pinned blob once, however many owners pin it, and no blob
// that is pinned but absent.
func TestPinnedBytes(t *testing.T) {
	ts := openTestStore(t, "", WithMaxBytes(1000))
	aData, _ := randomBlob(74, 100)
	bData, _ := randomBlob(75, 200)
	a, b := mustFetch(t, ts.Store, aData), mustFetch(t, ts.Store, bData)
	_, absent := randomBlob(76, 50)
	if err := ts.PinAll([]v1.Hash{a, absent}, "x"); err != nil {
		t.Fatal(err)
	}
	if err := ts.Pin(a, "y"); err != nil {
		t.Fatal(err)
	}
	if got := ts.PinnedBytes(); got != 100 {
		t.Errorf("PinnedBytes = %d, want 100 (a once; b unpinned; absent not stored)", got)
	}
	if err := ts.Pin(b, "y"); err != nil {
		t.Fatal(err)
	}
	if got := ts.PinnedBytes(); got != 300 {
		t.Errorf("PinnedBytes = %d, want 300", got)
	}
	if got := ts.metric(t, "shoal_store_pinned_bytes"); got != 300 {
		t.Errorf("shoal_store_pinned_bytes = %v, want 300", got)
	}
	if got := ts.MaxBytes(); got != 1000 {
		t.Errorf("MaxBytes = %d, want 1000", got)
	}
}
