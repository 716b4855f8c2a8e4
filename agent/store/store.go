// Package store is the node agent's content-addressed blob store: it keeps OCI blobs on local disk
// under their sha256 digest (dir/blobs/sha256/<hex>) and makes a blob visible there only after its
// bytes have been verified against that digest. Concurrent requests for a missing blob share one
// download from a Source into dir/ingest/, and every requester streams the bytes as they are
// written; the last byte is released only once the digest matches, so no reader ever receives the
// whole of a corrupt blob. The store keeps its size under a limit by evicting least-recently-used
// blobs that no owner has pinned, keeps blobs and pins (dir/pins.json) across restarts, and on
// start removes what an interrupted download left behind.
package store

import (
	"container/list"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
)

// Errors returned by the store, wrapped with context; test for them with errors.Is.
var (
	// ErrNotFound: the blob is not complete in the store.
	ErrNotFound = errors.New("blob not found")
	// ErrFull: the blob does not fit even after evicting every unpinned blob.
	ErrFull = errors.New("store full: not enough unpinned space")
	// ErrDigestMismatch: the source delivered bytes whose sha256 is not the requested digest.
	ErrDigestMismatch = errors.New("digest mismatch")
	// ErrSizeMismatch: the source delivered more or fewer bytes than it announced.
	ErrSizeMismatch = errors.New("size mismatch")
	// ErrStalled: the source delivered no byte for the stall timeout.
	ErrStalled = errors.New("source stalled")
	// ErrInvalidDigest: the digest is not a well-formed sha256 digest.
	ErrInvalidDigest = errors.New("invalid digest")
	// ErrClosed: the store has been closed.
	ErrClosed = errors.New("store closed")
)

const (
	blobsSubdir  = "blobs/sha256"
	ingestSubdir = "ingest"
	pinsFile     = "pins.json"
	lockFile     = "lock"

	defaultStallTimeout = 30 * time.Second
)

// Info describes one complete blob.
type Info struct {
	Digest     v1.Hash
	Size       int64
	LastAccess time.Time
	Pinned     bool
}

// Option configures a Store.
type Option func(*config)

type config struct {
	maxBytes int64
	logger   *slog.Logger
	reg      prometheus.Registerer
	clock    func() time.Time
	stall    time.Duration
}

// WithMaxBytes limits the total size of complete and in-flight blobs; 0 means unlimited. When a new
// blob needs room, least-recently-used unpinned blobs are evicted.
func WithMaxBytes(n int64) Option { return func(c *config) { c.maxBytes = n } }

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.logger = l } }

// WithRegisterer registers the store's metrics (namespace shoal, subsystem store) with r; nil
// (the default) registers nothing.
func WithRegisterer(r prometheus.Registerer) Option { return func(c *config) { c.reg = r } }

// WithClock sets the clock used for last-access times (default: time.Now).
func WithClock(now func() time.Time) Option { return func(c *config) { c.clock = now } }

// WithStallTimeout sets how long a download may go without receiving a byte from its source
// before it fails with ErrStalled (default 30s).
func WithStallTimeout(d time.Duration) Option { return func(c *config) { c.stall = d } }

