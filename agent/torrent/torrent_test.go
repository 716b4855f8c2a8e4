package torrent

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"testing"
	"time"
)

// readPiece reads piece i of blob through r, waiting until ctx ends.
func readPiece(ctx context.Context, r *Reader, blob testBlob, i int) ([]byte, error) {
	if _, err := r.Seek(int64(i)*blob.pieceLength, io.SeekStart); err != nil {
		return nil, err
	}
	got := make([]byte, len(blob.piece(i)))
	for n := 0; n < len(got); {
		k, err := r.ReadContext(ctx, got[n:])
		n += k
		if err != nil && n < len(got) {
			return got[:n], err
		}
	}
	return got, nil
}

// TestPieceCompletedByAnotherPathIsSeen: a node alone has a reader waiting for a piece; the
// piece's bytes are written into the blob's file by another path (as the swarm does with bytes
// from upstream) and CompleteIfHash marks it complete. The client then counts it complete and
// the reader returns its bytes, though no peer sent any. A piece whose bytes do not match is
// not completed, and MarkVerified completes the whole torrent.
func TestPieceCompletedByAnotherPathIsSeen(t *testing.T) {
	node := newTestNode(t, "127.0.0.2")
	blob := newTestBlob(3, 1<<20, 64<<10)
	tt, f := node.leech(t, blob)
	const piece = 3

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	r := tt.NewReader(ctx, 0)
	short, cancelShort := context.WithTimeout(ctx, 100*time.Millisecond)
	got, err := readPiece(short, r, blob, piece)
	cancelShort()
	if !errors.Is(err, context.DeadlineExceeded) || len(got) != 0 {
		t.Fatalf("read of a piece nobody has: %d bytes, %v; want nothing until the deadline", len(got), err)
	}

	type result struct {
		got []byte
		err error
	}
	read := make(chan result, 1)
	go func() {
		got, err := readPiece(ctx, r, blob, piece)
		read <- result{got, err}
		close(read)
	}()
	defer func() { // the reader closes once its read has ended
		cancel()
		for range read {
		}
		_ = r.Close()
	}()
	if _, err := f.WriteAt(blob.piece(piece), piece*blob.pieceLength); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(blob.piece(piece + 1)[1:], (piece+1)*blob.pieceLength+1); err != nil {
		t.Fatal(err) // piece+1 lacks its first byte
	}
	if tt.CompleteIfHash(piece+1, blob.hashes(piece, piece+1)) {
		t.Error("a piece completed with another piece's hash")
	}
	if !tt.CompleteIfHash(piece, blob.hashes(piece, piece+1)) {
		t.Fatal("a piece with its own hash not completed")
	}
	select {
	case res := <-read:
		if res.err != nil || string(res.got) != string(blob.piece(piece)) {
			t.Errorf("the reader read %d bytes (%v) that differ from the piece's", len(res.got), res.err)
		}
	case <-time.After(waitLimit):
		t.Fatalf("the reader did not see piece %d complete within %v", piece, waitLimit)
	}
	if !tt.PieceComplete(piece) || tt.PieceComplete(piece+1) {
		t.Errorf("pieces complete to the client: %d %v, %d %v; want true, false", piece, tt.PieceComplete(piece), piece+1, tt.PieceComplete(piece+1))
	}
	if got := tt.BytesCompleted(); got != blob.pieceLength {
		t.Errorf("%d bytes completed, want one piece, %d", got, blob.pieceLength)
	}

	if _, err := f.WriteAt(blob.data, 0); err != nil {
		t.Fatal(err)
	}
	tt.MarkVerified()
	waitComplete(t, tt, f, blob.data)
	if st := node.Stats(); st.PeerBytesRead != 0 {
		t.Errorf("%d bytes from peers, with no peer", st.PeerBytesRead)
	}
}

