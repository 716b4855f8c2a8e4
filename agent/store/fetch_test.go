package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// 50 readers of one missing blob share one source call, and stream: the source delivers its
// second chunk only after every reader has attached and one of them has received bytes.
func TestFetchConcurrentReadersShareOneStreamingDownload(t *testing.T) {
	ts := openTestStore(t, "")
	ctx := testContext(t)
	data, d := randomBlob(1, 512<<10+123)

	const readers = 50
	var attached sync.WaitGroup
	attached.Add(readers)
	allAttached := make(chan struct{})
	go func() { attached.Wait(); close(allAttached) }()
	firstBytes := make(chan struct{})
	var firstOnce sync.Once

	src := &fakeSource{
		chunks: split(data, 32<<10),
		size:   int64(len(data)),
		gates:  map[int]<-chan struct{}{1: closedWhenBoth(allAttached, firstBytes)},
	}

	type result struct {
		got  []byte
		size int64
		err  error
	}
	results := make([]result, readers)
	var done sync.WaitGroup
	for i := range readers {
		done.Go(func() {
			b, err := ts.Fetch(ctx, d, src.open)
			attached.Done()
			if err != nil {
				results[i].err = err
				return
			}
			defer b.Close()
			results[i].size = b.Size()
			var got bytes.Buffer
			buf := make([]byte, 32<<10)
			for {
				n, err := b.Read(buf)
				if n > 0 {
					got.Write(buf[:n])
					firstOnce.Do(func() { close(firstBytes) })
				}
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					results[i].err = err
					break
				}
			}
			results[i].got = got.Bytes()
		})
	}
	done.Wait()

	if n := src.calls.Load(); n != 1 {
		t.Errorf("source called %d times, want 1", n)
	}
	for i, r := range results {
		if errors.Is(r.err, ErrStalled) {
			t.Fatalf("reader %d: %v: no reader received bytes before the source finished", i, r.err)
		}
		if r.err != nil {
			t.Errorf("reader %d: %v", i, r.err)
			continue
		}
		if r.size != int64(len(data)) {
			t.Errorf("reader %d: Size() = %d, want %d", i, r.size, len(data))
		}
		if !bytes.Equal(r.got, data) {
			t.Errorf("reader %d: got %d bytes that differ from the %d-byte blob", i, len(r.got), len(data))
		}
	}
	ts.wg.Wait()
	if size, err := ts.Stat(d); err != nil || size != int64(len(data)) {
		t.Errorf("Stat = %d, %v; want %d, nil", size, err, len(data))
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"shoal_store_fetches_total", []string{"result", "ok"}, 1},
		{"shoal_store_misses_total", nil, readers},
		{"shoal_store_hits_total", nil, 0},
		{"shoal_store_fetch_bytes_total", nil, float64(len(data))},
		{"shoal_store_bytes", nil, float64(len(data))},
		{"shoal_store_blobs", nil, 1},
	} {
		if got := ts.metric(t, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}

	// Complete now: a Fetch is a hit and does not call the source.
	if got, err := fetchAll(ctx, ts.Store, d, src.open); err != nil || !bytes.Equal(got, data) {
		t.Errorf("warm fetch: %d bytes, %v", len(got), err)
	}
	if n := src.calls.Load(); n != 1 {
		t.Errorf("source called %d times after a warm fetch, want 1", n)
	}
	if got := ts.metric(t, "shoal_store_hits_total"); got != 1 {
		t.Errorf("hits = %v, want 1", got)
	}
}

// A corrupt download leaves nothing on disk and is counted; its readers' errors persist. How
// readers see a corrupt blob is the conformance suite's (storetest, TestStoreConformance).
func TestFetchDigestMismatch(t *testing.T) {
	ts := openTestStore(t, "")
	ctx := testContext(t)
	data, d := randomBlob(2, 300<<10)
	bad := bytes.Clone(data)
	bad[len(bad)-1] ^= 0xff
	// The download may fail before Fetch returns (Fetch reports it) or after (the reader does).
	b, err := ts.Fetch(ctx, d, wholeSource(bad).open)
	if err == nil {
		defer b.Close()
		if _, err := io.ReadAll(b); !errors.Is(err, ErrDigestMismatch) {
			t.Fatalf("read: %v, want ErrDigestMismatch", err)
		}
		if _, err := b.Read(make([]byte, 1)); !errors.Is(err, ErrDigestMismatch) {
			t.Errorf("read after the error: %v, want ErrDigestMismatch again", err)
		}
	} else if !errors.Is(err, ErrDigestMismatch) {
		t.Fatalf("Fetch: %v, want ErrDigestMismatch", err)
	}
	ts.assertNothingStored(t)
	if v := ts.metric(t, "shoal_store_fetches_total", "result", "digest_mismatch"); v != 1 {
		t.Errorf("digest_mismatch fetches = %v, want 1", v)
	}
}

