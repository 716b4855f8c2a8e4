package piecewire

import (
	"bufio"
	"bytes"
	"testing"
)

// FuzzReadFrame: whatever a peer sends on a haves stream, reading it never panics and yields
// only frames that fit the blob: a bitfield of its size, haves of its pieces.
func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{frameBitfield, 0, 0, 0, 10, 0xff, 0xc0, frameHave, 0, 0, 0, 9, frameKeepalive}, 10)
	f.Add([]byte{frameHave, 0xff, 0xff, 0xff, 0xff}, 3)
	f.Add([]byte{frameBitfield, 0xff, 0xff, 0xff, 0xff}, 1)
	f.Add([]byte{'X'}, 1)
	f.Fuzz(func(t *testing.T, data []byte, pieces int) {
		if pieces < 1 || pieces > 1<<16 {
			return
		}
		br := bufio.NewReader(bytes.NewReader(data))
		for {
			fr, err := readFrame(br, pieces)
			if err != nil {
				return
			}
			switch fr.kind {
			case frameBitfield:
				if len(fr.field) != (pieces+7)/8 {
					t.Fatalf("bitfield of %d bytes for %d pieces", len(fr.field), pieces)
				}
			case frameHave:
				if fr.piece < 0 || fr.piece >= pieces {
					t.Fatalf("have of piece %d of %d", fr.piece, pieces)
				}
			case frameKeepalive:
			default:
				t.Fatalf("frame of unknown kind %q returned", fr.kind)
			}
		}
	})
}