// Store is a content-addressed blob store rooted at a directory. It is safe for concurrent use.
//
// Its lock (mu) guards only memory: files are opened, created, renamed and removed outside it, so
// that a slow disk delays the operation that needs it and not every Get. Where the order of file
// operations on one digest matters, the entry is claimed under the lock first (see forgetLocked
// and commit).
type Store struct {
	dir, blobsDir, ingestDir string

	maxBytes int64
	log      *slog.Logger
	now      func() time.Time
	stall    time.Duration
	metrics  *metrics
	lock     *os.File // flock held while open: two agents must not share a directory

	// createIngest creates a download's temporary file; tests replace it to inject write errors.
	createIngest func(dir, pattern string) (ingestFile, error)
	// removeBlob removes a blob's file (os.Remove); tests replace it to hold a removal.
	removeBlob func(path string) error

	wg sync.WaitGroup // running downloads and the source calls they made

	// pinsMu serialises Pin and Unpin, so that pins.json is written in the order of the calls;
	// it is held while the file is written, but only Pin and Unpin take it. Taken before mu.
	pinsMu sync.Mutex

	mu       sync.Mutex
	closed   bool
	index    map[string]*entry // by hex digest; complete blobs only
	lru      *list.List        // of *entry, most recently used at the front
	used     int64             // bytes of complete blobs
	reserved int64             // bytes set aside for downloads in flight
	inflight map[string]*download
	pins     map[string]map[string]struct{} // hex digest → owners
	// removing holds the blobs forgotten by eviction or Delete whose file is still being
	// removed: hex digest → closed once it is gone. A commit of the same digest waits for it.
	removing map[string]chan struct{}
}

type entry struct {
	hex        string
	size       int64
	lastAccess time.Time
	elem       *list.Element
}

// Open creates or opens the store rooted at dir. It removes leftovers of interrupted downloads,
// indexes the complete blobs (least recently used first by file modification time), loads the
// pins and evicts blobs until the size limit holds.
func Open(dir string, opts ...Option) (*Store, error) {
	cfg := config{logger: slog.New(slog.DiscardHandler), clock: time.Now, stall: defaultStallTimeout}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.maxBytes < 0 || cfg.stall <= 0 {
		return nil, fmt.Errorf("open store %s: max bytes must be >= 0 and stall timeout > 0", dir)
	}
	s := &Store{
		dir:          dir,
		blobsDir:     filepath.Join(dir, blobsSubdir),
		ingestDir:    filepath.Join(dir, ingestSubdir),
		maxBytes:     cfg.maxBytes,
		log:          cfg.logger.With("component", "store"),
		now:          cfg.clock,
		stall:        cfg.stall,
		createIngest: createTempFile,
		removeBlob:   os.Remove,
		index:        make(map[string]*entry),
		lru:          list.New(),
		inflight:     make(map[string]*download),
		pins:         make(map[string]map[string]struct{}),
		removing:     make(map[string]chan struct{}),
	}
	for _, d := range []string{s.blobsDir, s.ingestDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("open store: %w", err)
		}
	}
	if err := s.acquireLock(); err != nil {
		return nil, err
	}
	err := s.load()
	if err == nil {
		s.metrics, err = newMetrics(cfg.reg, s)
	}
	if err != nil {
		s.lock.Close()
		return nil, err
	}
	s.mu.Lock()
	victims, err := s.evictLocked(0)
	bytes, blobs := s.used, len(s.index)
	s.mu.Unlock()
	s.removeEvicted(victims)
	if err != nil {
		// The pinned blobs alone exceed the limit: the store still serves, downloads get ErrFull.
		s.log.Warn("store is over its size limit and pinned blobs prevent eviction", "error", err)
	}
	s.log.Info("store opened", "dir", dir, "bytes", bytes, "blobs", blobs, "maxBytes", s.maxBytes)
	return s, nil
}