// TestKickMakesPeersSendAPiece: a node is connected to a seeder of a blob and wants every
// piece, but the client never learnt that one piece is incomplete (its hash reached the
// storage without the client being told), so nothing makes the client ask for it. Kick makes
// the client look at the piece again: the connected seeder is asked for it and the blob
// completes.
func TestKickMakesPeersSendAPiece(t *testing.T) {
	seeder, node := newTestNode(t, "127.0.0.2"), newTestNode(t, "127.0.0.3")
	blob := newTestBlob(4, 1<<20, 64<<10)
	const piece = 5
	seeder.seed(t, blob)
	file, f := testFile(t, len(blob.data), nil)
	tt, err := node.AddBlob(blob.name, int64(len(blob.data)), blob.pieceLength, file, nil)
	if err != nil {
		t.Fatal(err)
	}
	tt.SetHashes(0, blob.hashes(0, piece), AllIncomplete)
	tt.SetHashes(piece+1, blob.hashes(piece+1, blob.pieces()), AllIncomplete)
	tt.st.setHashes(piece, blob.hashes(piece, piece+1), AllIncomplete) // the client is not told
	tt.SetPriority(0, blob.pieces(), PriorityNormal)
	tt.AddPeers([]netip.AddrPort{seeder.addr})

	want := int64(len(blob.data)) - blob.pieceLength
	waitFor(t, "every other piece", func() bool { return tt.BytesCompleted() == want })
	if n := node.reqs.sentFor(piece); n != 0 || tt.PieceComplete(piece) {
		t.Fatalf("piece %d: %d requests, complete %v, before the kick; want none, false", piece, n, tt.PieceComplete(piece))
	}
	if !tt.Kick(piece) {
		t.Fatal("Kick of a piece known incomplete did nothing")
	}
	waitComplete(t, tt, f, blob.data)
	if node.reqs.sentFor(piece) == 0 {
		t.Errorf("piece %d completed with no request for it", piece)
	}
}

// TestLostPieceIsFetchedAgain: a complete node loses a piece (Lose): the client stops counting
// it complete and, the piece being wanted, asks a peer for it again.
func TestLostPieceIsFetchedAgain(t *testing.T) {
	seeder, node := newTestNode(t, "127.0.0.2"), newTestNode(t, "127.0.0.3")
	blob := newTestBlob(5, 1<<20, 64<<10)
	const piece = 7
	seeder.seed(t, blob)
	tt, f := node.leech(t, blob)
	tt.AddPeers([]netip.AddrPort{seeder.addr})
	waitComplete(t, tt, f, blob.data)
	before := node.reqs.sentFor(piece)

	if _, err := f.WriteAt(make([]byte, blob.pieceLength), piece*blob.pieceLength); err != nil {
		t.Fatal(err)
	}
	tt.Lose(piece)
	if tt.PieceComplete(piece) {
		t.Fatal("a lost piece is still complete")
	}
	// Two complete nodes drop their connection, which may happen only now, after Lose; the
	// swarm gives its peers again each time it asks for a segment, so the test does each poll.
	waitFor(t, "the lost piece to come again", func() bool {
		tt.AddPeers([]netip.AddrPort{seeder.addr})
		return tt.PieceComplete(piece)
	})
	waitComplete(t, tt, f, blob.data)
	if node.reqs.sentFor(piece) == before {
		t.Error("the lost piece completed again with no new request")
	}
}

// TestHorizonHoldsBackThePiecesBeyondIt: with the horizon at h, a node fetches the pieces before
// it and asks for none of those from h on, though its peer has them all; moving the horizon past
// the last piece fetches the rest.
func TestHorizonHoldsBackThePiecesBeyondIt(t *testing.T) {
	seeder, node := newTestNode(t, "127.0.0.2"), newTestNode(t, "127.0.0.3")
	blob := newTestBlob(6, 1<<20, 64<<10)
	const horizon = 5
	seeder.seed(t, blob)
	tt, f := node.leech(t, blob)
	tt.SetHorizon(horizon)
	tt.AddPeers([]netip.AddrPort{seeder.addr})
	waitFor(t, "the pieces before the horizon", func() bool {
		for i := range horizon {
			if !tt.PieceComplete(i) {
				return false
			}
		}
		return true
	})
	for i := horizon; i < blob.pieces(); i++ {
		if n := node.reqs.sentFor(i); n != 0 || tt.PieceComplete(i) {
			t.Errorf("piece %d beyond the horizon: %d requests, complete %v; want none, false", i, n, tt.PieceComplete(i))
		}
	}
	tt.SetHorizon(blob.pieces())
	waitComplete(t, tt, f, blob.data)
}
