package torrent

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"
)

// wireStream is a BitTorrent stream as a peer sends it, with where each piece message's payload
// lies in it.
type wireStream struct {
	b        []byte
	payloads [][2]int // [start, end) of each piece message's payload
}

func (s *wireStream) message(id byte, payload int) {
	var head [5]byte
	binary.BigEndian.PutUint32(head[:4], uint32(1+payload))
	head[4] = id
	s.b = append(s.b, head[:]...)
	if id == pieceMsgID {
		s.payloads = append(s.payloads, [2]int{len(s.b), len(s.b) + payload})
	}
	s.b = append(s.b, make([]byte, payload)...)
}

func (s *wireStream) keepalive() { s.b = append(s.b, 0, 0, 0, 0) }

// left is how many bytes of a piece message's payload are still to come at pos (0: pos is not
// inside one).
func (s *wireStream) left(pos int) int {
	for _, p := range s.payloads {
		if pos >= p[0] && pos < p[1] {
			return p[1] - pos
		}
	}
	return 0
}

// A connection's low water mark is raised only inside a piece message, never past its end, and
// is 1 everywhere else, however the stream is cut into reads.
func TestWireWaterRaisesTheMarkOnlyInsidePieces(t *testing.T) {
	s := &wireStream{b: append([]byte{19}, make([]byte, handshakeLen-1)...)}
	s.keepalive()
	s.message(20, 200)              // extension handshake
	s.message(4, 4)                 // have
	s.message(pieceMsgID, 8+64<<10) // a chunk
	s.keepalive()
	s.message(pieceMsgID, 8+1000)    // a short last chunk
	s.message(1, 0)                  // unchoke
	s.message(pieceMsgID, 8+16<<10)  // a small chunk
	s.message(pieceMsgID, 8+128<<10) // a chunk larger than the mark
	s.keepalive()
	s.keepalive()
	s.message(6, 12) // request

	r := rand.New(rand.NewPCG(1, 2)) //nolint:gosec // test data
	for _, most := range []int{1, 7, 1500, 9000, 64 << 10, 1 << 20} {
		w := &wireWater{mark: 1, handshake: handshakeLen}
		raised := false
		for pos := 0; pos < len(s.b); {
			w.before()
			left := s.left(pos)
			switch {
			case w.mark > 1 && w.mark > left:
				t.Fatalf("reads of up to %d: mark %d at %d, with %d bytes of a piece message to come", most, w.mark, pos, left)
			case w.mark > 1:
				raised = true
			}
			n := min(1+r.IntN(most), len(s.b)-pos)
			w.after(s.b[pos : pos+n])
			pos += n
		}
		if w.off {
			t.Errorf("reads of up to %d: the stream was taken for another protocol", most)
		}
		if most >= 1500 && most <= 64<<10 && !raised {
			t.Errorf("reads of up to %d: the mark was never raised", most)
		}
	}
}

// A stream that is not the BitTorrent protocol in clear, or a message longer than any the client
// accepts, leaves the mark at 1 for good.
func TestWireWaterTurnsOffOnAStrangeStream(t *testing.T) {
	w := &wireWater{mark: 1, handshake: handshakeLen}
	w.after([]byte{0x8f, 1, 2, 3}) // an encrypted handshake starts with random bytes
	if !w.off {
		t.Error("a stream that does not start with the handshake was followed")
	}

	w = &wireWater{mark: 1, handshake: handshakeLen}
	s := &wireStream{b: append([]byte{19}, make([]byte, handshakeLen-1)...)}
	s.message(pieceMsgID, 8+64<<10)
	w.after(s.b[:handshakeLen+5+100])
	if w.before(); w.mark == 1 {
		t.Fatal("the mark was not raised inside a chunk")
	}
	var huge [5]byte
	binary.BigEndian.PutUint32(huge[:4], maxMessageLen+1)
	huge[4] = pieceMsgID
	w.after(s.b[handshakeLen+5+100:])
	w.after(huge[:])
	if w.before(); !w.off || w.mark != 1 {
		t.Errorf("after a message of %d bytes: off %v, mark %d; want off, 1", maxMessageLen+1, w.off, w.mark)
	}
}
