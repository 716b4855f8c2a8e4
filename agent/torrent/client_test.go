package torrent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// verifiedVersion is the version of github.com/anacrolix/torrent whose internals this package
// was checked against (requestwindow.go, Kick, refreshPriorities, log.go, ban.go).
const verifiedVersion = "v1.62.0"

// TestClientVersionIsTheVerifiedOne fails when the torrent client's version changes: every
// workaround in this package leans on its internals, so an upgrade must re-verify each (their
// behaviour tests, the swarm's tests and make bench) before this constant moves.
func TestClientVersionIsTheVerifiedOne(t *testing.T) {
	// Tests run in the package's directory; go.mod is two levels up.
	data, err := os.ReadFile(filepath.Join("..", "..", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*github\.com/anacrolix/torrent\s+(\S+)`).FindSubmatch(data)
	if m == nil {
		t.Fatal("go.mod does not require github.com/anacrolix/torrent")
	}
	if got := string(m[1]); got != verifiedVersion {
		t.Fatalf("go.mod requires github.com/anacrolix/torrent %s, the workarounds here were verified on %s: re-verify them, then update verifiedVersion", got, verifiedVersion)
	}
}

// TestDataFromPeersIsReported: two nodes trade the halves of a blob over one connection, which
// one of them dialled and the other accepted (the client holds the peer's address as a
// different type in each case, see peerIP). Each node reports data from the other's IP.
func TestDataFromPeersIsReported(t *testing.T) {
	a, b := newTestNode(t, "127.0.0.2"), newTestNode(t, "127.0.0.3")
	blob := newTestBlob(8, 1<<20, 64<<10)
	half := blob.pieces() / 2
	split := int64(half) * blob.pieceLength
	fileA, fa := testFile(t, len(blob.data), blob.data[:split])
	fileB, fb := testFile(t, len(blob.data), nil)
	if _, err := fb.WriteAt(blob.data[split:], split); err != nil {
		t.Fatal(err)
	}
	ta := a.add(t, blob, fileA, AllIncomplete)
	ta.SetHashes(0, blob.hashes(0, half), AllComplete)
	tb := b.add(t, blob, fileB, AllIncomplete)
	tb.SetHashes(half, blob.hashes(half, blob.pieces()), AllComplete)
	ta.AddPeers([]netip.AddrPort{b.addr}) // a dials, b accepts
	waitComplete(t, ta, fa, blob.data)
	waitComplete(t, tb, fb, blob.data)
	if a.heardFrom(b.addr.Addr()) == 0 || b.heardFrom(a.addr.Addr()) == 0 {
		t.Errorf("data reported from the peer it dialled: %d times, from the peer it accepted: %d times; want both",
			a.heardFrom(b.addr.Addr()), b.heardFrom(a.addr.Addr()))
	}
}

// TestBansExpire: a banned peer is refused until its ban runs out, then admitted again (a
// repaired member must not stay banned until every agent restarts).
func TestBansExpire(t *testing.T) {
	var b bannedIPs
	peer := netip.MustParseAddr("10.0.0.9")
	if !b.add(peer, time.Now().Add(time.Hour)) {
		t.Fatal("first ban not reported as new")
	}
	if b.add(peer, time.Now().Add(time.Hour)) {
		t.Error("a second ban while banned reported as new")
	}
	if _, blocked := b.Lookup(peer.AsSlice()); !blocked {
		t.Error("a banned peer is not blocked")
	}
	b.add(peer, time.Now().Add(-time.Second)) // as if the ban had run out
	if _, blocked := b.Lookup(peer.AsSlice()); blocked {
		t.Error("a peer whose ban ran out is still blocked")
	}
	if !b.add(peer, time.Now().Add(time.Hour)) {
		t.Error("banning again after expiry not reported as new")
	}
}

// TestNonMembersAreBlocked: the client's block list refuses the IPs Allowed refuses (in the
// IPv4-in-IPv6 form the client hands it, too) as well as banned peers, and nobody else.
func TestNonMembersAreBlocked(t *testing.T) {
	member, stranger := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	banned := &bannedIPs{}
	list := blocklist{banned: banned, allowed: func(a netip.Addr) bool { return a == member }}
	for _, tt := range []struct {
		ip   net.IP
		want bool
	}{
		{net.IP(member.AsSlice()), false},
		{net.ParseIP(member.String()), false}, // 16 bytes, as the client holds IPv4 addresses
		{net.IP(stranger.AsSlice()), true},
		{net.ParseIP(stranger.String()), true},
	} {
		if _, blocked := list.Lookup(tt.ip); blocked != tt.want {
			t.Errorf("Lookup(%v) blocked = %v, want %v", tt.ip, blocked, tt.want)
		}
	}
	banned.add(member, time.Now().Add(time.Hour))
	if _, blocked := list.Lookup(member.AsSlice()); !blocked {
		t.Error("a banned member is not blocked")
	}
	if _, blocked := (blocklist{banned: &bannedIPs{}}).Lookup(stranger.AsSlice()); blocked {
		t.Error("without Allowed, an IP nobody banned is blocked")
	}
}

// TestPeersNoLongerAllowedAreDisconnected: CloseDisallowed drops the connection of a peer that
// Allowed refuses from then on (a member that left), in the middle of a transfer, and a peer
// allowed again can connect again.
func TestPeersNoLongerAllowedAreDisconnected(t *testing.T) {
	blob := newTestBlob(11, 2<<20, 64<<10)
	leecherIP := netip.MustParseAddr("127.0.0.3")
	var left atomic.Bool
	seeder := newTestNode(t, "127.0.0.2", func(c *Config) {
		c.MaxUploadRate = 256 << 10 // the transfer lasts seconds
		c.Allowed = func(a netip.Addr) bool { return !left.Load() || a != leecherIP }
	})
	leecher := newTestNode(t, leecherIP.String())
	ts := seeder.seed(t, blob)
	tl, fl := leecher.leech(t, blob)
	tl.AddPeers([]netip.AddrPort{seeder.addr})
	waitFor(t, "data from the seeder", func() bool { return leecher.heardFrom(seeder.addr.Addr()) > 0 })

	left.Store(true)
	seeder.CloseDisallowed()
	var complete bool
	waitFor(t, "the seeder to drop its connection to the peer that left", func() bool {
		complete = tl.BytesCompleted() == int64(len(blob.data)) // the client drops connections between complete peers
		return ts.Stats().PeerConns == 0
	})
	if complete {
		t.Fatal("the peer that left had the whole blob when its connection was dropped: the test shows nothing")
	}

	left.Store(false)
	// The client ignores a peer it is connected to: the leecher must have seen the drop first.
	waitFor(t, "the leecher to see its connection dropped", func() bool { return tl.Stats().PeerConns == 0 })
	tl.AddPeers([]netip.AddrPort{seeder.addr}) // as the swarm's announces would
	waitComplete(t, tl, fl, blob.data)
}

// TestPauseStopsDownloadsUntilResume pauses and resumes a node three times while it downloads
// a blob from a slow seeder, with a reader following the blob and pieces arriving by another
// path while it is paused (as when the swarm fetches a segment from upstream). While paused
// the node sends no request and receives at most the chunks it had asked for before, while a
// second node, not paused, keeps receiving from the same seeder (so the pause lasted while data
// flowed), and a read of a missing piece fails at once rather than at its deadline (the swarm's
// reader relies on it). The client does not panic on Resume (see Client.Pause), and the blob
// completes with the seeder's bytes, which the reader read. Each pause lasts past the seeder's
// rejections of the cancelled requests: a Resume before the last of them arrives leaves the
// connection idle until another event (v1.62.0 issues no request on the update a rejection
// triggers), which Client.Pause does not handle yet.
func TestPauseStopsDownloadsUntilResume(t *testing.T) {
	const window = 8
	blob := newTestBlob(2, 4<<20, 64<<10)
	seeder := newTestNode(t, "127.0.0.2", func(c *Config) { c.MaxUploadRate = 1 << 20 })
	node := newTestNode(t, "127.0.0.3", func(c *Config) { c.RequestsPerConn = window })
	witness := newTestNode(t, "127.0.0.4")
	seeder.seed(t, blob)
	tn, fn := node.leech(t, blob)
	tw, _ := witness.leech(t, blob)
	tn.AddPeers([]netip.AddrPort{seeder.addr})
	tw.AddPeers([]netip.AddrPort{seeder.addr})

	read := make(chan []byte, 1)
	go func() {
		r := tn.NewReader(t.Context(), 4*blob.pieceLength)
		defer r.Close()
		got := make([]byte, 0, len(blob.data))
		buf := make([]byte, 32<<10)
		for len(got) < len(blob.data) && t.Context().Err() == nil {
			n, err := r.ReadContext(t.Context(), buf)
			got = append(got, buf[:n]...)
			if err != nil && n == 0 {
				time.Sleep(10 * time.Millisecond) // paused: the torrent reader fails at once
			}
		}
		read <- got
	}()

	received := func(n *testNode) int64 { return n.Stats().PeerBytesRead }
	otherPath := blob.pieces() - 1 // pieces from the end arrive by another path
	for cycle := range 3 {
		before := received(node)
		waitFor(t, "the node to receive 256 KiB", func() bool { return received(node) >= before+256<<10 })
		node.Pause()
		sent, got, witnessGot := node.reqs.sentSoFar(), received(node), received(witness)
		for range 2 {
			if _, err := fn.WriteAt(blob.piece(otherPath), int64(otherPath)*blob.pieceLength); err != nil {
				t.Fatal(err)
			}
			if !tn.CompleteIfHash(otherPath, blob.hashes(otherPath, otherPath+1)) {
				t.Fatalf("piece %d written with its bytes not completed", otherPath)
			}
			otherPath--
		}
		// The swarm's reader relies on a read failing at once while paused, not at its deadline.
		wait, cancel := context.WithTimeout(t.Context(), waitLimit)
		missing := 0
		for tn.PieceComplete(missing) {
			missing++
		}
		r := tn.NewReader(wait, 0)
		if _, err := r.Seek(int64(missing)*blob.pieceLength, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		if n, err := r.ReadContext(wait, make([]byte, 1)); err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("pause %d: a read of a missing piece returned %d bytes, %v; want a failure before its deadline", cycle, n, err)
		}
		_ = r.Close()
		cancel()
		waitFor(t, "the witness to receive 256 KiB", func() bool { return received(witness) >= witnessGot+256<<10 })
		t.Logf("pause %d: the node received %d bytes, the witness %d", cycle, received(node)-got, received(witness)-witnessGot)
		if n := node.reqs.sentSoFar() - sent; n != 0 {
			t.Errorf("pause %d: %d requests sent while paused", cycle, n)
		}
		if n := received(node) - got; n > window*testChunkSize {
			t.Errorf("pause %d: %d bytes received while paused, more than the %d requests outstanding at most when it began", cycle, n, window)
		}
		node.Resume()
	}
	waitComplete(t, tn, fn, blob.data)
	if got := <-read; string(got) != string(blob.data) {
		t.Errorf("the reader read %d bytes that differ from the blob's %d", len(got), len(blob.data))
	}
	if got := tw.Stats().PeerBytesRead; got == 0 {
		t.Error("the witness received nothing")
	}
}

// TestQuickPauseResumeKeepsTransferring: a swarm node pauses for each segment it fetches from
// the registry, which on a fast link lasts well under a round trip. A Resume that comes before
// the peer has answered the cancels of Pause must leave the connection requesting: with the
// fast extension the client waited for the peer's rejections, then asked for nothing more.
func TestQuickPauseResumeKeepsTransferring(t *testing.T) {
	blob := newTestBlob(2, 4<<20, 64<<10)
	seeder := newTestNode(t, "127.0.0.2", func(c *Config) { c.MaxUploadRate = 1 << 20 })
	node := newTestNode(t, "127.0.0.3")
	seeder.seed(t, blob)
	tn, fn := node.leech(t, blob)
	tn.AddPeers([]netip.AddrPort{seeder.addr})
	for cycle := range 5 {
		before := node.Stats().PeerBytesRead
		waitFor(t, fmt.Sprintf("256 KiB more after %d quick pauses", cycle), func() bool {
			return node.Stats().PeerBytesRead >= before+256<<10
		})
		node.Pause()
		node.Resume()
	}
	waitComplete(t, tn, fn, blob.data)
}

// TestCloseEndsItsGoroutines: a resumed download verifies its pieces in the background (see
// SetHashes); Close returns only once that goroutine, and any the adapter runs until the
// torrent client closes, have ended.
func TestCloseEndsItsGoroutines(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := NewClient(Config{Dir: t.TempDir(), Self: netip.MustParseAddrPort("127.0.0.2:0"), Listener: l,
		ChunkSize: testChunkSize, RequestsPerConn: 8, MaxPeerRequests: 1024, ConnsPerTorrent: 8})
	if err != nil {
		t.Fatal(err)
	}
	blob := newTestBlob(10, 8<<20, 16<<10)
	file, _ := testFile(t, len(blob.data), blob.data)
	tt, err := c.AddBlob(blob.name, int64(len(blob.data)), blob.pieceLength, file, nil)
	if err != nil {
		t.Fatal(err)
	}
	tt.SetHashes(0, blob.hashes(0, blob.pieces()), UnknownCompletion)
	// A goroutine that is slow to end after the torrent closes: were Close not to wait for it,
	// Close would return first.
	var ended atomic.Bool
	c.goBackground(func() {
		<-tt.Closed()
		time.Sleep(50 * time.Millisecond)
		ended.Store(true)
	})
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if !ended.Load() {
		t.Error("Close returned before a goroutine of the adapter ended")
	}
	buf := make([]byte, 1<<20)
	if stacks := string(buf[:runtime.Stack(buf, true)]); strings.Contains(stacks, "agent/torrent.(*Torrent).SetHashes") {
		t.Errorf("a verification goroutine is still running after Close:\n%s", stacks)
	}
}
