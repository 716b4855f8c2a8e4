package store

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkGetWarm reads a complete 64 MiB blob through Get and, in the same iteration, the same
// file directly; both copy into one reused 1 MiB buffer, so the difference is the store's overhead.
// Alternating keeps a noisy machine from favouring one side. It reports both rates and their
// ratio (store/file, 1.0 = no overhead).
func BenchmarkGetWarm(b *testing.B) {
	ts := openTestStore(b, "", WithLogger(slog.New(slog.DiscardHandler)))
	data, d := randomBlob(60, 64<<20)
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

	var inStore, direct time.Duration
	for b.Loop() {
		start := time.Now()
		blob, err := ts.Get(d)
		if err != nil {
			b.Fatal(err)
		}
		drain(blob)
		blob.Close()
		inStore += time.Since(start)

		start = time.Now()
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		drain(f)
		f.Close()
		direct += time.Since(start)
	}
	mbps := func(d time.Duration) float64 { return float64(b.N) * float64(len(data)) / 1e6 / d.Seconds() }
	b.ReportMetric(mbps(inStore), "store-MB/s")
	b.ReportMetric(mbps(direct), "file-MB/s")
	b.ReportMetric(direct.Seconds()/inStore.Seconds(), "store/file")
}

// onlyReader hides WriterTo/ReaderFrom so both sides copy the same way.
type onlyReader struct{ io.Reader }
