// Package storetest is the conformance suite of the content store: the contract of Get, Fetch and
// Close that the mirror and the swarm rely on. store.Store passes it, and so does store.Memory,
// the in-memory store other packages' tests use in its place.
package storetest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/store"
)

// Store is the part of the content store the suite checks.
type Store interface {
	Get(d v1.Hash) (store.Blob, error)
	Fetch(ctx context.Context, d v1.Hash, src store.Source) (store.Blob, error)
	Close() error
}

// Run runs the suite, one subtest per rule of the contract, each on a store of its own: open
// returns a new, empty store and closes it when the subtest ends (t.Cleanup); the suite may close
// it before.
func Run(t *testing.T, open func(t *testing.T) Store) {
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { c.run(t, open(t)) })
	}
}

var cases = []struct {
	name string
	run  func(t *testing.T, s Store)
}{
	{"GetMissing", getMissing},
	{"InvalidDigests", invalidDigests},
	{"FetchThenGet", fetchThenGet},
	{"EmptyBlob", emptyBlob},
	{"UnknownSize", unknownSize},
	{"CorruptFirstByte", func(t *testing.T, s Store) { corrupt(t, s, 0, false) }},
	{"CorruptLastByte", func(t *testing.T, s Store) { corrupt(t, s, -1, false) }},
	{"CorruptUnknownSize", func(t *testing.T, s Store) { corrupt(t, s, -1, true) }},
	{"ShortSource", shortSource},
	{"LongSource", longSource},
	{"SourceFailsToOpen", sourceFailsToOpen},
	{"SourceFailsMidway", sourceFailsMidway},
	{"ConcurrentFetchesShareOneDownload", concurrentFetches},
	{"ReadersStreamAnInflightBlob", streaming},
	{"RangesOfACompleteBlob", rangesComplete},
	{"RangesOfAnInflightBlob", rangesInflight},
	{"FetchContextBoundsOnlyItsCaller", fetchContext},
	{"CloseStopsDownloads", closeStops},
}

// timeout only keeps a broken store from hanging the suite; nothing asserts on durations.
const timeout = 30 * time.Second

func context30s(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	t.Cleanup(cancel)
	return ctx
}

func getMissing(t *testing.T, s Store) {
	_, d := blob(1, 100)
	if _, err := s.Get(d); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Get of a missing blob: %v, want ErrNotFound", err)
	}
}

func invalidDigests(t *testing.T, s Store) {
	ctx := context30s(t)
	_, good := blob(2, 10)
	for _, d := range []v1.Hash{
		{},
		{Algorithm: "sha512", Hex: strings.Repeat("ab", 64)},
		{Algorithm: "sha256", Hex: strings.ToUpper(good.Hex)},
		{Algorithm: "sha256", Hex: "../../etc/passwd"},
		{Algorithm: "sha256", Hex: good.Hex[:63]},
	} {
		src := whole([]byte("x"))
		if _, err := s.Get(d); !errors.Is(err, store.ErrInvalidDigest) {
			t.Errorf("Get(%q): %v, want ErrInvalidDigest", d, err)
		}
		if _, err := s.Fetch(ctx, d, src.open); !errors.Is(err, store.ErrInvalidDigest) {
			t.Errorf("Fetch(%q): %v, want ErrInvalidDigest", d, err)
		}
		if n := src.calls.Load(); n != 0 {
			t.Errorf("Fetch(%q) called the source %d times", d, n)
		}
	}
}

// fetchThenGet: a fetched blob reads whole, becomes complete, and a later Fetch or Get serves it
// without calling a source.
func fetchThenGet(t *testing.T, s Store) {
	ctx := context30s(t)
	data, d := blob(3, 300<<10)
	src := &source{chunks: split(data, 64<<10), size: int64(len(data))}
	if got, err := fetchAll(ctx, s, d, src.open); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("fetch: %d bytes, %v", len(got), err)
	}
	waitComplete(t, s, d, data)
	again := whole([]byte("not this"))
	if got, err := fetchAll(ctx, s, d, again.open); err != nil || !bytes.Equal(got, data) {
		t.Errorf("fetch of a complete blob: %d bytes, %v", len(got), err)
	}
	if n := src.calls.Load() + again.calls.Load(); n != 1 {
		t.Errorf("sources called %d times, want 1", n)
	}
}

