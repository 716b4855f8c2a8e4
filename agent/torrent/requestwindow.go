package torrent

import (
	"reflect"
	"unsafe"

	"github.com/anacrolix/torrent"
)

// The torrent client (anacrolix/torrent v1.62.0) keeps at most
//
//	min(the peer's advertised queue, 2 × peak, ...)
//
// requests outstanding on a connection, where peak is the number of requests its last request
// update issued. It updates a connection's requests when the connection runs empty and also on
// other events, most often a "have" from the peer, which in a swarm arrives about as often as a
// chunk does. An update that finds the window nearly full issues one request or none, so peak
// falls to 1 or 0 and the window to 2 or 1: a connection drifts to one or two 64 KiB requests in
// flight and waits a round trip for each. On an idle link that costs little; on a node whose
// uplink is full, its requests and acknowledgements queue behind its uploads (up to 50 ms each
// way in the testbed) and the node receives at a fraction of its link while others receive at
// the full rate (swarm.md, "The request window is held at 512 KiB"). At N = 32 cold, in runs
// back to back: p99 1.62 × S/B with the client's window, 1.56 with the window held at
// requestsPerConn; with it held at 4 or 16 requests, 1.63 and 1.61.
//
// The window has no setting, so the swarm holds peak at the window it wants before the client
// handles each message a peer sends (the ReadMessage callback, called with the client's lock
// held, as every use of peak is). That writes an unexported field of the client, found once by
// reflection: the client's version is pinned in go.mod, TestRequestWindowIsHeld fails if an
// upgrade renames or retypes the field, and TestRequestWindowIsHeldDuringATransfer if the field
// no longer sets the window. If it is ever missing at run time, the swarm logs a
// warning and runs with the client's own window.

// peakRequestsOffset is the offset of the request window's peak in torrent.PeerConn, or
// ^uintptr(0) if the client has no such field.
var peakRequestsOffset = func() uintptr {
	peer, ok := reflect.TypeFor[torrent.PeerConn]().FieldByName("Peer")
	if !ok || peer.Type.Kind() != reflect.Struct {
		return ^uintptr(0)
	}
	peak, ok := peer.Type.FieldByName("peakRequests")
	if !ok || peak.Type.Kind() != reflect.Int {
		return ^uintptr(0)
	}
	return peer.Offset + peak.Offset
}()

// canHoldRequestWindow reports whether holdRequestWindow can work with this torrent client.
func canHoldRequestWindow() bool { return peakRequestsOffset != ^uintptr(0) }

// holdRequestWindow makes the connection's next request update keep up to n requests
// outstanding (still capped by the queue the peer advertises). The caller holds the client's
// lock.
func holdRequestWindow(pc *torrent.PeerConn, n int) {
	if !canHoldRequestWindow() {
		return
	}
	// The window is min(advertised queue, 2 × peak).
	*(*int)(unsafe.Add(unsafe.Pointer(pc), peakRequestsOffset)) = (n + 1) / 2
}
