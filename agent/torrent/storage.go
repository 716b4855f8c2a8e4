package torrent

import (
	"bytes"
	"context"
	"crypto/sha1" //nolint:gosec // BitTorrent v1 piece hashes are SHA-1; blobs are verified by sha256 too
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sync"
	"syscall"

	"github.com/anacrolix/torrent/metainfo"
	"github.com/anacrolix/torrent/storage"
)

var (
	// errReadOnly is returned when a torrent tries to write into a blob that is already complete.
	errReadOnly = errors.New("blob data is read-only")
	// errFileClosed is returned by a blob file whose swarm state was dropped.
	errFileClosed = errors.New("blob file closed")
)

// File is the data of one blob that its torrent reads and writes at offsets. While a blob
// downloads it is the swarm's own sparse file; once the blob is complete in the content store it
// can be switched to the store's file, so that seeding never keeps a second copy on disk.
type File struct {
	mu     sync.RWMutex
	data   io.ReaderAt
	writer io.WriterAt // nil when read-only
	closer io.Closer
}

// NewFile returns a File over data, written through writer (nil: read-only) and closed by
// closer.
func NewFile(data io.ReaderAt, writer io.WriterAt, closer io.Closer) *File {
	return &File{data: data, writer: writer, closer: closer}
}

// ReadAt reads the blob's bytes at off.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.data == nil {
		return 0, errFileClosed
	}
	return f.data.ReadAt(p, off)
}

// WriteAt writes bytes of the blob at off; a read-only File refuses.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.writer == nil {
		return 0, errReadOnly
	}
	return f.writer.WriteAt(p, off)
}

