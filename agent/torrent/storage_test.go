package torrent

import (
	"bytes"
	"crypto/sha1" //nolint:gosec // BitTorrent v1 piece hashes
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/anacrolix/torrent/metainfo"
	"github.com/anacrolix/torrent/storage"
)

// newTestStorage returns a blob storage over a file holding data, cut into pieces of pieceLength.
func newTestStorage(t *testing.T, data []byte, pieceLength int64) (*blobStorage, func(i int) storage.PieceImpl) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "blob"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	n := int((int64(len(data)) + pieceLength - 1) / pieceLength)
	st := newBlobStorage(NewFile(f, f, f), n)
	info := metainfo.Info{PieceLength: pieceLength, Length: int64(len(data)), Pieces: make([]byte, n*sha1Size)}
	impl, err := st.OpenTorrent(t.Context(), &info, metainfo.Hash{})
	if err != nil {
		t.Fatal(err)
	}
	return st, func(i int) storage.PieceImpl { return impl.Piece(info.Piece(i)) }
}

func pieceHashes(data []byte, pieceLength int) []byte {
	var out []byte
	for off := 0; off < len(data); off += pieceLength {
		sum := sha1.Sum(data[off:min(off+pieceLength, len(data))]) //nolint:gosec // see import
		out = append(out, sum[:]...)
	}
	return out
}

// TestBlobStorageKnowsNothingBeforeHashes: a piece whose hash has not arrived is neither complete
// nor incomplete to the torrent client (so it is never requested), cannot verify, and the
// client's verdict on it is ignored.
func TestBlobStorageKnowsNothingBeforeHashes(t *testing.T) {
	const pl = 16 << 10
	data := bytes.Repeat([]byte("shoal"), 4*pl/5)
	st, piece := newTestStorage(t, data, pl)
	hasher := func(i int) storage.SelfHashing {
		h, ok := piece(i).(storage.SelfHashing)
		if !ok {
			t.Fatal("a blob piece does not hash itself")
		}
		return h
	}
	if c := piece(1).Completion(); c.Ok {
		t.Fatalf("completion of a piece without hash = %+v, want unknown", c)
	}
	if _, err := hasher(1).SelfHash(); !errors.Is(err, errHashUnknown) {
		t.Fatalf("SelfHash without hash: %v, want errHashUnknown", err)
	}
	if err := piece(1).MarkNotComplete(); err != nil {
		t.Fatal(err)
	}
	if c := piece(1).Completion(); c.Ok {
		t.Fatalf("completion after the client's verdict without hash = %+v, want unknown", c)
	}

	// The hashes of pieces 2 and 3 arrive (a segment).
	st.setHashes(2, pieceHashes(data[2*pl:], pl), AllIncomplete)
	if c := piece(2).Completion(); !c.Ok || c.Complete {
		t.Fatalf("completion of a fresh piece with hash = %+v, want known incomplete", c)
	}
	if c := piece(1).Completion(); c.Ok {
		t.Fatalf("piece 1 became known with piece 2's hashes: %+v", c)
	}
	for i := 2; i < 4; i++ {
		sum, err := hasher(i).SelfHash()
		if err != nil || sum != placeholderHash {
			t.Fatalf("SelfHash of good piece %d = %x, %v; want the placeholder", i, sum, err)
		}
	}
	// Corrupt piece 3 on disk: it no longer verifies.
	if _, err := st.file.WriteAt([]byte{data[3*pl] ^ 1}, 3*pl); err != nil {
		t.Fatal(err)
	}
	if sum, err := hasher(3).SelfHash(); !errors.Is(err, errPieceCorrupt) || sum == placeholderHash {
		t.Fatalf("SelfHash of a corrupted piece = %x, %v; want errPieceCorrupt", sum, err)
	}
}