func (s *Store) acquireLock() error {
	f, err := os.OpenFile(filepath.Join(s.dir, lockFile), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("open store %s: %w", s.dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return fmt.Errorf("open store %s: directory is in use by another store (stop the other agent or use another --data-dir): %w", s.dir, err)
	}
	s.lock = f
	return nil
}

// load cleans ingest/, indexes blobs/ and reads the pins.
func (s *Store) load() error {
	leftovers, err := os.ReadDir(s.ingestDir)
	if err != nil {
		return fmt.Errorf("open store: %w", err)
	}
	for _, e := range leftovers {
		if err := os.RemoveAll(filepath.Join(s.ingestDir, e.Name())); err != nil {
			return fmt.Errorf("open store: remove partial download: %w", err)
		}
	}
	if len(leftovers) > 0 {
		s.log.Info("removed partial downloads", "count", len(leftovers))
	}

	files, err := os.ReadDir(s.blobsDir)
	if err != nil {
		return fmt.Errorf("open store: %w", err)
	}
	var found []*entry
	for _, f := range files {
		path := filepath.Join(s.blobsDir, f.Name())
		fi, err := f.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return fmt.Errorf("open store: %w", err)
		}
		if !validHex(f.Name()) || !fi.Mode().IsRegular() {
			// Nothing the store wrote: a blob is only ever renamed here under its digest.
			s.log.Warn("removing unexpected file from blob directory", "path", path)
			if err := os.RemoveAll(path); err != nil {
				return fmt.Errorf("open store: %w", err)
			}
			continue
		}
		found = append(found, &entry{hex: f.Name(), size: fi.Size(), lastAccess: fi.ModTime()})
	}
	slices.SortFunc(found, func(a, b *entry) int { return a.lastAccess.Compare(b.lastAccess) })
	for _, e := range found {
		e.elem = s.lru.PushFront(e)
		s.index[e.hex] = e
		s.used += e.size
	}
	return s.loadPins()
}

// Close stops the downloads in flight (their readers get ErrClosed) and releases the directory.
// Blobs already handed out stay readable.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for _, dl := range s.inflight {
		dl.cancel(ErrClosed)
	}
	s.mu.Unlock()
	s.wg.Wait()
	return s.lock.Close() // releases the flock
}

// Get opens a complete blob. It returns an error wrapping ErrNotFound when the blob is not
// complete in the store (Fetch counts the miss). A successful Get counts a hit and marks the blob
// as recently used.
func (s *Store) Get(d v1.Hash) (Blob, error) {
	if err := checkDigest(d); err != nil {
		return nil, fmt.Errorf("get %s: %w", d, err)
	}
	b, err := s.openComplete(d)
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", d, err)
	}
	s.metrics.hits.Inc()
	s.persistAccess(d, b.accessed)
	return b, nil
}

// openComplete opens d if it is complete and marks it used. The file is opened after the lock is
// released: if an eviction or Delete forgets d and removes its file in between, d is not found,
// as if they had come first; if d was also stored again meanwhile, the new file is opened.
func (s *Store) openComplete(d v1.Hash) (*fileBlob, error) {
	for {
		s.mu.Lock()
		e := s.index[d.Hex]
		if e == nil {
			s.mu.Unlock()
			return nil, ErrNotFound
		}
		e.lastAccess = s.now()
		s.lru.MoveToFront(e.elem)
		size, accessed := e.size, e.lastAccess
		s.mu.Unlock()

		f, err := os.Open(s.blobPath(d.Hex))
		if err == nil {
			return &fileBlob{f: f, size: size, accessed: accessed}, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		s.mu.Lock()
		current := s.index[d.Hex]
		// The store removes a blob's file only after forgetting its entry, and publishes an
		// entry only after its file is in place: an entry still indexed without its file was
		// removed behind the store's back.
		vanished := current == e
		if vanished {
			s.removeEntryLocked(e)
		}
		s.mu.Unlock()
		if vanished {
			s.log.Warn("blob vanished from disk; forgetting it so that a fetch downloads it again", "digest", d)
		}
		if current == nil || vanished {
			return nil, ErrNotFound
		}
	}
}

// persistAccess records the access time as the file's mtime, so the LRU order survives a restart.
// Best effort: the blob may have been evicted meanwhile.
func (s *Store) persistAccess(d v1.Hash, t time.Time) {
	if err := os.Chtimes(s.blobPath(d.Hex), time.Time{}, t); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.log.Debug("cannot record access time", "digest", d, "error", err)
	}
}