// Failing sources: the error reaches the caller or reader, nothing is kept, and a later Fetch
// calls the source again.
func TestFetchFailures(t *testing.T) {
	data, d := randomBlob(3, 200<<10)
	chunks := split(data, 50<<10)
	errBoom := errors.New("boom")

	for _, tc := range []struct {
		name string
		// src builds the source; never is a gate that opens only at the end of the subtest,
		// before the store closes (Close waits for a source call to return).
		src    func(never <-chan struct{}) Source
		want   error
		result string
	}{{
		name:   "short stream",
		src:    func(<-chan struct{}) Source { return (&fakeSource{chunks: chunks[:3], size: int64(len(data))}).open },
		want:   ErrSizeMismatch,
		result: resultSizeMismatch,
	}, {
		name: "long stream",
		src: func(<-chan struct{}) Source {
			return (&fakeSource{chunks: append(chunks[:len(chunks):len(chunks)], []byte("extra")), size: int64(len(data))}).open
		},
		want:   ErrSizeMismatch,
		result: resultSizeMismatch,
	}, {
		name:   "announced size too small",
		src:    func(<-chan struct{}) Source { return (&fakeSource{chunks: chunks, size: int64(len(data)) - 1}).open },
		want:   ErrSizeMismatch,
		result: resultSizeMismatch,
	}, {
		name: "open error",
		src: func(<-chan struct{}) Source {
			return func(context.Context) (io.ReadCloser, int64, error) { return nil, 0, errBoom }
		},
		want:   errBoom,
		result: resultError,
	}, {
		name: "read error mid-way",
		src: func(<-chan struct{}) Source {
			return (&fakeSource{chunks: chunks[:2], size: int64(len(data)), err: errBoom}).open
		},
		want:   errBoom,
		result: resultError,
	}, {
		name: "stall mid-way, source honours ctx",
		src: func(never <-chan struct{}) Source {
			return (&fakeSource{chunks: chunks, size: int64(len(data)), gates: map[int]<-chan struct{}{2: never}}).open
		},
		want:   ErrStalled,
		result: resultStalled,
	}, {
		name: "stall mid-way, source ignores ctx",
		src: func(never <-chan struct{}) Source {
			return (&fakeSource{chunks: chunks, size: -1, ignore: true, gates: map[int]<-chan struct{}{2: never}}).open
		},
		want:   ErrStalled,
		result: resultStalled,
	}, {
		name: "stall before the source answers, source ignores ctx",
		src: func(never <-chan struct{}) Source {
			return func(context.Context) (io.ReadCloser, int64, error) {
				<-never
				return nil, 0, errBoom
			}
		},
		want:   ErrStalled,
		result: resultStalled,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			ts := openTestStore(t, "", WithStallTimeout(50*time.Millisecond))
			never := make(chan struct{})
			t.Cleanup(func() { close(never) }) // runs before the store's Close
			ctx := testContext(t)
			got, err := fetchAll(ctx, ts.Store, d, tc.src(never))
			if !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			if len(got) >= len(data) {
				t.Errorf("received %d bytes, the whole blob's length", len(got))
			}
			ts.assertNothingStored(t)
			if v := ts.metric(t, "shoal_store_fetches_total", "result", tc.result); v != 1 {
				t.Errorf("fetches{result=%s} = %v, want 1", tc.result, v)
			}
			good := wholeSource(data)
			if b, err := fetchAll(ctx, ts.Store, d, good.open); err != nil || !bytes.Equal(b, data) {
				t.Fatalf("fetch after failure: %d bytes, %v", len(b), err)
			}
			if good.calls.Load() != 1 {
				t.Errorf("the fetch after a failure did not call the source")
			}
		})
	}
}

// failingFile fails writes with ENOSPC once its budget is spent, like a full disk.
type failingFile struct {
	*os.File
	budget int
}

