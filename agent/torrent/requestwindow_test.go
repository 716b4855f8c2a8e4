package torrent

import (
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