// Stat returns the size of a complete blob, or an error wrapping ErrNotFound.
func (s *Store) Stat(d v1.Hash) (int64, error) {
	if err := checkDigest(d); err != nil {
		return 0, fmt.Errorf("stat %s: %w", d, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.index[d.Hex]
	if e == nil {
		return 0, fmt.Errorf("stat %s: %w", d, ErrNotFound)
	}
	return e.size, nil
}

// Downloading reports whether a download of d is in flight. Its readers may have had every
// verified byte while the store still commits the blob (Stat finds it once committed): a blob
// moves from downloading to complete in one step, never through neither.
func (s *Store) Downloading(d v1.Hash) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inflight[d.Hex] != nil
}

// Delete removes a complete blob (pinned or not; its pins stay and protect it if it returns).
// Readers that have it open keep reading. It returns an error wrapping ErrNotFound if the blob is
// not complete in the store.
func (s *Store) Delete(d v1.Hash) error {
	if err := checkDigest(d); err != nil {
		return fmt.Errorf("delete %s: %w", d, err)
	}
	s.mu.Lock()
	e := s.index[d.Hex]
	if e != nil {
		s.forgetLocked(e)
	}
	s.mu.Unlock()
	if e == nil {
		return fmt.Errorf("delete %s: %w", d, ErrNotFound)
	}
	if err := s.unlink(e.hex); err != nil {
		// No longer served either way; the next Open indexes the file again if it survived.
		return fmt.Errorf("delete %s: %w", d, err)
	}
	return nil
}

// Usage returns the total size and number of complete blobs.
func (s *Store) Usage() (bytes int64, blobs int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.used, len(s.index)
}

// MaxBytes returns the store's size limit (WithMaxBytes); 0 means unlimited.
func (s *Store) MaxBytes() int64 { return s.maxBytes }

// List describes every complete blob, most recently used first.
func (s *Store) List() []Info {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Info, 0, len(s.index))
	for el := s.lru.Front(); el != nil; el = el.Next() {
		e := entryOf(el)
		out = append(out, Info{
			Digest:     v1.Hash{Algorithm: "sha256", Hex: e.hex},
			Size:       e.size,
			LastAccess: e.lastAccess,
			Pinned:     len(s.pins[e.hex]) > 0,
		})
	}
	return out
}

// entryOf returns the entry an LRU element holds: the list holds nothing else.
func entryOf(el *list.Element) *entry {
	e, _ := el.Value.(*entry)
	return e
}

func (s *Store) blobPath(hex string) string { return filepath.Join(s.blobsDir, hex) }

// forgetLocked forgets a complete blob whose file the caller then removes with unlink, after
// releasing the lock. Until unlink has returned, a download of the same digest does not move its
// file into place (commit waits), so the removal cannot take the new file instead of the old.
func (s *Store) forgetLocked(e *entry) {
	s.removeEntryLocked(e)
	// No removal of hex can be running already: that would have needed an entry for hex, and a
	// new entry is published only once the running removal is done.
	s.removing[e.hex] = make(chan struct{})
}

// unlink removes the file of a blob forgotten by forgetLocked. Readers that have it open keep
// reading.
func (s *Store) unlink(hex string) error {
	err := s.removeBlob(s.blobPath(hex))
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	s.mu.Lock()
	close(s.removing[hex])
	delete(s.removing, hex)
	s.mu.Unlock()
	return err
}

// awaitRemoval returns once no file of hex is being removed.
func (s *Store) awaitRemoval(hex string) {
	for {
		s.mu.Lock()
		done := s.removing[hex]
		s.mu.Unlock()
		if done == nil {
			return
		}
		<-done
	}
}

func (s *Store) removeEntryLocked(e *entry) {
	s.lru.Remove(e.elem)
	delete(s.index, e.hex)
	s.used -= e.size
}

// checkDigest accepts only sha256 digests in canonical form: paths are built from them.
func checkDigest(d v1.Hash) error {
	if d.Algorithm != "sha256" || !validHex(d.Hex) {
		return fmt.Errorf("%w: want sha256 and 64 lowercase hex digits", ErrInvalidDigest)
	}
	return nil
}

func validHex(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := range len(s) {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// syncDir makes a rename or unlink in dir durable.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
