package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Source opens the bytes of a blob from somewhere else (the upstream registry, a peer): it returns
// a reader of the whole blob from offset 0 and its expected size, -1 if unknown. The store cancels
// ctx when the transfer stalls or the store closes, and may then Close rc while a Read is blocked
// in it (as net/http response bodies allow), so that a source ignoring ctx cannot hang a download.
// The call itself must return once ctx is done: the download gives up waiting for it at once, but
// the store's Close waits for it.
type Source func(ctx context.Context) (rc io.ReadCloser, size int64, err error)

// FileSource is implemented by a reader a Source returns when the source writes the blob into a
// file of its own, as the swarm does: the store then reads that file to hash it instead of
// copying the bytes into a file of its own, and on success moves it into the store, so the blob
// reaches the disk once. The store opens the file by name; it never writes, truncates or removes
// it, except that after the blob is verified it renames it (or, across filesystems, copies it)
// into the store, so the source must not write to it once Advance has returned the blob's size.
type FileSource interface {
	// FilePath is the file holding the blob's bytes at their offsets.
	FilePath() string
	// Advance blocks until more than have bytes from the blob's start are final in the file and
	// returns how many are, or fails. The store calls it with have = what it has hashed so far.
	Advance(ctx context.Context, have int64) (int64, error)
}

// Committer is implemented by a FileSource that must learn how its download ended: the store
// calls Committed once, after it has moved the source's file into the store (err nil: the blob
// is complete there, and Get finds it) or given the download up (err says why), and before it
// closes the source. The swarm hands a delivered blob's seeding over to the store's file on it.
type Committer interface {
	Committed(err error)
}

// copyBufferSize bounds the bytes read from a source per write; each write releases bytes to readers.
const copyBufferSize = 128 << 10

// Outcomes of a download, the result label of shoal_store_fetches_total.
const (
	resultOK             = "ok"
	resultError          = "error" // the source failed to open or to deliver
	resultDigestMismatch = "digest_mismatch"
	resultSizeMismatch   = "size_mismatch"
	resultStalled        = "stalled"
	resultFull           = "full"
	resultWriteError     = "write_error" // writing or committing the local file failed
	resultCanceled       = "canceled"    // the store was closed
)

// ingestFile is the temporary file a download writes; *os.File outside tests.
type ingestFile interface {
	io.Writer
	Sync() error
	Close() error
	Name() string
}

func createTempFile(dir, pattern string) (ingestFile, error) {
	f, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return nil, err
	}
	return f, nil
}

// Fetch opens blob d, downloading it from src if it is not complete in the store.
//
// A complete blob is returned like Get. Otherwise Fetch joins the download of d in flight, or
// starts one; all callers share one src call and read the bytes as they are written. Fetch
// returns once src has answered, so that Size is known, or with src's error. The download is
// detached from ctx; ctx only bounds this caller's wait and its blocking reads. The blob becomes
// complete in the store only once its sha256 equals d and its length the size src announced;
// otherwise readers get an error (ErrDigestMismatch, ErrSizeMismatch, ErrStalled, ErrFull, a
// write error) before they have received the last byte.
func (s *Store) Fetch(ctx context.Context, d v1.Hash, src Source) (Blob, error) {
	if err := checkDigest(d); err != nil {
		return nil, fmt.Errorf("fetch %s: %w", d, err)
	}
	missed := false
	for {
		fb, err := s.openComplete(d)
		if err == nil {
			if !missed { // a Fetch counts one hit or one miss
				s.metrics.hits.Inc()
			}
			s.persistAccess(d, fb.accessed)
			return fb, nil
		}
		if !errors.Is(err, ErrNotFound) {
			return nil, fmt.Errorf("fetch %s: %w", d, err)
		}
		if !missed {
			s.metrics.misses.Inc()
			missed = true
		}
		dl, err := s.join(ctx, d, src)
		if err != nil {
			return nil, err
		}
		if dl == nil {
			continue // complete since openComplete looked
		}
		b, err := s.openDownload(ctx, dl)
		if errors.Is(err, errCommitted) {
			continue // open it as a complete blob
		}
		return b, err
	}
}

// errCommitted: the download's file has been moved into the store.
var errCommitted = errors.New("download committed")