func emptyBlob(t *testing.T, s Store) {
	ctx := context30s(t)
	d := digest(nil)
	if got, err := fetchAll(ctx, s, d, whole(nil).open); err != nil || len(got) != 0 {
		t.Fatalf("fetch of the empty blob: %d bytes, %v", len(got), err)
	}
	waitComplete(t, s, d, nil)
}

// unknownSize: a source that gives no length; Size is -1 until the blob is complete.
func unknownSize(t *testing.T, s Store) {
	ctx := context30s(t)
	data, d := blob(4, 100<<10)
	gate := make(chan struct{})
	src := &source{chunks: split(data, 30<<10), size: -1, gates: map[int]<-chan struct{}{1: gate}}
	b, err := s.Fetch(ctx, d, src.open)
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	defer b.Close()
	if b.Size() != -1 {
		t.Errorf("Size() in flight = %d, want -1", b.Size())
	}
	if _, err := b.Seek(0, io.SeekEnd); err == nil {
		t.Error("Seek from the end with an unknown size succeeded")
	}
	close(gate)
	if got, err := io.ReadAll(b); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read: %d bytes, %v", len(got), err)
	}
	if b.Size() != int64(len(data)) {
		t.Errorf("Size() once complete = %d, want %d", b.Size(), len(data))
	}
	waitComplete(t, s, d, data)
}

// corrupt: a source whose bytes do not match the digest. Every reader gets ErrDigestMismatch
// without ever having all the bytes: the source holds its end back until a reader has all but
// the last byte, so a store that released the last byte before checking would have handed it
// out by then. Nothing is kept, and the next Fetch asks a source again.
func corrupt(t *testing.T, s Store, flip int, unknownSize bool) {
	ctx := context30s(t)
	data, d := blob(5, 300<<10)
	bad := bytes.Clone(data)
	if flip < 0 {
		flip += len(bad)
	}
	bad[flip] ^= 0xff
	size := int64(len(bad))
	if unknownSize {
		size = -1
	}

	const readers = 5
	var attached sync.WaitGroup
	attached.Add(readers)
	allAttached := make(chan struct{})
	go func() { attached.Wait(); close(allAttached) }()
	nearlyAll := make(chan struct{})
	var nearlyOnce sync.Once
	chunks := split(bad, 100<<10)
	src := &source{chunks: chunks, size: size,
		gates: map[int]<-chan struct{}{1: allAttached, len(chunks): nearlyAll}}

	var wg sync.WaitGroup
	got := make([]int, readers)
	errs := make([]error, readers)
	for r := range readers {
		wg.Go(func() {
			b, err := s.Fetch(ctx, d, src.open)
			attached.Done()
			if err != nil {
				errs[r] = err
				return
			}
			defer b.Close()
			buf := make([]byte, 64<<10)
			for errs[r] == nil {
				var n int
				n, errs[r] = b.Read(buf)
				got[r] += n
				if got[r] >= len(data)-1 {
					nearlyOnce.Do(func() { close(nearlyAll) })
				}
			}
		})
	}
	wg.Wait()
	for r := range readers {
		if !errors.Is(errs[r], store.ErrDigestMismatch) {
			t.Errorf("reader %d: %v, want ErrDigestMismatch", r, errs[r])
		}
		if got[r] >= len(data) {
			t.Errorf("reader %d received all %d bytes of a corrupt blob", r, got[r])
		}
	}
	if n := src.calls.Load(); n != 1 {
		t.Errorf("source called %d times, want 1", n)
	}
	refetches(t, s, d, data)
}

func shortSource(t *testing.T, s Store) {
	data, d := blob(6, 200<<10)
	chunks := split(data, 50<<10)
	failsThenRefetches(t, s, d, data, &source{chunks: chunks[:3], size: int64(len(data))}, store.ErrSizeMismatch)
}

func longSource(t *testing.T, s Store) {
	data, d := blob(7, 200<<10)
	chunks := append(split(data, 50<<10), []byte("extra"))
	failsThenRefetches(t, s, d, data, &source{chunks: chunks, size: int64(len(data))}, store.ErrSizeMismatch)
}

func sourceFailsMidway(t *testing.T, s Store) {
	data, d := blob(8, 200<<10)
	errBoom := errors.New("boom")
	chunks := split(data, 50<<10)
	failsThenRefetches(t, s, d, data, &source{chunks: chunks[:2], size: int64(len(data)), err: errBoom}, errBoom)
}