// Reopen opens a new file description of the backing data, for a reader that needs an offset
// of its own (sendfile); it fails when the data is not a file. The lock keeps Swap and Close from
// closing the descriptor while it is reopened, whose number could otherwise be another file's.
func (f *File) Reopen() (*os.File, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	sc, ok := f.data.(syscall.Conn)
	if !ok {
		return nil, errors.New("blob data is not a file")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var file *os.File
	var openErr error
	if err := raw.Control(func(fd uintptr) {
		file, openErr = os.Open(fmt.Sprintf("/proc/self/fd/%d", fd))
	}); err != nil {
		return nil, err
	}
	return file, openErr
}

// Swap replaces the backing data (e.g. the swarm's file by the store's complete blob) and closes
// the previous one.
func (f *File) Swap(data io.ReaderAt, writer io.WriterAt, closer io.Closer) {
	f.mu.Lock()
	old := f.closer
	f.data, f.writer, f.closer = data, writer, closer
	f.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
}

// Close releases the backing file; reads and writes fail afterwards. Closing twice is harmless.
func (f *File) Close() {
	f.mu.Lock()
	c := f.closer
	f.data, f.writer, f.closer = nil, nil, nil
	f.mu.Unlock()
	if c != nil {
		_ = c.Close()
	}
}

// blobStorage is the anacrolix storage of a blob's torrent: the blob file, with piece completion
// kept in memory. The torrent's info carries no real piece hashes (nobody knows them when it is
// created, see blobInfo): each segment's hashes arrive with the segment's info, from its seeder,
// and the storage checks pieces against them itself (storage.SelfHashing). Until a piece's hash
// is known its completion is unknown, which keeps the torrent client from requesting it. A seeder
// that has just fetched and hashed a segment marks its pieces complete; a fresh download marks
// them incomplete (no pointless hashing of an empty file); a resumed download leaves them unknown
// until they are verified against the hashes.
type blobStorage struct {
	file *File

	mu       sync.Mutex
	hashes   []byte // SHA-1 of every piece, valid where hashed
	hashed   []bool
	known    []bool
	complete []bool

	writeMu      sync.RWMutex // held for reading by writes, for writing by freezePieces
	frozenPieces map[int]bool

	writeHashes map[int]*writeHash // pieces being hashed as they are written (see writehash.go)

	sent       sentBlocks            // blocks peers sent, until their piece verifies (see ban.go)
	onLiar     func(peer netip.Addr) // called with every peer found to have sent bad data (see ban.go)
	onBadPiece func()                // called for every piece with bytes from peers that fails its check
	onReadBack func()                // called for every check that reads its piece back
}

// ErrFrozen is returned by a piece that stopped taking writes (see freezePieces): its bytes came
// from upstream instead.
var ErrFrozen = errors.New("read from upstream instead")

// errHashUnknown is returned when the torrent client hashes a piece whose hash has not arrived.
var errHashUnknown = errors.New("piece hash not known yet")

// placeholderHash is every piece's hash in a blob torrent's info. SelfHash returns it for a piece
// that matches its real hash, and something else otherwise.
var placeholderHash = func() (h metainfo.Hash) {
	for i := range h {
		h[i] = 0xff
	}
	return h
}()

// freezePieces stops writes into pieces [from, to); it returns once no write is in progress.
func (s *blobStorage) freezePieces(from, to int) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if s.frozenPieces == nil {
		s.frozenPieces = map[int]bool{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := from; i < to; i++ {
		s.frozenPieces[i] = true
		delete(s.writeHashes, i) // its bytes now come by another path
	}
}

// writeHashOf returns piece i's write hash, starting one if there is none.
func (s *blobStorage) writeHashOf(i int) *writeHash {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.writeHashes[i]
	if w == nil {
		if s.writeHashes == nil {
			s.writeHashes = map[int]*writeHash{}
		}
		w = newWriteHash()
		s.writeHashes[i] = w
	}
	return w
}

// takeWriteHash removes piece i's write hash and returns it (nil if there is none): a check
// consumes it, and the piece's next writes start a new one.
func (s *blobStorage) takeWriteHash(i int) *writeHash {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.writeHashes[i]
	delete(s.writeHashes, i)
	return w
}

// isFinal reports whether piece i's bytes came from upstream instead of peers (see
// freezePieces), or the whole blob verified (see markVerified).
func (s *blobStorage) isFinal(i int) bool {
	s.writeMu.RLock()
	defer s.writeMu.RUnlock()
	return s.frozenPieces[i]
}

// markVerified records every piece as complete: the content store verified the whole blob's
// sha256, pieces read from upstream and pieces of segments whose hashes never came included.
// The torrent then seeds all of it.
func (s *blobStorage) markVerified() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range s.known {
		s.known[i], s.complete[i] = true, true
	}
}

func newBlobStorage(file *File, pieces int) *blobStorage {
	return &blobStorage{file: file, hashes: make([]byte, pieces*sha1Size), hashed: make([]bool, pieces),
		known: make([]bool, pieces), complete: make([]bool, pieces)}
}

// setHashes records the hashes of the pieces from first on (a segment's "pieces") and their state.
func (s *blobStorage) setHashes(first int, pieces []byte, state CompletionState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	copy(s.hashes[first*sha1Size:], pieces)
	for i := first; i < first+len(pieces)/sha1Size; i++ {
		if s.hashed[i] && s.known[i] && s.complete[i] {
			continue // the same segment published twice (see publishSegment): never undo a piece
		}
		s.hashed[i] = true
		s.known[i] = state != UnknownCompletion
		s.complete[i] = state == AllComplete
	}
}

// OpenTorrent implements storage.ClientImpl.
func (s *blobStorage) OpenTorrent(_ context.Context, info *metainfo.Info, _ metainfo.Hash) (storage.TorrentImpl, error) {
	if n := info.NumPieces(); n != len(s.known) {
		return storage.TorrentImpl{}, fmt.Errorf("blob storage prepared for %d pieces, torrent has %d", len(s.known), n)
	}
	return storage.TorrentImpl{
		Piece: func(p metainfo.Piece) storage.PieceImpl {
			return &blobPiece{s: s, index: p.Index(), off: p.Offset(), length: p.Length()}
		},
		Close: func() error { return nil },
	}, nil
}

// completeIfHash marks piece i complete if its known hash is hash, and reports whether it did.
func (s *blobStorage) completeIfHash(i int, hash []byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.hashed[i] || !bytes.Equal(s.hashes[i*sha1Size:(i+1)*sha1Size], hash) {
		return false
	}
	s.known[i], s.complete[i] = true, true
	return true
}

// setComplete records the torrent client's verdict on piece i, unless its hash is not known: then
// there was nothing to check it against.
func (s *blobStorage) setComplete(i int, complete bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hashed[i] {
		s.known[i], s.complete[i] = true, complete
	}
}

// forgetIncomplete makes piece i's completion unknown if it is known to be incomplete, and
// reports whether it did; restoreIncomplete undoes it unless the piece has been checked since.
// See blob.kick.
func (s *blobStorage) forgetIncomplete(i int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.known[i] || s.complete[i] {
		return false
	}
	s.known[i] = false
	return true
}

func (s *blobStorage) restoreIncomplete(i int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hashed[i] && !s.known[i] {
		s.known[i] = true
	}
}

// blobPiece is one piece of a blob torrent.
type blobPiece struct {
	s      *blobStorage
	index  int
	off    int64
	length int64
}

func (p *blobPiece) ReadAt(b []byte, off int64) (int, error) {
	if off >= p.length {
		return 0, io.EOF
	}
	if rest := p.length - off; int64(len(b)) > rest {
		b = b[:rest]
	}
	n, err := p.s.file.ReadAt(b, p.off+off)
	if errors.Is(err, io.EOF) && n == len(b) {
		err = nil
	}
	return n, err
}

// WriteTo writes the piece to w (the torrent client hashes pieces this way) in a few large
// reads rather than the client's default of one read per 32 KiB.
func (p *blobPiece) WriteTo(w io.Writer) (int64, error) {
	bufp, _ := hashBuffers.Get().(*[]byte)
	defer hashBuffers.Put(bufp)
	n, err := io.CopyBuffer(w, io.NewSectionReader(p, 0, p.length), *bufp)
	if err == nil && n < p.length {
		err = io.EOF // the file ends inside the piece
	}
	return n, err
}

// hashBuffers are the read buffers of WriteTo and of copies from upstream into a blob's file.
var hashBuffers = sync.Pool{New: func() any {
	b := make([]byte, 256<<10)
	return &b
}}

func (p *blobPiece) WriteAt(b []byte, off int64) (int, error) {
	if off+int64(len(b)) > p.length {
		return 0, fmt.Errorf("write of %d bytes at %d past the end of a %d byte piece", len(b), off, p.length)
	}
	p.s.writeMu.RLock()
	defer p.s.writeMu.RUnlock()
	if p.s.frozenPieces[p.index] {
		return 0, ErrFrozen
	}
	w := p.s.writeHashOf(p.index)
	w.mu.Lock()
	defer w.mu.Unlock()
	n, err := p.s.file.WriteAt(b, p.off+off)
	w.wrote(p, b[:n], off, err == nil && n == len(b))
	return n, err
}

func (p *blobPiece) MarkComplete() error {
	p.s.setComplete(p.index, true)
	return nil
}

func (p *blobPiece) MarkNotComplete() error {
	p.s.setComplete(p.index, false)
	return nil
}

// SelfHash implements storage.SelfHashing: it checks the piece against its real hash, from its
// write hash when that vouches for every byte (see writehash.go), by reading it back
// otherwise. A mismatch is an error (errPieceCorrupt), so that the torrent client does not ban
// the piece's sender itself (see ban.go).
func (p *blobPiece) SelfHash() (metainfo.Hash, error) {
	p.s.mu.Lock()
	hashed := p.s.hashed[p.index]
	var want [sha1Size]byte
	copy(want[:], p.s.hashes[p.index*sha1Size:])
	p.s.mu.Unlock()
	if !hashed {
		return metainfo.Hash{}, errHashUnknown
	}
	blocks := p.s.sent.of(p.index)
	got, check, ok := p.s.takeWriteHash(p.index).result(p.length, blocks)
	if !ok {
		if p.s.onReadBack != nil {
			p.s.onReadBack()
		}
		check = newBlockChecker(blocks)
		h := sha1.New() //nolint:gosec // see segment.go
		if _, err := p.WriteTo(io.MultiWriter(h, check)); err != nil {
			return metainfo.Hash{}, err
		}
		h.Sum(got[:0])
	}
	if got != want {
		p.s.pieceFailed(p.index, p.length, check)
		return metainfo.Hash{}, fmt.Errorf("piece %d: %w", p.index, errPieceCorrupt)
	}
	p.s.sent.forget(p.index)
	p.s.blame(check.liars())
	return placeholderHash, nil
}

// pieceFailed judges piece i, of length bytes, which failed its check with the recorded blocks
// in check: a peer that sent every byte of it sent it corrupt. The blocks of other peers stay
// recorded: the next verified copy tells whether they lied.
func (s *blobStorage) pieceFailed(i int, length int64, check *blockChecker) {
	if len(check.blocks) == 0 {
		return // no byte of it from a peer
	}
	if s.onBadPiece != nil {
		s.onBadPiece()
	}
	liars := check.wholeSenders(length)
	s.sent.forgetPeers(i, liars)
	s.blame(liars)
}

func (s *blobStorage) blame(peers []netip.Addr) {
	if s.onLiar == nil {
		return
	}
	for _, peer := range peers {
		s.onLiar(peer)
	}
}

func (p *blobPiece) Completion() storage.Completion {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	return storage.Completion{Ok: p.s.known[p.index], Complete: p.s.complete[p.index]}
}
