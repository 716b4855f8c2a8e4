package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
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

// Warm set and churn of the parallel benchmarks: warmBlobs small blobs, pinned, that the Gets
// open; churnBlobs larger ones that a background goroutine fetches in turn into a store with
// room for only churnRoom of them, so that every fetch creates a temporary file, evicts (unlinks)
// a blob and commits (renames) one.
const (
	warmBlobs, warmSize   = 256, 4 << 10
	churnBlobs, churnSize = 64, 256 << 10
	churnRoom             = 8
)

// BenchmarkGetParallel opens and closes warm blobs with Get from 4×GOMAXPROCS goroutines, the
// store's warm path, while a background goroutine does what competes with it for the store's
// lock: nothing (idle), fetching and evicting blobs (churn), or pinning and unpinning (pins).
// ns/op is per Get.
func BenchmarkGetParallel(b *testing.B) {
	// Set up once: sub-benchmarks run their function once per round.
	ts := openTestStore(b, "", WithLogger(slog.New(slog.DiscardHandler)),
		WithMaxBytes(warmBlobs*warmSize+churnRoom*churnSize))
	warm := make([]v1.Hash, warmBlobs)
	for i := range warm {
		data, d := randomBlob(uint64(1000+i), warmSize)
		if _, err := fetchAll(b.Context(), ts.Store, d, wholeSource(data).open); err != nil {
			b.Fatal(err)
		}
		if err := ts.Pin(d, "bench"); err != nil {
			b.Fatal(err)
		}
		warm[i] = d
	}
	churn := make([]churnBlob, churnBlobs)
	for i := range churn {
		churn[i].data, churn[i].d = randomBlob(uint64(2000+i), churnSize)
	}
	ts.wg.Wait()

	for _, bg := range []struct {
		name string
		loop func(ctx context.Context, s *Store, churn []churnBlob) error
	}{
		{"idle", nil},
		{"churn", churnLoop},
		{"pins", pinLoop},
	} {
		b.Run(bg.name, func(b *testing.B) {
			ctx, cancel := context.WithCancel(b.Context())
			bgErr := make(chan error, 1)
			if bg.loop != nil {
				go func() { bgErr <- bg.loop(ctx, ts.Store, churn) }()
			} else {
				close(bgErr)
			}
			b.SetParallelism(4)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				i := rand.IntN(len(warm))
				for pb.Next() {
					blob, err := ts.Get(warm[i%len(warm)])
					if err != nil {
						b.Error(err)
						return
					}
					blob.Close()
					i++
				}
			})
			b.StopTimer()
			cancel()
			if err := <-bgErr; err != nil {
				b.Fatal(err)
			}
		})
	}
	ts.wg.Wait()
}

type churnBlob struct {
	data []byte
	d    v1.Hash
}

// churnLoop fetches the churn blobs in turn, each a miss that evicts an older one, until ctx ends.
func churnLoop(ctx context.Context, s *Store, churn []churnBlob) error {
	for i := 0; ctx.Err() == nil; i++ {
		c := churn[i%len(churn)]
		if _, err := fetchAll(ctx, s, c.d, wholeSource(c.data).open); err != nil && ctx.Err() == nil {
			return err
		}
		s.wg.Wait() // committed: one download at a time, so the room always suffices
	}
	return nil
}

// pinLoop pins and unpins a blob until ctx ends; each call rewrites pins.json.
func pinLoop(ctx context.Context, s *Store, churn []churnBlob) error {
	for ctx.Err() == nil {
		if err := s.Pin(churn[0].d, "bench-loop"); err != nil {
			return err
		}
		if err := s.Unpin(churn[0].d, "bench-loop"); err != nil {
			return err
		}
	}
	return nil
}

// BenchmarkFetchParallel fetches distinct blobs from 4×GOMAXPROCS goroutines into a store with
// room for 64 of them, reading each to the end: every op is a miss that creates a temporary
// file, hashes, commits and evicts. ns/op is per fetched 16 KiB blob.
func BenchmarkFetchParallel(b *testing.B) {
	const size = 16 << 10
	ts := openTestStore(b, "", WithLogger(slog.New(slog.DiscardHandler)), WithMaxBytes(64*size))
	tail, _ := randomBlob(3000, size)
	var next atomic.Uint64
	b.SetParallelism(4)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			// A distinct blob per op: a counter in the first 8 bytes of a shared random tail.
			data := bytes.Clone(tail)
			binary.LittleEndian.PutUint64(data, next.Add(1))
			d := digestOf(data)
			got, err := fetchAll(b.Context(), ts.Store, d, wholeSource(data).open)
			if err != nil || len(got) != size {
				b.Errorf("fetch %s: %d bytes, %v", d, len(got), err)
				return
			}
		}
	})
	b.StopTimer()
	ts.wg.Wait()
}
