package swarm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/anacrolix/torrent/metainfo"
	"github.com/anacrolix/torrent/storage"
)

var (
	// errReadOnly is returned when a torrent tries to write into a blob that is already complete.
	errReadOnly = errors.New("blob data is read-only")
	// errFileClosed is returned by a blob file whose swarm state was dropped.
	errFileClosed = errors.New("blob file closed")
)

// blobFile is the data of one blob that segment torrents read and write at offsets. While a blob
// downloads it is the swarm's own sparse file; once the blob is complete in the content store it
// can be switched to the store's file, so that seeding never keeps a second copy on disk.
type blobFile struct {
	mu     sync.RWMutex
	data   io.ReaderAt
	writer io.WriterAt // nil when read-only
	closer io.Closer
}

func newBlobFile(data io.ReaderAt, writer io.WriterAt, closer io.Closer) *blobFile {
	return &blobFile{data: data, writer: writer, closer: closer}
}

func (f *blobFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.data == nil {
		return 0, errFileClosed
	}
	return f.data.ReadAt(p, off)
}

func (f *blobFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.writer == nil {
		return 0, errReadOnly
	}
	return f.writer.WriteAt(p, off)
}

// swap replaces the backing data (e.g. the swarm's file by the store's complete blob) and closes
// the previous one.
func (f *blobFile) swap(data io.ReaderAt, writer io.WriterAt, closer io.Closer) {
	f.mu.Lock()
	old := f.closer
	f.data, f.writer, f.closer = data, writer, closer
	f.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
}

// close releases the backing file; reads and writes fail afterwards. Closing twice is harmless.
func (f *blobFile) close() {
	f.mu.Lock()
	c := f.closer
	f.data, f.writer, f.closer = nil, nil, nil
	f.mu.Unlock()
	if c != nil {
		_ = c.Close()
	}
}

// segmentStorage is the anacrolix storage of one segment torrent: the byte range
// [base, base+length) of a blob file, with piece completion kept in memory. A seeder that has
// just fetched and hashed the segment marks every piece complete; a fresh download starts with
// every piece known incomplete (no pointless hashing of an empty file); a resumed download
// leaves completion unknown so that the torrent client verifies what is already on disk.
type segmentStorage struct {
	file *blobFile
	base int64

	mu       sync.Mutex
	known    []bool
	complete []bool

	writeMu      sync.RWMutex // held for reading by writes, for writing by freeze and freezePiece
	frozenPieces map[int]bool
}

// errFrozen is returned by a segment storage, or a piece, that stopped taking writes (see
// freeze and freezePiece): its bytes came from upstream instead.
var errFrozen = errors.New("read from upstream instead")

// freezePiece stops writes into piece i; it returns once no write is in progress.
func (s *segmentStorage) freezePiece(i int) { s.freezePieces(i, i+1) }

// freeze stops writes into the segment; it returns once no write is in progress.
func (s *segmentStorage) freeze() { s.freezePieces(0, len(s.known)) }

func (s *segmentStorage) freezePieces(from, to int) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if s.frozenPieces == nil {
		s.frozenPieces = map[int]bool{}
	}
	for i := from; i < to; i++ {
		s.frozenPieces[i] = true
	}
}

type completionState int

const (
	allIncomplete     completionState = iota // fresh download
	allComplete                              // data written and hashed by us
	unknownCompletion                        // resumed: let the torrent client check
)

func newSegmentStorage(file *blobFile, base int64, pieces int, state completionState) *segmentStorage {
	s := &segmentStorage{file: file, base: base, known: make([]bool, pieces), complete: make([]bool, pieces)}
	for i := range pieces {
		s.known[i] = state != unknownCompletion
		s.complete[i] = state == allComplete
	}
	return s
}

// OpenTorrent implements storage.ClientImpl.
func (s *segmentStorage) OpenTorrent(_ context.Context, info *metainfo.Info, _ metainfo.Hash) (storage.TorrentImpl, error) {
	if n := info.NumPieces(); n != len(s.known) {
		return storage.TorrentImpl{}, fmt.Errorf("segment storage prepared for %d pieces, torrent has %d", len(s.known), n)
	}
	return storage.TorrentImpl{
		Piece: func(p metainfo.Piece) storage.PieceImpl {
			return &segmentPiece{s: s, index: p.Index(), off: s.base + p.Offset(), length: p.Length()}
		},
		Close: func() error { return nil },
	}, nil
}

func (s *segmentStorage) setComplete(i int, complete bool) {
	s.mu.Lock()
	s.known[i], s.complete[i] = true, complete
	s.mu.Unlock()
}

// segmentPiece is one piece of a segment torrent.
type segmentPiece struct {
	s      *segmentStorage
	index  int
	off    int64
	length int64
}

func (p *segmentPiece) ReadAt(b []byte, off int64) (int, error) {
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
func (p *segmentPiece) WriteTo(w io.Writer) (int64, error) {
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

func (p *segmentPiece) WriteAt(b []byte, off int64) (int, error) {
	if off+int64(len(b)) > p.length {
		return 0, fmt.Errorf("write of %d bytes at %d past the end of a %d byte piece", len(b), off, p.length)
	}
	p.s.writeMu.RLock()
	defer p.s.writeMu.RUnlock()
	if p.s.frozenPieces[p.index] {
		return 0, errFrozen
	}
	return p.s.file.WriteAt(b, p.off+off)
}

func (p *segmentPiece) MarkComplete() error {
	p.s.setComplete(p.index, true)
	return nil
}

func (p *segmentPiece) MarkNotComplete() error {
	p.s.setComplete(p.index, false)
	return nil
}

func (p *segmentPiece) Completion() storage.Completion {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	return storage.Completion{Ok: p.s.known[p.index], Complete: p.s.complete[p.index]}
}
