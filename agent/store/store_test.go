package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

func TestGetStatDelete(t *testing.T) {
	ts := openTestStore(t, "")
	data, d := randomBlob(10, 5000)

	if _, err := ts.Get(d); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get of a missing blob: %v, want ErrNotFound", err)
	}
	if _, err := ts.Stat(d); !errors.Is(err, ErrNotFound) {
		t.Errorf("Stat of a missing blob: %v, want ErrNotFound", err)
	}
	mustFetch(t, ts.Store, data)
	if size, err := ts.Stat(d); err != nil || size != int64(len(data)) {
		t.Errorf("Stat = %d, %v", size, err)
	}
	if bytes, blobs := ts.Usage(); bytes != int64(len(data)) || blobs != 1 {
		t.Errorf("Usage = %d, %d", bytes, blobs)
	}
	b, err := ts.Get(d)
	if err != nil {
		t.Fatal(err)
	}
	if b.Size() != int64(len(data)) {
		t.Errorf("Size() = %d", b.Size())
	}
	if err := ts.Delete(d); err != nil {
		t.Fatal(err)
	}
	// The open blob survives the deletion.
	got, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("read of a deleted open blob: %d bytes, %v", len(got), err)
	}
	if err := b.Close(); err != nil {
		t.Error(err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := ts.Get(d); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete: %v", err)
	}
	if err := ts.Delete(d); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Delete: %v, want ErrNotFound", err)
	}
	ts.assertNothingStored(t)
	if got := ts.metric(t, "shoal_store_hits_total"); got != 1 {
		t.Errorf("hits = %v, want 1", got)
	}
}

func TestInvalidDigests(t *testing.T) {
	ts := openTestStore(t, "")
	sha512, err := v1.NewHash("sha512:" + strings.Repeat("ab", 64))
	if err != nil {
		t.Fatal(err)
	}
	_, good := randomBlob(11, 10)
	for _, d := range []v1.Hash{
		{},
		sha512,
		{Algorithm: "sha256", Hex: strings.ToUpper(good.Hex)},
		{Algorithm: "sha256", Hex: "../../etc/passwd"},
		{Algorithm: "sha256", Hex: good.Hex[:63]},
	} {
		src := wholeSource([]byte("x"))
		checks := map[string]error{}
		_, checks["Get"] = ts.Get(d)
		_, checks["Stat"] = ts.Stat(d)
		_, checks["Fetch"] = ts.Fetch(testContext(t), d, src.open)
		checks["Delete"] = ts.Delete(d)
		checks["Pin"] = ts.Pin(d, "o")
		checks["Unpin"] = ts.Unpin(d, "o")
		for op, err := range checks {
			if !errors.Is(err, ErrInvalidDigest) {
				t.Errorf("%s(%q): %v, want ErrInvalidDigest", op, d, err)
			}
		}
		if src.calls.Load() != 0 {
			t.Errorf("Fetch(%q) called the source", d)
		}
	}
	if err := ts.Pin(good, ""); err == nil {
		t.Error("Pin with an empty owner succeeded")
	}
}

func digests(infos []Info) []v1.Hash {
	var out []v1.Hash
	for _, i := range infos {
		out = append(out, i.Digest)
	}
	return out
}

