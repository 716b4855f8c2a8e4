package torrent

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"

	"github.com/anacrolix/torrent/storage"
)

// writeHashFixture is a blob storage of two pieces whose hashes are known, counting the checks
// that read their piece back.
type writeHashFixture struct {
	t         *testing.T
	data      []byte
	st        *blobStorage
	piece     func(int) storage.PieceImpl
	readBacks int
	liars     []netip.Addr
}

const whPiece, whChunk = 64 << 10, 16 << 10

func newWriteHashFixture(t *testing.T) *writeHashFixture {
	data := make([]byte, 2*whPiece)
	for i := range data {
		data[i] = byte(i*31 + i>>8)
	}
	// The file starts zeroed: a check that read it back without the writes would fail.
	st, piece := newTestStorage(t, make([]byte, len(data)), whPiece)
	st.setHashes(0, pieceHashes(data, whPiece), AllIncomplete)
	f := &writeHashFixture{t: t, data: data, st: st, piece: piece}
	st.onReadBack = func() { f.readBacks++ }
	st.onLiar = func(a netip.Addr) { f.liars = append(f.liars, a) }
	return f
}

// send writes chunk k of piece i through the piece, as the torrent client does with a chunk
// from peer, after recording it; bytes replaces the chunk's true bytes when not nil.
func (f *writeHashFixture) send(i, k int, peer netip.Addr, b []byte) {
	f.t.Helper()
	if b == nil {
		b = f.data[i*whPiece+k*whChunk : i*whPiece+(k+1)*whChunk]
	}
	f.st.sent.record(i, int64(k*whChunk), b, peer)
	if n, err := f.piece(i).WriteAt(b, int64(k*whChunk)); err != nil || n != len(b) {
		f.t.Fatalf("write chunk %d of piece %d: %d, %v", k, i, n, err)
	}
}

func (f *writeHashFixture) check(i int) error {
	f.t.Helper()
	h, ok := f.piece(i).(storage.SelfHashing)
	if !ok {
		f.t.Fatal("a blob piece does not hash itself")
	}
	sum, err := h.SelfHash()
	if err == nil && sum != placeholderHash {
		f.t.Fatalf("piece %d: SelfHash returned %x and no error", i, sum)
	}
	return err
}

var (
	honestPeer = netip.MustParseAddr("10.0.0.1")
	lyingPeer  = netip.MustParseAddr("10.0.0.2")
)

// TestPieceWrittenInOrderIsCheckedWithoutReadingIt: chunks that arrive once each verify from the
// hash taken as they were written, in order or not; the check reads nothing back.
func TestPieceWrittenInOrderIsCheckedWithoutReadingIt(t *testing.T) {
	f := newWriteHashFixture(t)
	for k := range whPiece / whChunk {
		f.send(0, k, honestPeer, nil)
	}
	for _, k := range []int{1, 3, 0, 2} { // out of order: chunks 1 and 3 wait for 0 and 2
		f.send(1, k, honestPeer, nil)
	}
	for i := range 2 {
		if err := f.check(i); err != nil {
			t.Fatalf("piece %d: %v", i, err)
		}
	}
	if f.readBacks != 0 || len(f.liars) != 0 {
		t.Fatalf("%d checks read their piece back, liars %v; want none", f.readBacks, f.liars)
	}
}

// TestCorruptChunkFailsTheWriteHash: a corrupt chunk, written in order or ahead of the hashed
// bytes, fails the check without a read back, and the peer that sent all of the piece is
// blamed, as when the piece is read back.
func TestCorruptChunkFailsTheWriteHash(t *testing.T) {
	f := newWriteHashFixture(t)
	bad := func(i, k int) []byte {
		b := bytes.Clone(f.data[i*whPiece+k*whChunk : i*whPiece+(k+1)*whChunk])
		b[7] ^= 0x40
		return b
	}
	for k := range whPiece / whChunk {
		var b []byte
		if k == 2 {
			b = bad(0, k)
		}
		f.send(0, k, lyingPeer, b)
	}
	if err := f.check(0); !errors.Is(err, errPieceCorrupt) {
		t.Fatalf("piece 0 with a corrupt chunk: %v, want errPieceCorrupt", err)
	}
	if len(f.liars) != 1 || f.liars[0] != lyingPeer {
		t.Fatalf("blamed %v, want [%v]: it sent every byte of the corrupt piece", f.liars, lyingPeer)
	}

	// Piece 1: the corrupt chunk comes ahead of the hashed bytes, from a second peer.
	f.send(1, 3, lyingPeer, bad(1, 3))
	for k := range 3 {
		f.send(1, k, honestPeer, nil)
	}
	if err := f.check(1); !errors.Is(err, errPieceCorrupt) {
		t.Fatalf("piece 1 with a corrupt chunk read back from the file: %v, want errPieceCorrupt", err)
	}
	if f.readBacks != 0 {
		t.Fatalf("%d checks read their piece back, want none", f.readBacks)
	}
	if len(f.liars) != 1 {
		t.Fatalf("blamed %v for a piece two peers sent", f.liars)
	}
}

// TestRewrittenChunkMakesTheCheckReadBack: a chunk written again (the torrent client asked
// another peer after a failure) may differ from what was hashed, so the check reads the piece
// back; the first sender's bad block is then found, as every liar is.
func TestRewrittenChunkMakesTheCheckReadBack(t *testing.T) {
	f := newWriteHashFixture(t)
	b := bytes.Clone(f.data[:whChunk])
	b[0] ^= 1
	f.send(0, 0, lyingPeer, b)
	f.send(0, 0, honestPeer, nil)
	for k := 1; k < whPiece/whChunk; k++ {
		f.send(0, k, honestPeer, nil)
	}
	if err := f.check(0); err != nil {
		t.Fatalf("piece whose bad chunk was written over: %v", err)
	}
	if f.readBacks != 1 {
		t.Fatalf("%d checks read their piece back, want 1", f.readBacks)
	}
	if len(f.liars) != 1 || f.liars[0] != lyingPeer {
		t.Fatalf("liars = %v, want [%v]", f.liars, lyingPeer)
	}
}

// TestFrozenPieceIsReadBack: a piece frozen mid-way gets its bytes by another path, so its
// check cannot trust a hash of its writes.
func TestFrozenPieceIsReadBack(t *testing.T) {
	f := newWriteHashFixture(t)
	f.send(0, 0, honestPeer, nil)
	f.st.freezePieces(0, 1)
	if _, err := f.st.file.WriteAt(f.data[:whPiece], 0); err != nil {
		t.Fatal(err)
	}
	if err := f.check(0); err != nil {
		t.Fatalf("frozen piece whose bytes came from upstream: %v", err)
	}
	if f.readBacks != 1 {
		t.Fatalf("%d checks read their piece back, want 1", f.readBacks)
	}
}

// TestWriteHashBlocksThatAreNotWrites: a recorded block that is not exactly one of the hashed
// writes cannot be judged from their checksums, so the check reads the piece back.
func TestWriteHashBlocksThatAreNotWrites(t *testing.T) {
	f := newWriteHashFixture(t)
	for k := range whPiece / whChunk {
		f.send(0, k, honestPeer, nil)
	}
	f.st.sent.record(0, 100, f.data[100:200], honestPeer)
	if err := f.check(0); err != nil {
		t.Fatal(err)
	}
	if f.readBacks != 1 {
		t.Fatalf("%d checks read their piece back, want 1", f.readBacks)
	}
}
