package store

import (
	"io"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkGetWarm reads a complete 64 MiB blob through Get, against reading the same file
// directly; both copy into one reused 1 MiB buffer, so the difference is the store's overhead.
func BenchmarkGetWarm(b *testing.B) {
	ts := openTestStore(b, "")
	data, _ := randomBlob(60, 64<<20)
	d := digestOf(data)
	if _, err := fetchAll(b.Context(), ts.Store, d, wholeSource(data).open); err != nil {
		b.Fatal(err)
	}
	ts.wg.Wait()
	path := filepath.Join(ts.dir, blobsSubdir, d.Hex)
	buf := make([]byte, 1<<20)
	drain := func(r io.Reader) {
		n, err := io.CopyBuffer(io.Discard, onlyReader{r}, buf)
		if err != nil || n != int64(len(data)) {
			b.Fatalf("read %d bytes, %v", n, err)
		}
	}

	b.Run("store", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			blob, err := ts.Get(d)
			if err != nil {
				b.Fatal(err)
			}
			drain(blob)
			blob.Close()
		}
	})
	b.Run("file", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			f, err := os.Open(path)
			if err != nil {
				b.Fatal(err)
			}
			drain(f)
			f.Close()
		}
	})
}

// onlyReader hides WriterTo/ReaderFrom so both sides copy the same way.
type onlyReader struct{ io.Reader }
