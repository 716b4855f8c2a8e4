package upstream

import (
	"fmt"
	"testing"
)

// FuzzParseContentRange checks the parser of a registry's Content-Range header, which the
// agent trusts to place bytes in a blob: whatever it accepts is a well-formed range inside the
// size, and formats back to the same values.
func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{
		"bytes 0-99/100", "bytes 5-5/*", "bytes 0-0/1", "bytes 10-9/100", "bytes -1-5/10",
		"bytes 0-99/99", "bytes 0-9223372036854775807/*", "bytes  0-1/2", "bytes 0-1/+2", "items 0-1/2",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		start, end, size, err := parseContentRange(s)
		if err != nil {
			return
		}
		if start < 0 || end < start || (size != -1 && size <= end) {
			t.Fatalf("parseContentRange(%q) = %d-%d/%d: not a range inside the size", s, start, end, size)
		}
		total := "*"
		if size >= 0 {
			total = fmt.Sprint(size)
		}
		again := fmt.Sprintf("bytes %d-%d/%s", start, end, total)
		s2, e2, z2, err := parseContentRange(again)
		if err != nil || s2 != start || e2 != end || z2 != size {
			t.Fatalf("%q parsed as %q, which parses as %d-%d/%d, %v", s, again, s2, e2, z2, err)
		}
	})
}