func (f *failingFile) Write(p []byte) (int, error) {
	if len(p) > f.budget {
		return 0, syscall.ENOSPC
	}
	f.budget -= len(p)
	return f.File.Write(p)
}

func TestFetchWriteError(t *testing.T) {
	ts := openTestStore(t, "")
	ctx := testContext(t)
	ts.createIngest = func(dir, pattern string) (ingestFile, error) {
		f, err := os.CreateTemp(dir, pattern)
		if err != nil {
			return nil, err
		}
		return &failingFile{File: f, budget: 100 << 10}, nil
	}
	data, d := randomBlob(4, 1<<20)
	src := &fakeSource{chunks: split(data, 32<<10), size: int64(len(data))}
	got, err := fetchAll(ctx, ts.Store, d, src.open)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("error %v, want ENOSPC", err)
	}
	if len(got) > 100<<10 {
		t.Errorf("received %d bytes, more than were written", len(got))
	}
	ts.assertNothingStored(t)
	if v := ts.metric(t, "shoal_store_fetches_total", "result", "write_error"); v != 1 {
		t.Errorf("write_error fetches = %v, want 1", v)
	}

	ts.createIngest = createTempFile // the disk has room again
	if b, err := fetchAll(ctx, ts.Store, d, src.open); err != nil || !bytes.Equal(b, data) {
		t.Fatalf("fetch after write error: %d bytes, %v", len(b), err)
	}
}

// The download is detached from the ctx of the Fetch that started it; a reader's own blocking
// reads end with its ctx.
func TestFetchContexts(t *testing.T) {
	ts := openTestStore(t, "")
	data, d := randomBlob(5, 256<<10)
	gate := make(chan struct{})
	src := &fakeSource{chunks: split(data, 64<<10), size: int64(len(data)), gates: map[int]<-chan struct{}{1: gate}}

	starterCtx, cancelStarter := context.WithCancel(testContext(t))
	starter, err := ts.Fetch(starterCtx, d, src.open)
	if err != nil {
		t.Fatal(err)
	}
	defer starter.Close()

	// The first chunk is there (minus its held-back last byte); the rest is gated.
	head := make([]byte, 1000)
	if _, err := io.ReadFull(starter, head); err != nil || !bytes.Equal(head, data[:1000]) {
		t.Fatalf("read head: %v", err)
	}
	readErr := make(chan error, 1)
	go func() {
		_, err := io.ReadAll(starter)
		readErr <- err
	}()
	cancelStarter()
	select {
	case err := <-readErr:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("blocked read after cancel: %v, want context.Canceled", err)
		}
	case <-time.After(testTimeout):
		t.Fatal("a read blocked on a cancelled ctx did not return")
	}

	// Close unblocks a blocked reader, too.
	other, err := ts.Fetch(testContext(t), d, src.open)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		_, err := other.ReadAt(make([]byte, len(data)), 0)
		readErr <- err
	}()
	other.Close()
	if err := other.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	select {
	case err := <-readErr:
		if err == nil {
			t.Error("ReadAt on a closed blob succeeded")
		}
	case <-time.After(testTimeout):
		t.Fatal("Close did not unblock ReadAt")
	}

	// The starter is gone, yet the download goes on for others.
	close(gate)
	if got, err := fetchAll(testContext(t), ts.Store, d, src.open); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("fetch after the starter left: %d bytes, %v", len(got), err)
	}
	ts.wg.Wait()
	if _, err := ts.Stat(d); err != nil {
		t.Errorf("blob not stored after its starter cancelled: %v", err)
	}
	if n := src.calls.Load(); n != 1 {
		t.Errorf("source called %d times, want 1", n)
	}
}

// Fetch gives up waiting for a slow source when its ctx ends, without failing the download.
func TestFetchCallerCtxWhileSourceOpens(t *testing.T) {
	ts := openTestStore(t, "")
	data, d := randomBlob(6, 1000)
	answer := make(chan struct{})
	calls := 0
	src := func(ctx context.Context) (io.ReadCloser, int64, error) {
		calls++
		<-answer
		return io.NopCloser(bytes.NewReader(data)), int64(len(data)), nil
	}
	ctx, cancel := context.WithCancel(testContext(t))
	cancel()
	if _, err := ts.Fetch(ctx, d, src); !errors.Is(err, context.Canceled) {
		t.Fatalf("Fetch with cancelled ctx: %v", err)
	}
	close(answer)
	ts.wg.Wait()
	if got, err := fetchAll(testContext(t), ts.Store, d, src); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("fetch: %d bytes, %v", len(got), err)
	}
	if calls != 1 {
		t.Errorf("source called %d times, want 1", calls)
	}
}