// join returns the download of d in flight, starting one if there is none, or nil if d has
// become complete.
func (s *Store) join(ctx context.Context, d v1.Hash, src Source) (*download, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.index[d.Hex] != nil {
		return nil, nil
	}
	if dl := s.inflight[d.Hex]; dl != nil {
		return dl, nil
	}
	return s.startLocked(ctx, d, src)
}

// openDownload opens a reader of dl once its source has answered. It returns errCommitted if dl
// has moved its file into the store meanwhile.
func (s *Store) openDownload(ctx context.Context, dl *download) (Blob, error) {
	select {
	case <-dl.opened:
	case <-ctx.Done():
		return nil, fmt.Errorf("fetch %s: %w", dl.digest, ctx.Err())
	}
	if err := dl.failure(); err != nil {
		return nil, err
	}
	// The file is known once the source has answered (a FileSource names its own).
	path, _ := dl.file()
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		// The file moved away: the download either committed or failed and was discarded just
		// now. Wait for its outcome rather than guess.
		select {
		case <-dl.finished:
		case <-ctx.Done():
			return nil, fmt.Errorf("fetch %s: %w", dl.digest, ctx.Err())
		}
		if err := dl.outcome(); err != nil {
			return nil, err
		}
		return nil, errCommitted
	}
	if err != nil {
		return nil, fmt.Errorf("fetch %s: open download: %w", dl.digest, err)
	}
	return &inflightBlob{dl: dl, f: f, ctx: ctx, closed: make(chan struct{})}, nil
}

// download is one transfer from a Source into a temporary file in ingest/.
type download struct {
	digest v1.Hash
	path   string          // the file being filled: the store's temporary file, or a FileSource's; guarded by mu
	own    bool            // path is the store's temporary file (not a FileSource's); guarded by mu
	ctx    context.Context // detached from the starting caller; cancelled on stall or Close
	cancel context.CancelCauseFunc

	opened   chan struct{} // closed once src answered and space is reserved, or the download failed
	openOnce sync.Once
	finished chan struct{} // closed once the blob is committed into the store, or the download failed

	reserved int64 // bytes reserved in the store; guarded by Store.mu

	closeSource func()    // closes a FileSource after commit; nil otherwise
	committer   Committer // the FileSource, told how the download ended; nil for other sources

	mu      sync.Mutex
	size    int64         // announced by src, -1 if unknown
	visible int64         // bytes readers may read
	done    bool          // verified: visible is the whole blob
	err     error         // why readers cannot have the blob
	ended   error         // set before finished is closed: nil if committed, else why the store does not keep it
	changed chan struct{} // closed and replaced whenever visible, done or err change
}

// startLocked starts a download of d from src. Its temporary file is created by the download, not
// here: no file operation runs under the store's lock.
func (s *Store) startLocked(ctx context.Context, d v1.Hash, src Source) (*download, error) {
	if s.closed {
		return nil, fmt.Errorf("fetch %s: %w", d, ErrClosed)
	}
	if src == nil {
		return nil, fmt.Errorf("fetch %s: no source for a blob not in the store", d)
	}
	// Detached so the download outlives the request that started it (other readers and the cache
	// need it), but keeping ctx's values for the source.
	dctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	dl := &download{
		digest:   d,
		ctx:      dctx,
		cancel:   cancel,
		opened:   make(chan struct{}),
		finished: make(chan struct{}),
		size:     -1,
		changed:  make(chan struct{}),
	}
	s.inflight[d.Hex] = dl
	s.wg.Go(func() { s.run(dl, src) })
	return dl, nil
}

func (s *Store) run(dl *download, src Source) {
	defer dl.cancel(nil)
	start := time.Now()
	s.log.Debug("download started", "digest", dl.digest)
	n, f, result, err := s.transfer(dl, src)
	if err == nil {
		if err = s.commit(dl, f, n); err != nil {
			result = resultWriteError
		}
	} else {
		s.discard(dl, f)
	}
	if dl.committer != nil {
		dl.committer.Committed(err)
	}
	if dl.closeSource != nil {
		dl.closeSource()
	}
	s.metrics.fetches.WithLabelValues(result).Inc()
	dl.finish(err)
	if err != nil {
		s.log.Warn("download failed", "digest", dl.digest, "bytes", n, "result", result, "error", err)
		return
	}
	s.log.Info("blob stored", "digest", dl.digest, "bytes", n, "duration", time.Since(start))
}