func sourceFailsToOpen(t *testing.T, s Store) {
	ctx := context30s(t)
	data, d := blob(9, 1000)
	errBoom := errors.New("boom")
	src := func(context.Context) (io.ReadCloser, int64, error) { return nil, 0, errBoom }
	if _, err := s.Fetch(ctx, d, src); !errors.Is(err, errBoom) {
		t.Errorf("fetch from a source that fails: %v, want its error", err)
	}
	refetches(t, s, d, data)
}

// failsThenRefetches fetches d from a failing src: the reader gets want before the whole blob,
// nothing is kept, and the next Fetch asks a source again.
func failsThenRefetches(t *testing.T, s Store, d v1.Hash, data []byte, src *source, want error) {
	t.Helper()
	ctx := context30s(t)
	got, err := fetchAll(ctx, s, d, src.open)
	if !errors.Is(err, want) {
		t.Errorf("fetch: %v, want %v", err, want)
	}
	if len(got) >= len(data) {
		t.Errorf("received %d bytes of a failed download, the whole blob's length", len(got))
	}
	refetches(t, s, d, data)
}

// refetches checks that after a failed download d is not complete and a Fetch calls its source.
func refetches(t *testing.T, s Store, d v1.Hash, data []byte) {
	t.Helper()
	if _, err := s.Get(d); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Get after a failed download: %v, want ErrNotFound", err)
	}
	good := whole(data)
	if got, err := fetchAll(context30s(t), s, d, good.open); err != nil || !bytes.Equal(got, data) {
		t.Errorf("fetch after a failed download: %d bytes, %v", len(got), err)
	}
	if good.calls.Load() != 1 {
		t.Error("the fetch after a failed download did not call its source")
	}
}

// concurrentFetches: readers of one missing blob share one source call; the source delivers its
// second chunk only once every Fetch has returned.
func concurrentFetches(t *testing.T, s Store) {
	ctx := context30s(t)
	data, d := blob(10, 300<<10+17)
	const readers = 20
	var attached sync.WaitGroup
	attached.Add(readers)
	allAttached := make(chan struct{})
	go func() { attached.Wait(); close(allAttached) }()
	src := &source{chunks: split(data, 32<<10), size: int64(len(data)),
		gates: map[int]<-chan struct{}{1: allAttached}}

	var wg sync.WaitGroup
	for r := range readers {
		wg.Go(func() {
			b, err := s.Fetch(ctx, d, src.open)
			attached.Done()
			if err != nil {
				t.Errorf("reader %d: fetch: %v", r, err)
				return
			}
			defer b.Close()
			if got, err := io.ReadAll(b); err != nil || !bytes.Equal(got, data) {
				t.Errorf("reader %d: %d bytes, %v", r, len(got), err)
			}
		})
	}
	wg.Wait()
	if n := src.calls.Load(); n != 1 {
		t.Errorf("source called %d times for %d concurrent fetches, want 1", n, readers)
	}
	waitComplete(t, s, d, data)
}

// streaming: Fetch returns once the source has answered, with the size known; a reader gets the
// bytes that have arrived, all but the last, while the source still holds back the rest, and a
// ReadAt beyond them waits for them.
func streaming(t *testing.T, s Store) {
	ctx := context30s(t)
	data, d := blob(11, 512<<10)
	half := len(data) / 2
	gate := make(chan struct{})
	src := &source{chunks: [][]byte{data[:half], data[half:]}, size: int64(len(data)),
		gates: map[int]<-chan struct{}{1: gate}}
	b, err := s.Fetch(ctx, d, src.open)
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	defer b.Close()
	if b.Size() != int64(len(data)) {
		t.Errorf("Size() in flight = %d, want %d", b.Size(), len(data))
	}
	head := make([]byte, half-1)
	if _, err := io.ReadFull(b, head); err != nil {
		t.Fatalf("read the bytes that have arrived: %v (not streamed?)", err)
	}
	if !bytes.Equal(head, data[:half-1]) {
		t.Fatal("the bytes read in flight differ from the blob's")
	}
	type result struct {
		n   int
		err error
		p   []byte
	}
	across := make(chan result, 1)
	go func() {
		p := make([]byte, 2000)
		n, err := b.ReadAt(p, int64(half)-1000)
		across <- result{n, err, p}
	}()
	close(gate)
	r := <-across
	if r.err != nil || r.n != 2000 || !bytes.Equal(r.p, data[half-1000:half+1000]) {
		t.Errorf("ReadAt across the bytes that had arrived = %d, %v", r.n, r.err)
	}
	rest, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(rest, data[half-1:]) {
		t.Errorf("read the rest: %d bytes, %v", len(rest), err)
	}
}