// Close stops downloads in flight and leaves no temporary file behind (what readers see is the
// conformance suite's).
func TestCloseLeavesNothingBehind(t *testing.T) {
	ts := openTestStore(t, "")
	data, d := randomBlob(9, 100<<10)
	never := make(chan struct{})
	defer close(never)
	src := &fakeSource{chunks: split(data, 10<<10), size: int64(len(data)), gates: map[int]<-chan struct{}{1: never}}
	b, err := ts.Fetch(testContext(t), d, src.open)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}
	ts.assertNothingStored(t)
}

// Small blobs fetched by pairs of goroutines into a store with room for few of them: one of a
// pair starts each download and the other joins it. The download can commit, and the blob be
// evicted again, before the joiner opens the download's file; the joiner must still get the blob
// (fetched again if need be), not an error. ErrFull is the one other outcome allowed: downloads
// that are still committing hold their room.
func TestFetchJoinsADownloadThatCommitsAndIsEvicted(t *testing.T) {
	const size, room, pairs, each = 4 << 10, 6, 4, 150
	ts := openTestStore(t, "", WithMaxBytes(room*size), WithLogger(slog.New(slog.DiscardHandler)))
	// Without fsync a commit is quick, so that few downloads hold room while committing.
	ts.createIngest = func(dir, pattern string) (ingestFile, error) {
		f, err := os.CreateTemp(dir, pattern)
		return noSyncFile{f}, err
	}
	ctx := testContext(t)
	tail, _ := randomBlob(12, size)
	var wg sync.WaitGroup
	var ok, full atomic.Int32
	for w := range 2 * pairs {
		wg.Go(func() {
			for i := range each {
				data := bytes.Clone(tail)
				binary.LittleEndian.PutUint64(data, uint64(w/2*each+i))
				d := digestOf(data)
				got, err := fetchAll(ctx, ts.Store, d, wholeSource(data).open)
				if errors.Is(err, ErrFull) {
					full.Add(1)
					continue
				}
				if err != nil || !bytes.Equal(got, data) {
					t.Errorf("fetch %s: %d bytes, %v", d, len(got), err)
					return
				}
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	t.Logf("%d fetches returned the blob, %d found the store full", ok.Load(), full.Load())
}

// noSyncFile is a temporary file whose Sync does nothing.
type noSyncFile struct{ *os.File }

func (noSyncFile) Sync() error { return nil }

// TestDownloadingUntilComplete: a blob being fetched is Downloading and not yet found by Stat;
// once committed, Stat finds it and it is no longer Downloading. Looked at all along, it is
// always one or the other: a reader that had every byte before the commit never sees it gone.
func TestDownloadingUntilComplete(t *testing.T) {
	ts := openTestStore(t, "")
	ctx := testContext(t)
	data, d := randomBlob(7, 256<<10)
	gate := make(chan struct{})
	src := &fakeSource{chunks: split(data, 64<<10), size: int64(len(data)), gates: map[int]<-chan struct{}{1: gate}}
	b, err := ts.Fetch(ctx, d, src.open)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := ts.Stat(d); err == nil || !ts.Downloading(d) {
		t.Fatalf("during the download: Stat error %v, Downloading %v; want not found and true", err, ts.Downloading(d))
	}
	stop := make(chan struct{})
	neither := make(chan struct{}, 1)
	var watching sync.WaitGroup
	watching.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := ts.Stat(d); err != nil && !ts.Downloading(d) {
				if _, err := ts.Stat(d); err != nil { // not committed in between the two looks
					neither <- struct{}{}
					return
				}
			}
		}
	})
	close(gate)
	if _, err := io.Copy(io.Discard, b); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, err := ts.Stat(d); err != nil; _, err = ts.Stat(d) {
		if time.Now().After(deadline) {
			t.Fatalf("not complete 10 s after its last byte was read: %v", err)
		}
		time.Sleep(time.Millisecond)
	}
	close(stop)
	watching.Wait()
	select {
	case <-neither:
		t.Error("the blob was neither downloading nor complete for a moment")
	default:
	}
	if ts.Downloading(d) {
		t.Error("a complete blob is still Downloading")
	}
}