// TestKickLeavesVerdictsAlone: a kick (blob.kick) makes an incomplete piece's completion unknown
// and then known again, and touches neither a complete piece, nor one without a hash, nor a
// piece the torrent client judged in between.
func TestKickLeavesVerdictsAlone(t *testing.T) {
	const pl = 16 << 10
	data := bytes.Repeat([]byte("kick"), 4*pl/4)
	st, piece := newTestStorage(t, data, pl)
	if st.forgetIncomplete(0) {
		t.Fatal("forgot the completion of a piece without hash")
	}
	st.setHashes(0, pieceHashes(data[:2*pl], pl), AllIncomplete)
	st.setHashes(2, pieceHashes(data[2*pl:], pl), AllComplete)
	if st.forgetIncomplete(2) {
		t.Fatal("forgot the completion of a complete piece")
	}
	if c := piece(2).Completion(); !c.Ok || !c.Complete {
		t.Fatalf("complete piece after a refused kick: %+v", c)
	}

	if !st.forgetIncomplete(0) {
		t.Fatal("did not forget an incomplete piece")
	}
	if c := piece(0).Completion(); c.Ok {
		t.Fatalf("kicked piece: %+v, want unknown", c)
	}
	st.restoreIncomplete(0)
	if c := piece(0).Completion(); !c.Ok || c.Complete {
		t.Fatalf("kicked piece restored: %+v, want known incomplete", c)
	}

	// The client verifies piece 1 while it is forgotten: the restore keeps the verdict.
	if !st.forgetIncomplete(1) {
		t.Fatal("did not forget an incomplete piece")
	}
	if err := piece(1).MarkComplete(); err != nil {
		t.Fatal(err)
	}
	st.restoreIncomplete(1)
	if c := piece(1).Completion(); !c.Ok || !c.Complete {
		t.Fatalf("piece verified during a kick: %+v, want complete", c)
	}
}

// TestLiarsAreFoundOnceThePieceVerifies: two peers sent blocks of one piece, one of them bad.
// The piece fails and nobody can be blamed yet; once a good copy verifies, the peer whose block
// differs from it is named, and the honest one is not.
func TestLiarsAreFoundOnceThePieceVerifies(t *testing.T) {
	const pl, block = 64 << 10, 16 << 10
	data := make([]byte, 2*pl)
	for i := range data {
		data[i] = byte(i * 7)
	}
	st, piece := newTestStorage(t, data, pl)
	st.setHashes(0, pieceHashes(data, pl), AllIncomplete)
	var liars []netip.Addr
	st.onLiar = func(a netip.Addr) { liars = append(liars, a) }
	honest, liar := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")

	// Piece 1: blocks 0-2 from the honest peer, block 3 from the liar, whose bytes land on disk.
	bad := bytes.Clone(data[pl+3*block : 2*pl])
	bad[5] ^= 0xff
	for k := range 3 {
		st.sent.record(1, int64(k*block), data[pl+k*block:pl+(k+1)*block], honest)
	}
	st.sent.record(1, 3*block, bad, liar)
	if _, err := st.file.WriteAt(bad, pl+3*block); err != nil {
		t.Fatal(err)
	}
	hasher, ok := piece(1).(storage.SelfHashing)
	if !ok {
		t.Fatal("a blob piece does not hash itself")
	}
	if sum, err := hasher.SelfHash(); !errors.Is(err, errPieceCorrupt) || sum == placeholderHash {
		t.Fatalf("corrupted piece: %x, %v; want errPieceCorrupt", sum, err)
	}
	if len(liars) != 0 {
		t.Fatalf("blamed %v before any copy of the piece verified", liars)
	}

	// The block comes again, from the honest peer this time, and the piece verifies.
	st.sent.record(1, 3*block, data[pl+3*block:2*pl], honest)
	if _, err := st.file.WriteAt(data[pl+3*block:2*pl], pl+3*block); err != nil {
		t.Fatal(err)
	}
	if sum, err := hasher.SelfHash(); err != nil || sum != placeholderHash {
		t.Fatalf("good piece did not verify: %x, %v", sum, err)
	}
	if len(liars) != 1 || liars[0] != liar {
		t.Fatalf("liars = %v, want [%v]", liars, liar)
	}
	if n := len(st.sent.of(1)); n != 0 {
		t.Errorf("%d blocks still recorded for a verified piece", n)
	}
}

