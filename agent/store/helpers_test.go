package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
)

// testTimeout only keeps a broken test from hanging; nothing asserts on durations.
const testTimeout = 30 * time.Second

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

type testStore struct {
	*Store
	dir string
	reg *prometheus.Registry
}

func openTestStore(t testing.TB, dir string, opts ...Option) *testStore {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	reg := prometheus.NewPedanticRegistry()
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	s, err := Open(dir, append([]Option{WithRegisterer(reg), WithLogger(logger)}, opts...)...)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return &testStore{Store: s, dir: dir, reg: reg}
}

// metric returns the value of a counter or gauge with the given label pairs.
func (ts *testStore) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := ts.reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, l := range m.GetLabel() {
					found = found || (l.GetName() == labels[i] && l.GetValue() == labels[i+1])
				}
				if !found {
					continue metrics
				}
			}
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("metric %s%v not found", name, labels)
	return 0
}

// assertEmptyDirs fails unless nothing is stored and no download leftovers exist.
func (ts *testStore) assertNothingStored(t *testing.T) {
	t.Helper()
	for _, sub := range []string{blobsSubdir, ingestSubdir} {
		entries, err := os.ReadDir(filepath.Join(ts.dir, sub))
		if err != nil {
			t.Fatal(err)
		}
		if len(entries) > 0 {
			t.Errorf("%s holds %d entries, want none (first: %s)", sub, len(entries), entries[0].Name())
		}
	}
	if b, n := ts.Usage(); b != 0 || n != 0 {
		t.Errorf("Usage() = %d bytes, %d blobs; want 0, 0", b, n)
	}
}

func randomBlob(seed uint64, n int) ([]byte, v1.Hash) {
	data := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	_, _ = r.Read(data) // never fails
	return data, digestOf(data)
}

func digestOf(data []byte) v1.Hash {
	sum := sha256.Sum256(data)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
}

func split(data []byte, size int) [][]byte {
	var out [][]byte
	for len(data) > size {
		out = append(out, data[:size])
		data = data[size:]
	}
	return append(out, data)
}

// scriptedReader delivers chunks in order. Before chunk i it waits for gates[i], if any, and
// before the end for gates[len(chunks)]; with ignoreCtx it waits only for the gate or Close, like
// a source that does not honour ctx. After the chunks it returns err, or io.EOF.
type scriptedReader struct {
	ctx       context.Context
	chunks    [][]byte
	gates     map[int]<-chan struct{}
	ignoreCtx bool
	err       error

	next      int
	passed    int // gates up to this index have been passed
	rest      []byte
	closed    chan struct{}
	closeOnce sync.Once
}

func (r *scriptedReader) Read(p []byte) (int, error) {
	if len(r.rest) == 0 {
		if gate := r.gates[r.next]; gate != nil && r.passed < r.next+1 {
			ctxDone := r.ctx.Done()
			if r.ignoreCtx {
				ctxDone = nil
			}
			select {
			case <-gate:
				r.passed = r.next + 1
			case <-ctxDone:
				return 0, r.ctx.Err()
			case <-r.closed:
				return 0, errors.New("read on closed source")
			}
		}
		if r.next == len(r.chunks) {
			if r.err != nil {
				return 0, r.err
			}
			return 0, io.EOF
		}
		r.rest = r.chunks[r.next]
		r.next++
	}
	n := copy(p, r.rest)
	r.rest = r.rest[n:]
	return n, nil
}

func (r *scriptedReader) Close() error {
	r.closeOnce.Do(func() { close(r.closed) })
	return nil
}

// fakeSource counts calls and builds a scriptedReader per call.
type fakeSource struct {
	calls  atomic.Int32
	chunks [][]byte
	size   int64
	gates  map[int]<-chan struct{}
	ignore bool
	err    error // returned after the chunks
}

func (f *fakeSource) open(ctx context.Context) (io.ReadCloser, int64, error) {
	f.calls.Add(1)
	return &scriptedReader{ctx: ctx, chunks: f.chunks, gates: f.gates, ignoreCtx: f.ignore, err: f.err,
		closed: make(chan struct{})}, f.size, nil
}

// wholeSource serves data in one go with a known size.
func wholeSource(data []byte) *fakeSource {
	return &fakeSource{chunks: [][]byte{data}, size: int64(len(data))}
}

// fetchAll fetches d and reads it to the end, returning the bytes read and the first error.
func fetchAll(ctx context.Context, s *Store, d v1.Hash, src Source) ([]byte, error) {
	b, err := s.Fetch(ctx, d, src)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	var buf bytes.Buffer
	_, err = io.Copy(&buf, b)
	return buf.Bytes(), err
}

func mustFetch(t *testing.T, s *Store, data []byte) v1.Hash {
	t.Helper()
	d := digestOf(data)
	got, err := fetchAll(testContext(t), s, d, wholeSource(data).open)
	if err != nil {
		t.Fatalf("fetch %s: %v", d, err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("fetch %s: got %d bytes, want the %d stored", d, len(got), len(data))
	}
	s.wg.Wait() // committed
	return d
}

type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// closedWhenBoth returns a channel closed once a and b are both closed.
func closedWhenBoth(a, b <-chan struct{}) <-chan struct{} {
	c := make(chan struct{})
	go func() {
		<-a
		<-b
		close(c)
	}()
	return c
}