func rangesComplete(t *testing.T, s Store) {
	ctx := context30s(t)
	data, d := blob(12, 64<<10)
	if _, err := fetchAll(ctx, s, d, whole(data).open); err != nil {
		t.Fatalf("fetch: %v", err)
	}
	waitComplete(t, s, d, data)
	b, err := s.Get(d)
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	checkRanges(t, b, data)
}

// rangesInflight checks a blob opened while in flight; its download completes meanwhile.
func rangesInflight(t *testing.T, s Store) {
	ctx := context30s(t)
	data, d := blob(13, 64<<10)
	gate := make(chan struct{})
	src := &source{chunks: [][]byte{data}, size: int64(len(data)), gates: map[int]<-chan struct{}{0: gate}}
	b, err := s.Fetch(ctx, d, src.open)
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	close(gate)
	checkRanges(t, b, data)
}

// checkRanges checks the io.ReaderAt and io.Seeker semantics of b, which holds data, and that
// http.ServeContent answers a Range request from it. It closes b.
func checkRanges(t *testing.T, b store.Blob, data []byte) {
	t.Helper()
	size := int64(len(data))
	if b.Size() != size {
		t.Errorf("Size() = %d, want %d", b.Size(), size)
	}
	p := make([]byte, 1000)
	for _, c := range []struct {
		off, n  int64
		want    int64
		wantEOF bool
	}{
		{off: 1000, n: 100, want: 100},
		{off: 0, n: 1000, want: 1000},
		{off: size - 500, n: 1000, want: 500, wantEOF: true},
		{off: size, n: 10, want: 0, wantEOF: true},
	} {
		n, err := b.ReadAt(p[:c.n], c.off)
		if int64(n) != c.want || (c.wantEOF && !errors.Is(err, io.EOF)) || (!c.wantEOF && err != nil) ||
			!bytes.Equal(p[:n], data[c.off:c.off+int64(n)]) {
			t.Errorf("ReadAt(%d bytes at %d) = %d, %v; want %d bytes of the blob (EOF %v)", c.n, c.off, n, err, c.want, c.wantEOF)
		}
	}
	if _, err := b.ReadAt(p[:1], -1); err == nil {
		t.Error("ReadAt at a negative offset succeeded")
	}
	for _, c := range []struct {
		off    int64
		whence int
		want   int64
	}{
		{-10, io.SeekEnd, size - 10},
		{2000, io.SeekStart, 2000},
		{500, io.SeekCurrent, 2500},
	} {
		if pos, err := b.Seek(c.off, c.whence); err != nil || pos != c.want {
			t.Errorf("Seek(%d, %d) = %d, %v; want %d", c.off, c.whence, pos, err, c.want)
		}
	}
	if _, err := io.ReadFull(b, p[:100]); err != nil || !bytes.Equal(p[:100], data[2500:2600]) {
		t.Errorf("Read after Seek: %v (equal %v)", err, bytes.Equal(p[:100], data[2500:2600]))
	}
	if _, err := b.Seek(-1, io.SeekStart); err == nil {
		t.Error("Seek to a negative position succeeded")
	}

	req := httptest.NewRequest(http.MethodGet, "/blob", nil)
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", size/2-10, size/2+9))
	rec := httptest.NewRecorder()
	http.ServeContent(rec, req, "", time.Time{}, b)
	if rec.Code != http.StatusPartialContent || !bytes.Equal(rec.Body.Bytes(), data[size/2-10:size/2+10]) {
		t.Errorf("ServeContent of a Range: status %d, %d bytes", rec.Code, rec.Body.Len())
	}

	if err := b.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if _, err := b.ReadAt(p[:1], 0); err == nil {
		t.Error("ReadAt after Close succeeded")
	}
}

// fetchContext: the download is detached from the ctx of the Fetch that started it; that ctx ends
// only its caller's blocking reads.
func fetchContext(t *testing.T, s Store) {
	data, d := blob(14, 256<<10)
	gate := make(chan struct{})
	src := &source{chunks: split(data, 64<<10), size: int64(len(data)), gates: map[int]<-chan struct{}{1: gate}}
	starterCtx, cancel := context.WithCancel(context30s(t))
	starter, err := s.Fetch(starterCtx, d, src.open)
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	defer starter.Close()
	if _, err := io.ReadFull(starter, make([]byte, 1000)); err != nil {
		t.Fatalf("read the first bytes: %v", err)
	}
	blocked := make(chan error, 1)
	go func() {
		_, err := io.ReadAll(starter)
		blocked <- err
	}()
	cancel()
	if err := <-blocked; !errors.Is(err, context.Canceled) {
		t.Errorf("a read blocked when its Fetch's ctx was cancelled: %v, want context.Canceled", err)
	}
	close(gate)
	if got, err := fetchAll(context30s(t), s, d, src.open); err != nil || !bytes.Equal(got, data) {
		t.Errorf("fetch after the starter left: %d bytes, %v", len(got), err)
	}
	if n := src.calls.Load(); n != 1 {
		t.Errorf("source called %d times, want 1", n)
	}
	waitComplete(t, s, d, data)
}