// LRU eviction at the size limit: least recently used first, pinned blobs never, ErrFull (and
// nothing evicted) when the pinned blobs leave no room.
func TestEviction(t *testing.T) {
	clock := newFakeClock()
	ts := openTestStore(t, "", WithMaxBytes(300), WithClock(clock.Now))
	blob := func(seed uint64) ([]byte, v1.Hash) { return randomBlob(100+seed, 100) }
	fetch := func(seed uint64) v1.Hash {
		data, _ := blob(seed)
		clock.Advance(time.Second)
		return mustFetch(t, ts.Store, data)
	}
	a, b, c := fetch(1), fetch(2), fetch(3)
	clock.Advance(time.Second)
	if blob, err := ts.Get(a); err != nil { // a becomes the most recent
		t.Fatal(err)
	} else {
		blob.Close()
	}
	d := fetch(4) // evicts b, the least recently used
	if want := []v1.Hash{d, a, c}; !slices.Equal(digests(ts.List()), want) {
		t.Fatalf("List = %v, want %v (b evicted)", digests(ts.List()), want)
	}
	if _, err := ts.Stat(b); !errors.Is(err, ErrNotFound) {
		t.Errorf("Stat(b) after eviction: %v", err)
	}
	if got := ts.metric(t, "shoal_store_evictions_total"); got != 1 {
		t.Errorf("evictions = %v, want 1", got)
	}
	if got := ts.metric(t, "shoal_store_evicted_bytes_total"); got != 100 {
		t.Errorf("evicted bytes = %v, want 100", got)
	}

	// c is the least recently used, but pinned: a goes instead.
	if err := ts.Pin(c, "prewarm/x"); err != nil {
		t.Fatal(err)
	}
	e := fetch(5)
	if want := []v1.Hash{e, d, c}; !slices.Equal(digests(ts.List()), want) {
		t.Fatalf("List = %v, want %v (a evicted, c pinned)", digests(ts.List()), want)
	}

	// Everything pinned: no room, whether the size is announced or not, and nothing evicted.
	for _, h := range []v1.Hash{d, e} {
		if err := ts.Pin(h, "prewarm/x"); err != nil {
			t.Fatal(err)
		}
	}
	fData, f := blob(6)
	for _, size := range []int64{100, -1} {
		src := &fakeSource{chunks: [][]byte{fData}, size: size}
		if _, err := fetchAll(testContext(t), ts.Store, f, src.open); !errors.Is(err, ErrFull) {
			t.Errorf("fetch (size %d) with everything pinned: %v, want ErrFull", size, err)
		}
	}
	if got := len(ts.List()); got != 3 {
		t.Errorf("%d blobs after ErrFull, want 3", got)
	}
	for _, i := range ts.List() {
		if !i.Pinned {
			t.Errorf("%s not reported pinned", i.Digest)
		}
	}
	ts.assertIngestEmpty(t)

	// Pins are per owner: d stays pinned while another owner holds it.
	if err := ts.Pin(d, "prewarm/y"); err != nil {
		t.Fatal(err)
	}
	if err := ts.Unpin(d, "prewarm/x"); err != nil {
		t.Fatal(err)
	}
	if _, err := fetchAll(testContext(t), ts.Store, f, wholeSource(fData).open); !errors.Is(err, ErrFull) {
		t.Errorf("fetch with d still pinned by another owner: %v, want ErrFull", err)
	}
	// Pinning twice with one owner is one pin; Unpin of an absent pin is fine.
	if err := ts.Pin(d, "prewarm/y"); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := ts.Unpin(d, "prewarm/y"); err != nil {
			t.Fatal(err)
		}
	}
	mustFetch(t, ts.Store, fData)
	if _, err := ts.Stat(d); !errors.Is(err, ErrNotFound) {
		t.Errorf("d, no longer pinned, was not evicted: %v", err)
	}

	// A blob larger than the whole store never fits.
	big, bigD := randomBlob(200, 301)
	if _, err := fetchAll(testContext(t), ts.Store, bigD, wholeSource(big).open); !errors.Is(err, ErrFull) {
		t.Errorf("fetch of a blob larger than the store: %v, want ErrFull", err)
	}
	if got := ts.metric(t, "shoal_store_fetches_total", "result", "full"); got != 4 {
		t.Errorf("full fetches = %v, want 4", got)
	}
}

func (ts *testStore) assertIngestEmpty(t *testing.T) {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(ts.dir, ingestSubdir))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Errorf("ingest holds %d entries, want none", len(entries))
	}
}

// Evicting a blob a reader has open leaves the reader's bytes intact.
func TestEvictOpenBlob(t *testing.T) {
	clock := newFakeClock()
	ts := openTestStore(t, "", WithMaxBytes(2<<20), WithClock(clock.Now))
	aData, _ := randomBlob(20, 1<<20)
	bData, _ := randomBlob(21, 1<<20)
	cData, _ := randomBlob(22, 1<<20)
	a := mustFetch(t, ts.Store, aData)
	clock.Advance(time.Second)
	b := mustFetch(t, ts.Store, bData)
	open, err := ts.Get(a)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	clock.Advance(time.Second)
	if blob, err := ts.Get(b); err == nil { // b newer than a again
		blob.Close()
	}
	mustFetch(t, ts.Store, cData)
	if _, err := ts.Stat(a); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a not evicted: %v", err)
	}
	got, err := io.ReadAll(open)
	if err != nil || !bytes.Equal(got, aData) {
		t.Errorf("read of an evicted open blob: %d bytes, %v", len(got), err)
	}
}