// transfer copies src into a temporary file f in ingest/ while hashing, releasing bytes to readers
// as they are written, and releases the last byte only once the digest and size are verified. f is
// nil when no file was created: when transfer failed before, or src is a FileSource.
func (s *Store) transfer(dl *download, src Source) (n int64, f ingestFile, result string, err error) {
	d := dl.digest
	stall := time.AfterFunc(s.stall, func() {
		dl.cancel(fmt.Errorf("fetch %s: %w: no data for %s", d, ErrStalled, s.stall))
	})
	defer stall.Stop()

	rc, size, err := s.openSource(dl.ctx, src)
	if err != nil {
		return 0, nil, dl.classify(resultError), dl.cause(fmt.Errorf("fetch %s: open source: %w", d, err))
	}
	var closeOnce sync.Once
	closeSource := func() { closeOnce.Do(func() { rc.Close() }) }
	stopClosing := context.AfterFunc(dl.ctx, closeSource)
	defer stopClosing()
	// A FileSource's file is renamed into the store on success, so the source is closed only
	// after commit; any other source as soon as its bytes are copied.
	fsrc, inPlace := rc.(FileSource)
	if inPlace {
		dl.closeSource = closeSource
		dl.committer, _ = rc.(Committer)
	} else {
		defer closeSource()
	}

	if inPlace && size < 0 {
		return 0, nil, resultError, fmt.Errorf("fetch %s: a source writing its own file must know the blob's size", d)
	}
	if size >= 0 {
		if err := s.reserve(dl, size); err != nil {
			return 0, nil, resultFull, err
		}
	}
	if inPlace {
		// Readers open the source's file; the store needs no file of its own.
		dl.setFile(fsrc.FilePath(), false)
		dl.markOpened(size)
		n, result, err := s.hashInPlace(dl, fsrc, size, stall)
		return n, nil, result, err
	}
	if f, err = s.createIngest(s.ingestDir, d.Hex+".*"); err != nil {
		return 0, nil, resultWriteError, fmt.Errorf("fetch %s: create temporary file: %w", d, err)
	}
	dl.setFile(f.Name(), true)
	dl.markOpened(size)

	h := sha256.New()
	buf := make([]byte, copyBufferSize)
	for {
		m, rerr := rc.Read(buf)
		if m > 0 {
			stall.Reset(s.stall)
			if size >= 0 && n+int64(m) > size {
				return n, f, resultSizeMismatch, fmt.Errorf("fetch %s: %w: source sent more than the %d bytes it announced", d, ErrSizeMismatch, size)
			}
			if size < 0 {
				if err := s.reserve(dl, int64(m)); err != nil {
					return n, f, resultFull, err
				}
			}
			if _, err := f.Write(buf[:m]); err != nil {
				return n, f, resultWriteError, fmt.Errorf("fetch %s: write temporary file: %w", d, err)
			}
			h.Write(buf[:m])
			n += int64(m)
			s.metrics.fetchBytes.Add(float64(m))
			dl.release(n - 1) // the last byte waits for the digest check
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return n, f, dl.classify(resultError), dl.cause(fmt.Errorf("fetch %s: read source after %d bytes: %w", d, n, rerr))
		}
	}
	if size >= 0 && n != size {
		return n, f, resultSizeMismatch, fmt.Errorf("fetch %s: %w: source sent %d of the %d bytes it announced", d, ErrSizeMismatch, n, size)
	}
	n, result, err = dl.verify(h, n)
	return n, f, result, err
}

// verify completes a download of n bytes whose sha256 state is h, or fails it if the digest
// differs.
func (dl *download) verify(h hash.Hash, n int64) (int64, string, error) {
	if got := hex.EncodeToString(h.Sum(nil)); got != dl.digest.Hex {
		return n, resultDigestMismatch, fmt.Errorf("fetch %s: %w: source sent bytes with digest sha256:%s", dl.digest, ErrDigestMismatch, got)
	}
	dl.complete(n)
	return n, resultOK, nil
}