// closeStops: Close ends the downloads in flight, whose readers get ErrClosed, and a Fetch after
// it fails with ErrClosed.
func closeStops(t *testing.T, s Store) {
	ctx := context30s(t)
	data, d := blob(15, 100<<10)
	never := make(chan struct{})
	defer close(never)
	src := &source{chunks: split(data, 10<<10), size: int64(len(data)), gates: map[int]<-chan struct{}{1: never}}
	b, err := s.Fetch(ctx, d, src.open)
	if err != nil {
		t.Fatalf("fetch: %v", err)
	}
	defer b.Close()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := io.ReadAll(b); !errors.Is(err, store.ErrClosed) {
		t.Errorf("read after Close: %v, want ErrClosed", err)
	}
	if _, err := s.Fetch(ctx, d, src.open); !errors.Is(err, store.ErrClosed) {
		t.Errorf("Fetch after Close: %v, want ErrClosed", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// waitComplete waits until Get serves d (a store may commit a download after its readers have
// the last byte) and checks its bytes.
func waitComplete(t *testing.T, s Store, d v1.Hash, data []byte) {
	t.Helper()
	ctx := context30s(t)
	for {
		b, err := s.Get(d)
		if err == nil {
			got, err := io.ReadAll(b)
			b.Close()
			if err != nil || !bytes.Equal(got, data) || b.Size() != int64(len(data)) {
				t.Errorf("Get: %d bytes, size %d, %v; want the %d-byte blob", len(got), b.Size(), err, len(data))
			}
			return
		}
		if !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("Get: %v", err)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the fetched blob never became complete: %v", err)
		case <-time.After(time.Millisecond):
		}
	}
}

func fetchAll(ctx context.Context, s Store, d v1.Hash, src store.Source) ([]byte, error) {
	b, err := s.Fetch(ctx, d, src)
	if err != nil {
		return nil, err
	}
	defer b.Close()
	return io.ReadAll(b)
}

func blob(seed uint64, n int) ([]byte, v1.Hash) {
	data := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), 's', 't'})
	_, _ = r.Read(data) // never fails
	return data, digest(data)
}

func digest(data []byte) v1.Hash {
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

// source serves chunks in order, with the size it announces. Before chunk i it waits for
// gates[i], if any, and before the end for gates[len(chunks)]; then it returns err, or io.EOF. It
// honours ctx and Close, and counts its calls.
type source struct {
	chunks [][]byte
	size   int64
	gates  map[int]<-chan struct{}
	err    error
	calls  atomic.Int32
}

func whole(data []byte) *source { return &source{chunks: [][]byte{data}, size: int64(len(data))} }

func (s *source) open(ctx context.Context) (io.ReadCloser, int64, error) {
	s.calls.Add(1)
	return &sourceReader{src: s, ctx: ctx, closed: make(chan struct{})}, s.size, nil
}

type sourceReader struct {
	src       *source
	ctx       context.Context
	next      int  // the next chunk
	passed    bool // the gate before the next chunk is passed
	rest      []byte
	closed    chan struct{}
	closeOnce sync.Once
}

func (r *sourceReader) Read(p []byte) (int, error) {
	for len(r.rest) == 0 {
		if gate := r.src.gates[r.next]; gate != nil && !r.passed {
			select {
			case <-gate:
			case <-r.ctx.Done():
				return 0, r.ctx.Err()
			case <-r.closed:
				return 0, errors.New("read on a closed source")
			}
		}
		r.passed = true
		if r.next == len(r.src.chunks) {
			if r.src.err != nil {
				return 0, r.src.err
			}
			return 0, io.EOF
		}
		r.rest = r.src.chunks[r.next]
		r.next++
		r.passed = false
	}
	n := copy(p, r.rest)
	r.rest = r.rest[n:]
	return n, nil
}

func (r *sourceReader) Close() error {
	r.closeOnce.Do(func() { close(r.closed) })
	return nil
}