// Open on an existing directory: blobs and pins survive, download leftovers and foreign files go,
// the LRU order comes back from the files' times, and the size limit is enforced.
func TestReopen(t *testing.T) {
	dir := t.TempDir()
	clock := newFakeClock()
	ts := openTestStore(t, dir, WithClock(clock.Now))
	var data [3][]byte
	var ds [3]v1.Hash
	var stored [3]time.Time
	for i := range data {
		data[i], _ = randomBlob(uint64(30+i), 100)
		clock.Advance(time.Minute)
		ds[i] = mustFetch(t, ts.Store, data[i])
		stored[i] = clock.Now()
	}
	a, b, c := ds[0], ds[1], ds[2]
	clock.Advance(time.Minute)
	if blob, err := ts.Get(a); err != nil { // order, oldest first: b, c, a
		t.Fatal(err)
	} else {
		blob.Close()
	}
	lastAccess := map[v1.Hash]time.Time{a: clock.Now(), b: stored[1]}
	if err := ts.Pin(b, "prewarm/x"); err != nil {
		t.Fatal(err)
	}
	if err := ts.Pin(ds[0], "absent-too"); err != nil {
		t.Fatal(err)
	}
	_, absent := randomBlob(39, 10)
	if err := ts.Pin(absent, "prewarm/x"); err != nil {
		t.Fatal(err)
	}

	// While open, nobody else can use the directory.
	if s2, err := Open(dir); err == nil {
		s2.Close()
		t.Fatal("a second Open of a directory in use succeeded")
	}
	if err := ts.Close(); err != nil {
		t.Fatal(err)
	}

	// What a crash mid-download and stray files leave behind.
	for _, f := range []string{
		filepath.Join(ingestSubdir, a.Hex+".123"),
		filepath.Join(ingestSubdir, "nested", "partial"),
		filepath.Join(blobsSubdir, "not-a-digest"),
		filepath.Join(blobsSubdir, strings.ToUpper(a.Hex)),
	} {
		path := filepath.Join(dir, f)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte("partial"), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	// Room for two blobs: b is the oldest but pinned, so c goes.
	ts2 := openTestStore(t, dir, WithMaxBytes(200), WithClock(clock.Now))
	ts2.assertIngestEmpty(t)
	entries, err := os.ReadDir(filepath.Join(dir, blobsSubdir))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{a.Hex, b.Hex}; !slices.Equal(names, sortedCopy(want)) {
		t.Errorf("blob files after reopen: %v, want %v", names, sortedCopy(want))
	}
	if _, err := ts2.Stat(c); !errors.Is(err, ErrNotFound) {
		t.Errorf("Stat(c) after reopen: %v, want ErrNotFound (evicted)", err)
	}
	if want := []v1.Hash{a, b}; !slices.Equal(digests(ts2.List()), want) {
		t.Errorf("List after reopen = %v, want %v", digests(ts2.List()), want)
	}
	for _, i := range ts2.List() {
		if want := i.Digest == a || i.Digest == b; i.Pinned != want {
			t.Errorf("%s: Pinned = %v, want %v", i.Digest, i.Pinned, want)
		}
		// Access times come back from the files, as the store's clock recorded them.
		if want := lastAccess[i.Digest]; !i.LastAccess.Equal(want) {
			t.Errorf("%s: LastAccess after reopen = %v, want %v", i.Digest, i.LastAccess, want)
		}
	}

	// Served from disk, not downloaded again.
	never := &fakeSource{chunks: [][]byte{[]byte("wrong")}, size: 5}
	for i, d := range []v1.Hash{a, b} {
		got, err := fetchAll(testContext(t), ts2.Store, d, never.open)
		if err != nil || !bytes.Equal(got, data[i]) {
			t.Errorf("blob %d after reopen: %d bytes, %v", i, len(got), err)
		}
	}
	if never.calls.Load() != 0 {
		t.Error("a blob kept across the restart was downloaded again")
	}

	// The pin taken while the blob was absent protects it once it arrives: when room is needed,
	// a newer unpinned blob goes instead.
	if err := ts2.Unpin(a, "absent-too"); err != nil {
		t.Fatal(err)
	}
	absentData, _ := randomBlob(39, 10)
	mustFetch(t, ts2.Store, absentData) // evicts a: 110 bytes used
	clock.Advance(time.Minute)
	newer1, _ := randomBlob(40, 90)
	n1 := mustFetch(t, ts2.Store, newer1) // 200 bytes used
	clock.Advance(time.Minute)
	newer2, _ := randomBlob(41, 90)
	mustFetch(t, ts2.Store, newer2) // evicts n1
	if _, err := ts2.Stat(absent); err != nil {
		t.Errorf("pinned blob evicted: %v", err)
	}
	if _, err := ts2.Stat(n1); !errors.Is(err, ErrNotFound) {
		t.Errorf("the unpinned blob was not evicted: %v", err)
	}
}

func sortedCopy(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}

func TestOpenCorruptPins(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, pinsFile), []byte(`{"pins":{"sha256:nothex":["x"]}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if s, err := Open(dir); err == nil {
		s.Close()
		t.Fatal("Open with a corrupt pins file succeeded")
	}
}

func TestFetchAfterBlobVanished(t *testing.T) {
	ts := openTestStore(t, "")
	data, d := randomBlob(50, 1000)
	mustFetch(t, ts.Store, data)
	if err := os.Remove(filepath.Join(ts.dir, blobsSubdir, d.Hex)); err != nil {
		t.Fatal(err)
	}
	src := wholeSource(data)
	if got, err := fetchAll(context.Background(), ts.Store, d, src.open); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("fetch of a vanished blob: %d bytes, %v", len(got), err)
	}
	if src.calls.Load() != 1 {
		t.Error("a vanished blob was not downloaded again")
	}
}

// warnings records the messages the store logs at Warn and above.
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (w *warnings) Handle(_ context.Context, r slog.Record) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, r.Message)
	return nil
}
func (w *warnings) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w *warnings) WithGroup(string) slog.Handler      { return w }

// A blob deleted while a new download of it commits: the store removes files outside its lock,
// and the removal of the old file, held back here until the new download has verified its bytes,
// must not remove the new file that the commit moves into place. Had it done so, the store would
// find its blob vanished from disk.
func TestDeleteWhileTheBlobIsStoredAgain(t *testing.T) {
	var logged warnings
	ts := openTestStore(t, "", WithLogger(slog.New(&logged)))
	ctx := testContext(t)
	data, d := randomBlob(60, 8<<10)
	mustFetch(t, ts.Store, data)

	removing, release := make(chan struct{}), make(chan struct{})
	ts.removeBlob = func(path string) error {
		close(removing)
		<-release
		return os.Remove(path)
	}
	deleted := make(chan error, 1)
	go func() { deleted <- ts.Delete(d) }()
	<-removing
	// The old blob is forgotten but its file is still there: a Fetch downloads it again.
	src := wholeSource(data)
	if got, err := fetchAll(ctx, ts.Store, d, src.open); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("fetch while the old file is being removed: %d bytes, %v", len(got), err)
	}
	if src.calls.Load() != 1 {
		t.Fatalf("source called %d times, want 1", src.calls.Load())
	}
	// The readers have the bytes; the commit follows. A store that did not wait for the removal
	// would publish the blob now: give it the time to, then let the removal go on.
	for deadline := time.Now().Add(500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if _, err := ts.Stat(d); err == nil {
			break
		}
	}
	close(release)
	if err := <-deleted; err != nil {
		t.Fatalf("delete: %v", err)
	}
	ts.wg.Wait() // committed
	b, err := ts.Get(d)
	if err != nil {
		t.Fatalf("get after the new download committed: %v", err)
	}
	got, err := io.ReadAll(b)
	b.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("read: %d bytes, %v", len(got), err)
	}
	logged.mu.Lock()
	defer logged.mu.Unlock()
	for _, m := range logged.msgs {
		t.Errorf("logged: %s", m)
	}
}

// Concurrent Pin and Unpin calls leave pins.json as the store holds the pins in memory: the
// file is written outside the store's lock, in the order of the calls.
func TestConcurrentPinsAreSavedInOrder(t *testing.T) {
	dir := t.TempDir()
	ts := openTestStore(t, dir)
	_, d := randomBlob(61, 10)
	const owners, rounds = 6, 10
	var wg sync.WaitGroup
	for o := range owners {
		wg.Go(func() {
			owner := fmt.Sprintf("owner-%d", o)
			for r := range rounds {
				err := ts.Pin(d, owner)
				if err == nil && (r < rounds-1 || o%2 == 0) {
					err = ts.Unpin(d, owner)
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	data, err := os.ReadFile(filepath.Join(dir, pinsFile))
	if err != nil {
		t.Fatal(err)
	}
	var doc pinsDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatalf("pins.json: %v", err)
	}
	var want []string
	for o := 1; o < owners; o += 2 { // the odd owners end pinned
		want = append(want, fmt.Sprintf("owner-%d", o))
	}
	if got := doc.Pins[d.String()]; !slices.Equal(got, want) {
		t.Errorf("pins.json holds owners %v of %s, want %v", got, d, want)
	}
	ts.mu.Lock()
	inMemory := slices.Sorted(maps.Keys(ts.pins[d.Hex]))
	ts.mu.Unlock()
	if !slices.Equal(inMemory, want) {
		t.Errorf("store holds owners %v of %s, want %v", inMemory, d, want)
	}
}
