package torrent

import (
	"encoding/binary"
	"syscall"

	"github.com/shoal-dev/shoal/internal/sockwater"
)

// The torrent client reads a connection through a 128 KiB buffer, and each read returns what
// the socket holds: on a link of tens of Mbit/s, a packet or two. A 64 KiB chunk then costs
// its receiver some thirty wakeups, reads and read deadlines, and at N = 16, 25 Mbit/s the
// connections' read loops were 45 % of the agents' CPU (cold, 256 MiB, -cpu-profile-seconds
// 30). The client can do nothing with part of a message: it reads a chunk's whole payload
// before it handles it. So while a piece message is arriving, wireWater raises the socket's low
// water mark to what is left of it (at most sockwater.Default): the read wakes once the rest is
// there, and never waits for a byte the peer has not committed to send. Between messages, and
// for every other message, the mark is 1: a have, a request or a keepalive is read at once.
//
// wireWater follows the stream by its framing: the 68-byte handshake, then messages of a 4-byte
// big-endian length and that many bytes, the first the message's id. A stream that does not
// start with the BitTorrent handshake (an encrypted one, say), or a message longer than any the
// client accepts, turns it off for good: the mark stays at 1, as without it.
type wireWater struct {
	sock syscall.RawConn
	mark int // the mark set on the socket

	off       bool
	handshake int     // handshake bytes still to come
	head      [5]byte // a message's length and id as they arrive
	headGot   int
	rem       int64 // bytes of the current message's payload still to come
	piece     bool  // the current message is a piece (id 7): a chunk's data
}

const (
	handshakeLen  = 1 + 19 + 8 + 20 + 20
	pieceMsgID    = 7
	maxMessageLen = 1<<20 + 13 // more than any chunk this client sends or accepts, with its header
	// minWater is the least of a piece message left for which the mark is raised: below it the
	// read costs what the setsockopt would.
	minWater = 8 << 10
)

func newWireWater(sock syscall.RawConn) *wireWater {
	return &wireWater{sock: sock, mark: 1, handshake: handshakeLen, off: sock == nil}
}

// before sets the mark for the next read.
func (w *wireWater) before() {
	want := 1
	if !w.off && w.headGot == 0 && w.piece && w.rem >= minWater {
		want = int(min(w.rem, sockwater.Default))
	}
	if want != w.mark {
		sockwater.Set(w.sock, want)
		w.mark = want
	}
}

// after follows the stream through the bytes a read returned.
func (w *wireWater) after(b []byte) {
	for len(b) > 0 && !w.off {
		switch {
		case w.handshake > 0:
			if w.handshake == handshakeLen && b[0] != 19 {
				w.stop()
				return
			}
			n := min(w.handshake, len(b))
			w.handshake -= n
			b = b[n:]
		case w.rem > 0:
			n := min(w.rem, int64(len(b)))
			w.rem -= n
			b = b[n:]
		default:
			n := copy(w.head[w.headGot:], b)
			b = b[n:]
			w.headGot += n
			if w.headGot >= 4 && binary.BigEndian.Uint32(w.head[:4]) == 0 {
				// A keepalive: no id; its fifth byte, if read, is the next message's.
				extra := w.headGot - 4
				copy(w.head[:], w.head[4:4+extra])
				w.headGot = extra
				continue
			}
			if w.headGot < 5 {
				continue
			}
			length := int64(binary.BigEndian.Uint32(w.head[:4]))
			if length > maxMessageLen {
				w.stop()
				return
			}
			w.piece, w.rem, w.headGot = w.head[4] == pieceMsgID, length-1, 0
		}
	}
}

// stop turns the mark off for good.
func (w *wireWater) stop() {
	w.off = true
	if w.mark != 1 {
		sockwater.Set(w.sock, 1)
		w.mark = 1
	}
}
