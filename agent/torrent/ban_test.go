package torrent

import (
	"bytes"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/anacrolix/torrent"
)

// testClock is a clock that moves only when told.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// TestCorruptPieceBanExpires: a node downloads a blob from a single peer, which sends one piece
// corrupt. The node bans the peer (its own ban, reported by OnBan; the torrent client bans
// nobody itself, for good), and the piece stays incomplete. The peer is repaired; once the
// ban has run out, it connects again and delivers the piece, and the blob completes.
func TestCorruptPieceBanExpires(t *testing.T) {
	clock := &testClock{now: time.Now()}
	liar := newTestNode(t, "127.0.0.2")
	node := newTestNode(t, "127.0.0.3", func(c *Config) { c.now = clock.Now })
	blob := newTestBlob(9, 1<<20, 64<<10)
	const piece = 6
	corrupt := bytes.Clone(blob.data)
	corrupt[piece*blob.pieceLength+100] ^= 0xff
	liarFile, lf := testFile(t, len(blob.data), corrupt)
	lt := liar.add(t, blob, liarFile, AllComplete)
	tn, fn := node.leech(t, blob)
	tn.AddPeers([]netip.AddrPort{liar.addr})

	waitFor(t, "a ban", func() bool { return len(node.banned()) > 0 })
	if got := node.banned(); !slices.Equal(got, []netip.Addr{liar.addr.Addr()}) {
		t.Fatalf("banned %v, want [%v]", got, liar.addr.Addr())
	}
	if !node.IsBanned(liar.addr.Addr()) {
		t.Fatal("the peer that sent a corrupt piece is not banned")
	}
	if ips := node.c.BadPeerIPs(); len(ips) != 0 {
		t.Fatalf("the torrent client banned %v itself, for the rest of its life", ips)
	}
	waitFor(t, "the banned peer's connection to close", func() bool { return tn.Stats().PeerConns == 0 })
	if n := tn.t.AddPeers([]torrent.PeerInfo{{Addr: liar.addr, Source: torrent.PeerSourceDirect}}); n != 0 {
		t.Error("the torrent client takes a banned peer's address (the block list is not consulted)")
	}
	if tn.PieceComplete(piece) {
		t.Fatal("the corrupt piece is complete")
	}
	if st := node.Stats(); st.PiecesBad == 0 {
		t.Error("no bad piece counted")
	}

	if _, err := lf.WriteAt(blob.piece(piece), piece*blob.pieceLength); err != nil {
		t.Fatal(err) // the peer is repaired
	}
	clock.Advance(banDuration - time.Second)
	if !node.IsBanned(liar.addr.Addr()) {
		t.Fatal("the ban ran out early")
	}
	clock.Advance(2 * time.Second)
	if node.IsBanned(liar.addr.Addr()) {
		t.Fatal("the ban has not run out")
	}
	// The peer restarts: its side of the banned connection is gone too. Were it still open, the
	// client there would keep it and drop the new one as a duplicate of the same peer ID
	// (DropDuplicatePeerIds), and this node, given the address once, would not dial again.
	waitFor(t, "the peer's side of the banned connection to close", func() bool { return lt.Stats().PeerConns == 0 })
	before := node.heardFrom(liar.addr.Addr())
	tn.AddPeers([]netip.AddrPort{liar.addr})
	waitComplete(t, tn, fn, blob.data)
	if node.heardFrom(liar.addr.Addr()) == before {
		t.Error("the blob completed without data from the repaired peer")
	}
	if got := node.banned(); len(got) != 1 {
		t.Errorf("bans reported: %v, want the first one only", got)
	}
}