// TestSoleSenderOfACorruptPieceIsBlamedAtOnce: a piece that fails its check, every byte of
// which one peer sent, names that peer at once, and only once; a failed piece whose bytes came
// from two peers names nobody, and neither does a failed piece that one peer sent only part of
// (the rest came by another path).
func TestSoleSenderOfACorruptPieceIsBlamedAtOnce(t *testing.T) {
	const pl, block = 64 << 10, 16 << 10
	data := make([]byte, 3*pl)
	for i := range data {
		data[i] = byte(i * 11)
	}
	st, piece := newTestStorage(t, data, pl)
	st.setHashes(0, pieceHashes(data, pl), AllIncomplete)
	var liars []netip.Addr
	bad := 0
	st.onLiar = func(a netip.Addr) { liars = append(liars, a) }
	st.onBadPiece = func() { bad++ }
	honest, liar := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	corrupt := func(i int) []byte {
		b := bytes.Clone(data[i*pl : (i+1)*pl])
		b[pl-1] ^= 0xff
		if _, err := st.file.WriteAt(b, int64(i*pl)); err != nil {
			t.Fatal(err)
		}
		return b
	}
	check := func(i int) {
		t.Helper()
		h, ok := piece(i).(storage.SelfHashing)
		if !ok {
			t.Fatal("a blob piece does not hash itself")
		}
		if _, err := h.SelfHash(); !errors.Is(err, errPieceCorrupt) {
			t.Fatalf("piece %d: %v, want errPieceCorrupt", i, err)
		}
	}

	// Piece 0: every block from the liar, the first one twice (once with other bytes, since
	// overwritten).
	b := corrupt(0)
	st.sent.record(0, 0, make([]byte, block), liar)
	for k := range pl / block {
		st.sent.record(0, int64(k*block), b[k*block:(k+1)*block], liar)
	}
	check(0)
	if len(liars) != 1 || liars[0] != liar || bad != 1 {
		t.Fatalf("blamed %v for a piece only %v sent, %d bad pieces counted", liars, liar, bad)
	}
	check(0) // its blocks are forgotten: blamed once
	if len(liars) != 1 {
		t.Fatalf("blamed %v for the same blocks twice", liars)
	}

	// Piece 1: blocks from both peers.
	b = corrupt(1)
	for k := range pl / block {
		from := honest
		if k == pl/block-1 {
			from = liar
		}
		st.sent.record(1, int64(k*block), b[k*block:(k+1)*block], from)
	}
	check(1)
	// Piece 2: the liar sent its first block only.
	b = corrupt(2)
	st.sent.record(2, 0, b[:block], liar)
	check(2)
	if len(liars) != 1 {
		t.Fatalf("blamed %v, though no peer sent all of pieces 1 or 2", liars)
	}
}

// TestSentBlocksAreBounded: a piece that keeps failing keeps only its most recent blocks.
func TestSentBlocksAreBounded(t *testing.T) {
	var s sentBlocks
	peer := netip.MustParseAddr("10.0.0.1")
	for k := range 10 * maxSentBlocks {
		s.record(0, int64(k), []byte{byte(k)}, peer)
	}
	blocks := s.of(0)
	if len(blocks) > maxSentBlocks {
		t.Fatalf("%d blocks kept, want at most %d", len(blocks), maxSentBlocks)
	}
	if last := blocks[len(blocks)-1]; last.offset != 10*maxSentBlocks-1 {
		t.Fatalf("last block kept is at %d, want the most recent", last.offset)
	}
}

// TestBlockCheckerAcrossWrites: a piece's bytes may come in writes that do not line up with the
// recorded blocks; each block's checksum is still that of its own bytes.
func TestBlockCheckerAcrossWrites(t *testing.T) {
	data := make([]byte, 1000)
	for i := range data {
		data[i] = byte(i * 13)
	}
	honest, liar := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	var s sentBlocks
	s.record(0, 0, data[:300], honest)
	s.record(0, 300, data[300:700], honest)
	bad := bytes.Clone(data[700:])
	bad[0] ^= 1
	s.record(0, 700, bad, liar)
	check := newBlockChecker(s.of(0))
	for off := 0; off < len(data); off += 128 {
		if _, err := check.Write(data[off:min(off+128, len(data))]); err != nil {
			t.Fatal(err)
		}
	}
	if got := check.liars(); len(got) != 1 || got[0] != liar {
		t.Fatalf("liars = %v, want [%v]", got, liar)
	}
}
