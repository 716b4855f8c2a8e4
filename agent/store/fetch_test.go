package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
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

// A corrupt source: every reader gets ErrDigestMismatch without ever having all the bytes, nothing
// is kept, and the next Fetch asks the source again. The source holds back its end until a reader
// has all but the last byte, so a store that released the last byte before the check would have
// handed it out by then.
func TestFetchDigestMismatch(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt int // index of the flipped byte
		size    func(n int) int64
	}{
		{"first byte", 0, func(n int) int64 { return int64(n) }},
		{"last byte", -1, func(n int) int64 { return int64(n) }},
		{"unknown size", -1, func(int) int64 { return -1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := openTestStore(t, "")
			ctx := testContext(t)
			data, d := randomBlob(2, 300<<10)
			bad := bytes.Clone(data)
			i := tc.corrupt
			if i < 0 {
				i += len(bad)
			}
			bad[i] ^= 0xff

			const readers = 5
			var attached sync.WaitGroup
			attached.Add(readers)
			allAttached := make(chan struct{})
			go func() { attached.Wait(); close(allAttached) }()
			nearlyAll := make(chan struct{})
			var nearlyOnce sync.Once
			chunks := split(bad, 100<<10)
			src := &fakeSource{chunks: chunks, size: tc.size(len(bad)),
				gates: map[int]<-chan struct{}{1: allAttached, len(chunks): nearlyAll}}

			var wg sync.WaitGroup
			got := make([]int, readers)
			errs := make([]error, readers)
			for r := range readers {
				wg.Go(func() {
					b, err := ts.Fetch(ctx, d, src.open)
					attached.Done()
					if err != nil {
						errs[r] = err
						return
					}
					defer b.Close()
					buf := make([]byte, len(data)+1) // reads return all that is released
					for errs[r] == nil {
						var n int
						n, errs[r] = b.Read(buf)
						got[r] += n
						if got[r] >= len(data)-1 {
							nearlyOnce.Do(func() { close(nearlyAll) })
						}
					}
					// Reads past the error keep failing.
					if _, err := b.Read(make([]byte, 1)); !errors.Is(err, ErrDigestMismatch) {
						errs[r] = fmt.Errorf("read after the error: %w", err)
					}
				})
			}
			wg.Wait()
			for r := range readers {
				if !errors.Is(errs[r], ErrDigestMismatch) {
					t.Errorf("reader %d: error %v, want ErrDigestMismatch", r, errs[r])
				}
				if got[r] >= len(data) {
					t.Errorf("reader %d received %d bytes: the whole corrupt blob", r, got[r])
				}
			}
			if n := src.calls.Load(); n != 1 {
				t.Errorf("source called %d times, want 1", n)
			}
			ts.assertNothingStored(t)
			if v := ts.metric(t, "shoal_store_fetches_total", "result", "digest_mismatch"); v != 1 {
				t.Errorf("digest_mismatch fetches = %v, want 1", v)
			}

			good := wholeSource(data)
			if b, err := fetchAll(ctx, ts.Store, d, good.open); err != nil || !bytes.Equal(b, data) {
				t.Fatalf("fetch after mismatch: %d bytes, %v", len(b), err)
			}
			if good.calls.Load() != 1 {
				t.Errorf("the fetch after a mismatch did not call the source")
			}
		})
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

// Range-style access to an in-flight blob: ReadAt and Seek, and http.ServeContent on top.
func TestInflightRangeReads(t *testing.T) {
	ts := openTestStore(t, "")
	ctx := testContext(t)
	data, d := randomBlob(7, 512<<10)
	half := len(data) / 2
	gate := make(chan struct{})
	src := &fakeSource{chunks: [][]byte{data[:half], data[half:]}, size: int64(len(data)),
		gates: map[int]<-chan struct{}{1: gate}}

	b, err := ts.Fetch(ctx, d, src.open)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Size() != int64(len(data)) {
		t.Fatalf("Size() = %d, want %d", b.Size(), len(data))
	}

	// Bytes that have arrived are served at once.
	p := make([]byte, 100)
	if n, err := b.ReadAt(p, 1000); err != nil || n != 100 || !bytes.Equal(p, data[1000:1100]) {
		t.Fatalf("ReadAt(100 @ 1000) = %d, %v", n, err)
	}
	if pos, err := b.Seek(-10, io.SeekEnd); err != nil || pos != int64(len(data))-10 {
		t.Fatalf("Seek(-10, end) = %d, %v", pos, err)
	}
	if pos, err := b.Seek(2000, io.SeekStart); err != nil || pos != 2000 {
		t.Fatalf("Seek(2000, start) = %d, %v", pos, err)
	}
	if pos, err := b.Seek(500, io.SeekCurrent); err != nil || pos != 2500 {
		t.Fatalf("Seek(500, current) = %d, %v", pos, err)
	}
	if n, err := io.ReadFull(b, p); err != nil || !bytes.Equal(p[:n], data[2500:2600]) {
		t.Fatalf("Read after Seek = %d, %v", n, err)
	}
	if _, err := b.Seek(-1, io.SeekStart); err == nil {
		t.Error("Seek to a negative position succeeded")
	}

	// Reads beyond what has arrived wait for it.
	type res struct {
		n   int
		err error
		p   []byte
	}
	across, tail := make(chan res, 1), make(chan res, 1)
	go func() {
		p := make([]byte, 2000)
		n, err := b.ReadAt(p, int64(half)-1000)
		across <- res{n, err, p}
	}()
	go func() {
		p := make([]byte, 1000)
		n, err := b.ReadAt(p, int64(len(data))-500)
		tail <- res{n, err, p}
	}()

	// http.ServeContent serves ranges from the in-flight blob.
	served := make(chan *httptest.ResponseRecorder, 1)
	go func() {
		other, err := ts.Fetch(ctx, d, src.open)
		if err != nil {
			served <- nil
			return
		}
		defer other.Close()
		req := httptest.NewRequest(http.MethodGet, "/blob", nil)
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", half-10, half+9))
		rec := httptest.NewRecorder()
		http.ServeContent(rec, req, "", time.Time{}, other)
		served <- rec
	}()

	close(gate)
	r := <-across
	if r.err != nil || r.n != 2000 || !bytes.Equal(r.p, data[half-1000:half+1000]) {
		t.Errorf("ReadAt across the arrived boundary = %d, %v", r.n, r.err)
	}
	r = <-tail
	if !errors.Is(r.err, io.EOF) || r.n != 500 || !bytes.Equal(r.p[:500], data[len(data)-500:]) {
		t.Errorf("ReadAt past the end = %d, %v; want 500, io.EOF", r.n, r.err)
	}
	rec := <-served
	if rec == nil {
		t.Fatal("second Fetch failed")
	}
	if rec.Code != http.StatusPartialContent || !bytes.Equal(rec.Body.Bytes(), data[half-10:half+10]) {
		t.Errorf("ServeContent: status %d, %d bytes", rec.Code, rec.Body.Len())
	}
	if n := src.calls.Load(); n != 1 {
		t.Errorf("source called %d times, want 1", n)
	}
}

func TestFetchUnknownSize(t *testing.T) {
	ts := openTestStore(t, "")
	data, d := randomBlob(8, 100<<10)
	gate := make(chan struct{})
	src := &fakeSource{chunks: split(data, 30<<10), size: -1, gates: map[int]<-chan struct{}{1: gate}}
	b, err := ts.Fetch(testContext(t), d, src.open)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Size() != -1 {
		t.Errorf("Size() in flight = %d, want -1", b.Size())
	}
	if _, err := b.Seek(0, io.SeekEnd); err == nil {
		t.Error("Seek from the end with an unknown size succeeded")
	}
	close(gate)
	got, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadAll: %d bytes, %v", len(got), err)
	}
	if b.Size() != int64(len(data)) {
		t.Errorf("Size() after completion = %d, want %d", b.Size(), len(data))
	}
}

func TestFetchEmptyBlob(t *testing.T) {
	ts := openTestStore(t, "")
	d := mustFetch(t, ts.Store, nil)
	b, err := ts.Get(d)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if got, err := io.ReadAll(b); err != nil || len(got) != 0 || b.Size() != 0 {
		t.Errorf("empty blob: %d bytes, size %d, %v", len(got), b.Size(), err)
	}
}

// Close stops downloads in flight: readers get ErrClosed and nothing is left behind.
func TestCloseStopsDownloads(t *testing.T) {
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
	if _, err := io.ReadAll(b); !errors.Is(err, ErrClosed) {
		t.Errorf("read after Close: %v, want ErrClosed", err)
	}
	ts.assertNothingStored(t)
	if _, err := ts.Fetch(testContext(t), d, src.open); !errors.Is(err, ErrClosed) {
		t.Errorf("Fetch after Close: %v, want ErrClosed", err)
	}
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
