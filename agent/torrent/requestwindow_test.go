package torrent

import (
	"net/netip"
	"reflect"
	"testing"

	"github.com/anacrolix/torrent"
)

// TestRequestWindowIsHeld checks that the torrent client still has the field the swarm writes to
// hold a connection's request window, and that the write lands on it.
func TestRequestWindowIsHeld(t *testing.T) {
	if !canHoldRequestWindow() {
		t.Fatal("torrent.PeerConn has no Peer.peakRequests int field: the request window cannot be held (see requestwindow.go)")
	}
	var pc torrent.PeerConn
	peak := reflect.ValueOf(&pc).Elem().FieldByName("Peer").FieldByName("peakRequests")
	for _, n := range []int{8, 5, 1} {
		holdRequestWindow(&pc, n)
		if got, want := 2*peak.Int(), int64(n); got < want || got > want+1 {
			t.Errorf("holdRequestWindow(%d): window 2 × peak = %d, want %d or %d", n, got, want, want+1)
		}
	}
}

// TestRequestWindowIsHeldDuringATransfer: a node downloads a blob from a peer that is itself
// downloading it, faster, from a seeder; every upload is slow. While the peer downloads, the
// node receives from it a "have" for about every two chunks it receives, the event that makes
// the client's own window shrink to one or two requests (see requestwindow.go). Every time a
// chunk arrives meanwhile, the node still has about RequestsPerConn requests outstanding at
// the peer, and never more: the request window is held, and capped by the queue the adapter
// makes the peer advertise (an odd RequestsPerConn, which the held window, twice its peak,
// would exceed by one without that cap).
func TestRequestWindowIsHeldDuringATransfer(t *testing.T) {
	const window = 7
	uploadRate := func(r int64) func(*Config) {
		return func(c *Config) {
			c.RequestsPerConn = window
			c.MaxUploadRate = r
		}
	}
	seeder := newTestNode(t, "127.0.0.2", uploadRate(512<<10))
	peer := newTestNode(t, "127.0.0.3", uploadRate(256<<10))
	node := newTestNode(t, "127.0.0.4", uploadRate(256<<10))
	// One chunk per piece: every chunk the peer receives completes a piece it announces.
	blob := newTestBlob(1, 2<<20, testChunkSize)
	seeder.seed(t, blob)
	tp, fp := peer.leech(t, blob)
	tn, fn := node.leech(t, blob)
	tp.AddPeers([]netip.AddrPort{seeder.addr})
	tn.AddPeers([]netip.AddrPort{peer.addr})
	waitComplete(t, tp, fp, blob.data)
	counts, _ := node.reqs.arrivals() // while the peer was downloading
	waitComplete(t, tn, fn, blob.data)

	held := 0
	for _, c := range counts {
		if c >= window-1 {
			held++
		}
	}
	t.Logf("%d chunks arrived while the peer downloaded, %d of them with at least %d requests outstanding", len(counts), held, window-1)
	if _, most := node.reqs.arrivals(); most > window {
		t.Errorf("a connection had %d requests outstanding, more than RequestsPerConn = %d", most, window)
	}
	if len(counts) < 16 {
		t.Fatalf("only %d chunks arrived while the peer downloaded: the test observed too little", len(counts))
	}
	// Held, 73-82 % of the chunks arrive with the window full (the rest at the ends of pieces
	// and of the transfer); without it the window is one or two requests and almost none do.
	// Half keeps that difference without failing on a busy machine.
	if held < len(counts)/2 {
		t.Errorf("only %d of %d chunks arrived with at least %d requests outstanding: the request window is not held", held, len(counts), window-1)
	}
}
