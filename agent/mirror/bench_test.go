package mirror

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/upstream"
)

// benchBlobSize is the blob served by the warm-path benchmark: 1 GiB unless
// SHOAL_BENCH_BLOB_MIB says otherwise (the benchmark script keeps the default).
func benchBlobSize(b *testing.B) int64 {
	if v := os.Getenv("SHOAL_BENCH_BLOB_MIB"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			b.Fatalf("SHOAL_BENCH_BLOB_MIB=%q: want a positive number of MiB", v)
		}
		return n << 20
	}
	return 1 << 30
}

// pseudoRandom is a fast deterministic byte stream, so a 1 GiB blob can be produced twice (once to
// hash it, once to store it) without holding it in memory.
func pseudoRandom(size int64) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{'s', 'h', 'o', 'a', 'l'}), size)
}

// BenchmarkWarmBlob compares serving a complete blob from the store through the mirror over
// loopback HTTP with reading the same file directly. Both read with a 1 MiB buffer; the ratio of
// their throughputs is the figure reported in docs/benchmarks.md (target ≥ 0.9 of the disk's
// read rate).
func BenchmarkWarmBlob(b *testing.B) {
	size := benchBlobSize(b)
	dir := b.TempDir()
	s, err := store.Open(filepath.Join(dir, "store"))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	h := sha256.New()
	if _, err := io.Copy(h, pseudoRandom(size)); err != nil {
		b.Fatal(err)
	}
	d := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}
	blob, err := s.Fetch(context.Background(), d, func(context.Context) (io.ReadCloser, int64, error) {
		return io.NopCloser(pseudoRandom(size)), size, nil
	})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.Copy(io.Discard, blob); err != nil {
		b.Fatal(err)
	}
	_ = blob.Close()
	waitStored(b, s, d, time.Minute) // the store commits (fsync, rename) just after handing out the last byte
	path := filepath.Join(dir, "store", "blobs", "sha256", d.Hex)
	buf := make([]byte, 1<<20)

	// Two baselines: the file in the page cache (what the mirror costs on top of memory copies)
	// and the file evicted from the page cache before every run (the disk's read rate, which is
	// the target's reference: a warm pull reads a blob from the node's disk).
	for _, cache := range []struct {
		name  string
		evict bool
	}{{"cached", false}, {"disk", true}} {
		// prepare runs untimed before each read: it evicts the file when the disk is measured.
		prepare := func(b *testing.B) {
			if cache.evict {
				b.StopTimer()
				evict(b, path)
				b.StartTimer()
			}
		}
		b.Run(cache.name+"/direct", func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				prepare(b)
				f, err := os.Open(path)
				if err != nil {
					b.Fatal(err)
				}
				n, err := readAll(f, buf)
				_ = f.Close()
				if err != nil || n != size {
					b.Fatalf("read %d of %d bytes: %v", n, size, err)
				}
			}
		})
		b.Run(cache.name+"/mirror", func(b *testing.B) {
			server := httptest.NewServer(New(s, upstream.NewMemory(), WithDefaultRegistry(testRegistry)))
			defer server.Close()
			url := server.URL + blobPath(d)
			b.SetBytes(size)
			for b.Loop() {
				prepare(b)
				resp, err := http.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				n, err := readAll(resp.Body, buf)
				_ = resp.Body.Close()
				if err != nil || n != size || resp.StatusCode != http.StatusOK {
					b.Fatalf("GET: status %d, %d of %d bytes: %v", resp.StatusCode, n, size, err)
				}
			}
		})
	}
}

// evict drops a file's pages from the page cache, so the next read comes from the disk.
func evict(b *testing.B, path string) {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		b.Fatal(err)
	}
}

func readAll(r io.Reader, buf []byte) (int64, error) {
	var total int64
	for {
		n, err := r.Read(buf)
		total += int64(n)
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}
