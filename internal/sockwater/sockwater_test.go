package sockwater

import "testing"

// TestNextEndsBodiesWithTheMarkDown walks bodies of several lengths with reads of several sizes
// as a reader would: a read under the raised mark never takes a body's last bytes, so the read
// that ends it (and may hand its connection back to a pool) always runs with the mark at 1.
func TestNextEndsBodiesWithTheMarkDown(t *testing.T) {
	for _, length := range []int64{1, Default, 2 * Default, 2*Default + 1, 1 << 20, 5<<20 + 17} {
		for _, n := range []int{1 << 10, Default, 256 << 10, 4 << 20} {
			raised := false
			for rem := length; rem > 0; {
				mark, limit := Next(rem, n)
				if limit < 1 || limit > n {
					t.Fatalf("length %d, reads of %d: Next(%d) lets a read take %d bytes", length, n, rem, limit)
				}
				if mark > 1 {
					raised = true
					if int64(mark) > rem {
						t.Fatalf("length %d: a mark of %d with %d bytes left", length, mark, rem)
					}
				}
				got := min(int64(limit), rem) // the read takes all it may
				if got == rem && mark != 1 {
					t.Fatalf("length %d, reads of %d: the read that ends the body runs with the mark at %d", length, n, mark)
				}
				rem -= got
			}
			if length > 2*Default && n > 2*Default && !raised {
				t.Errorf("length %d, reads of %d: the mark was never raised", length, n)
			}
		}
	}
}