// hashInPlace follows a FileSource: it hashes the blob in the source's file as Advance makes
// bytes final, releasing them to readers, and the last byte once the digest is verified.
func (s *Store) hashInPlace(dl *download, src FileSource, size int64, stall *time.Timer) (int64, string, error) {
	d := dl.digest
	f, err := os.Open(src.FilePath())
	if err != nil {
		return 0, resultError, fmt.Errorf("fetch %s: open the source's file: %w", d, err)
	}
	defer f.Close()
	h := sha256.New()
	buf := make([]byte, copyBufferSize)
	var n int64
	for n < size {
		final, err := src.Advance(dl.ctx, n)
		if err != nil {
			return n, dl.classify(resultError), dl.cause(fmt.Errorf("fetch %s: source failed after %d bytes: %w", d, n, err))
		}
		if final > size {
			return n, resultSizeMismatch, fmt.Errorf("fetch %s: %w: source has %d of the %d bytes it announced", d, ErrSizeMismatch, final, size)
		}
		stall.Reset(s.stall)
		for n < final {
			m, err := f.ReadAt(buf[:min(int64(len(buf)), final-n)], n)
			if m == 0 && err != nil {
				return n, resultError, fmt.Errorf("fetch %s: read the source's file at %d: %w", d, n, err)
			}
			h.Write(buf[:m])
			n += int64(m)
			s.metrics.fetchBytes.Add(float64(m))
			dl.release(n - 1) // the last byte waits for the digest check
		}
	}
	return dl.verify(h, n)
}

// openSource calls src, but gives up when ctx ends even if src ignores ctx: a download must
// never hang. A reader src returns after that is closed. The call runs on a goroutine of the
// store's: Close waits for src to return.
func (s *Store) openSource(ctx context.Context, src Source) (io.ReadCloser, int64, error) {
	type opened struct {
		rc   io.ReadCloser
		size int64
		err  error
	}
	ch := make(chan opened, 1)
	s.wg.Go(func() {
		rc, size, err := src(ctx)
		if err == nil && rc == nil {
			err = errors.New("source returned no reader")
		}
		ch <- opened{rc, size, err}
	})
	select {
	case o := <-ch:
		return o.rc, o.size, o.err
	case <-ctx.Done():
		s.wg.Go(func() {
			if o := <-ch; o.err == nil {
				o.rc.Close()
			}
		})
		return nil, 0, ctx.Err()
	}
}

// reserve sets aside n bytes for dl, evicting blobs if needed.
func (s *Store) reserve(dl *download, n int64) error {
	s.mu.Lock()
	victims, err := s.evictLocked(n)
	if err == nil {
		s.reserved += n
		dl.reserved += n
	}
	s.mu.Unlock()
	s.removeEvicted(victims)
	if err != nil {
		return fmt.Errorf("fetch %s: %w", dl.digest, err)
	}
	return nil
}

// commit makes a verified download a complete blob. Readers already have every byte; a failure
// here only means the store does not keep it.
//
// The file is renamed into blobs/ outside the store's lock and the blob published under it
// afterwards. In between, no other file of the digest can appear or be removed there: a new
// download of the digest starts only while none is in flight, and a removal needs an entry in the
// index, which only this commit can add; one still removing an older file was awaited before.
func (s *Store) commit(dl *download, f ingestFile, n int64) error {
	source, own := dl.file()
	path := source
	var err error
	if own {
		// Durable before visible: after a crash, a file under its digest must hold the whole blob.
		err = f.Sync()
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	} else if path, err = s.adoptFile(source); err != nil {
		err = fmt.Errorf("adopt %s: %w", source, err)
	}
	if err == nil {
		s.awaitRemoval(dl.digest.Hex)
		err = os.Rename(path, s.blobPath(dl.digest.Hex))
	}
	if err != nil && path != "" && (own || path != source) {
		s.removeTemp(path) // the store's temporary file, or its copy of a FileSource's
	}
	s.mu.Lock()
	delete(s.inflight, dl.digest.Hex)
	s.reserved -= dl.reserved
	var accessed time.Time
	if err == nil {
		e := &entry{hex: dl.digest.Hex, size: n, lastAccess: s.now()}
		e.elem = s.lru.PushFront(e)
		s.index[e.hex] = e
		s.used += n
		accessed = e.lastAccess
	}
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("fetch %s: store verified blob: %w", dl.digest, err)
	}
	s.persistAccess(dl.digest, accessed)
	if err := syncDir(s.blobsDir); err != nil {
		s.log.Warn("cannot sync blob directory", "error", err)
	}
	return nil
}

