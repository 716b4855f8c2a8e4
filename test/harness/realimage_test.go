package harness

import (
	"io"
	"testing"
)

// TestRealisticImage: the image has a large layer, a second one and small ones, its
// compressed size is close to the one asked for, its layers compress as real ones do (not
// at all like random bytes, nor like zeros), and the seed alone decides its content.
func TestRealisticImage(t *testing.T) {
	const size = 6 << 20
	img, err := RealisticImage(RealisticImageSpec{Size: size, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != len(realisticLayerShares) {
		t.Fatalf("%d layers, want %d", len(layers), len(realisticLayerShares))
	}
	var compressed, uncompressed int64
	sizes := make([]int64, len(layers))
	for i, l := range layers {
		if sizes[i], err = l.Size(); err != nil {
			t.Fatal(err)
		}
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			t.Fatalf("layer %d does not decompress: %v", i, err)
		}
		compressed += sizes[i]
		uncompressed += n
	}
	if compressed < size*9/10 || compressed > size*12/10 {
		t.Errorf("compressed size %d, want about %d", compressed, size)
	}
	if sizes[0] < size/3 || sizes[len(sizes)-1] > size/50 {
		t.Errorf("layer sizes %v: want a large base and a small last layer", sizes)
	}
	t.Logf("%d layers, %d bytes compressed, %d uncompressed", len(layers), compressed, uncompressed)
	if ratio := float64(compressed) / float64(uncompressed); ratio < 0.3 || ratio > 0.75 {
		t.Errorf("compressed / uncompressed = %.2f (%d / %d), want what real layers give (0.3-0.75)", ratio, compressed, uncompressed)
	}
	same, err := RealisticImage(RealisticImageSpec{Size: size, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	other, err := RealisticImage(RealisticImageSpec{Size: size, Seed: 2})
	if err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	dSame, _ := same.Digest()
	dOther, _ := other.Digest()
	if d != dSame || d == dOther {
		t.Errorf("digests %s (seed 1), %s (seed 1 again), %s (seed 2): want the seed alone to decide", d, dSame, dOther)
	}
}