// discard forgets a failed download and removes its temporary file f (nil if it has none) before
// readers learn of the failure, so that a Fetch after the failure starts afresh.
func (s *Store) discard(dl *download, f ingestFile) {
	if f != nil {
		_ = f.Close() // removed next: a close error loses nothing
		s.removeTemp(f.Name())
	}
	s.mu.Lock()
	delete(s.inflight, dl.digest.Hex)
	s.reserved -= dl.reserved
	s.mu.Unlock()
}

// adoptFile makes a FileSource's verified file durable and ready to be renamed into the store:
// it returns path itself when it is on the store's filesystem, else a copy in ingest/.
func (s *Store) adoptFile(path string) (string, error) {
	src, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer src.Close()
	if err := src.Sync(); err != nil {
		return "", err
	}
	if sameDevice(src, s.ingestDir) {
		return path, nil
	}
	dst, err := s.createIngest(s.ingestDir, filepath.Base(path)+".*")
	if err != nil {
		return "", err
	}
	_, err = io.Copy(dst, src)
	if err == nil {
		err = dst.Sync()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		s.removeTemp(dst.Name())
		return "", err
	}
	return dst.Name(), nil
}

// sameDevice reports whether f and dir are on the same filesystem, so that a rename moves f.
func sameDevice(f *os.File, dir string) bool {
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	di, err := os.Stat(dir)
	if err != nil {
		return false
	}
	fs, ok1 := fi.Sys().(*syscall.Stat_t)
	ds, ok2 := di.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && fs.Dev == ds.Dev
}

func (s *Store) removeTemp(path string) {
	if err := os.Remove(path); err != nil {
		s.log.Error("cannot remove temporary file", "path", path, "error", err)
	}
}

// cause prefers the reason the download was cancelled (stall, Close) over the error it caused.
func (dl *download) cause(err error) error {
	if c := context.Cause(dl.ctx); c != nil {
		return fmt.Errorf("%w (%w)", c, err)
	}
	return err
}

func (dl *download) classify(result string) string {
	switch c := context.Cause(dl.ctx); {
	case errors.Is(c, ErrStalled):
		return resultStalled
	case errors.Is(c, ErrClosed):
		return resultCanceled
	}
	return result
}

// wait blocks until more than want-1 bytes are visible, the blob is complete or failed, ctx is
// done, or the reader is closed. It returns the number of visible bytes.
func (dl *download) wait(ctx context.Context, closed <-chan struct{}, want int64) (int64, error) {
	for {
		dl.mu.Lock()
		avail, done, err, changed := dl.visible, dl.done, dl.err, dl.changed
		dl.mu.Unlock()
		switch {
		case err != nil:
			return avail, err
		case done || avail >= want:
			return avail, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return avail, ctx.Err()
		case <-closed:
			return avail, fmt.Errorf("read %s: %w", dl.digest, errBlobClosed)
		}
	}
}

func (dl *download) broadcastLocked() {
	close(dl.changed)
	dl.changed = make(chan struct{})
}

// file returns the file being filled and whether it is the store's own temporary file.
func (dl *download) file() (path string, own bool) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	return dl.path, dl.own
}

// setFile names the file readers open: the store's temporary file (own) or a FileSource's.
func (dl *download) setFile(path string, own bool) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	dl.path, dl.own = path, own
}

func (dl *download) markOpened(size int64) {
	dl.mu.Lock()
	dl.size = size
	dl.mu.Unlock()
	dl.openOnce.Do(func() { close(dl.opened) })
}

func (dl *download) release(visible int64) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	if visible > dl.visible {
		dl.visible = visible
		dl.broadcastLocked()
	}
}

func (dl *download) complete(n int64) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	dl.visible, dl.done = n, true
	dl.broadcastLocked()
}

// finish records how the download ended: err nil if the blob was committed into the store. A
// failure reaches readers unless they already have the whole verified blob.
func (dl *download) finish(err error) {
	dl.mu.Lock()
	dl.ended = err
	if err != nil && !dl.done {
		dl.err = err
		dl.broadcastLocked()
	}
	dl.mu.Unlock()
	dl.openOnce.Do(func() { close(dl.opened) })
	close(dl.finished)
}

func (dl *download) failure() error {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	return dl.err
}

// outcome is how the download ended, once finished is closed: nil if it was committed.
func (dl *download) outcome() error {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	return dl.ended
}

func (dl *download) currentSize() int64 {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	if dl.size < 0 && dl.done {
		return dl.visible
	}
	return dl.size
}
