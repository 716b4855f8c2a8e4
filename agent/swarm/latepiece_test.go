package swarm

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shoal-dev/shoal/agent/plan"
)

// A piece the reader waits for that never comes while the rest of its segment does is read
// from upstream alone: upstream sends the blob once to the seeder and that one piece again, not
// the rest of the segment, and the reader gets the right bytes.
func TestLatePieceIsReadFromUpstreamAlone(t *testing.T) {
	const pieceLength = latePieceLength
	up, content, d, seeder, reader := newLatePieceSetup(t, 8)
	size := int64(len(content))

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if got, err := readSource(ctx, seeder.swarm.Source("registry.test", "app", d)); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("seeder: %d bytes, %v", len(got), err)
	}
	if sent := up.sent.Load(); sent != size {
		t.Fatalf("upstream sent %d bytes to the seeder, want %d", sent, size)
	}
	// The seeder loses its first piece (as if its disk dropped it): the reader's handshake tells
	// it that nobody has that piece, while the rest of the segment comes.
	b := blobOf(seeder, d)
	b.t.Lose(0)
	if b.t.PieceComplete(0) {
		t.Fatal("the seeder still has its first piece")
	}

	got, err := readSource(ctx, reader.swarm.Source("registry.test", "app", d))
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("reader: %d bytes, %v", len(got), err)
	}
	// The lost piece comes from upstream, and only it: not the rest of the segment. (Under a
	// loaded race detector a second piece may also be late; the rest must come from the peer.)
	extra := up.sent.Load() - size
	if extra < pieceLength || extra > 2*pieceLength {
		t.Errorf("upstream sent %d bytes beyond the seeder's copy, want the lost piece (%d), not the rest of the segment", extra, pieceLength)
	}
	if n := testutil.ToFloat64(reader.swarm.metrics.stalls.WithLabelValues(stallLatePiece)); n < 1 {
		t.Errorf("late-piece stalls = %v, want the late piece counted", n)
	}
	if n := reader.swarm.stats().peerBytesRead; n < size-2*pieceLength {
		t.Errorf("peer bytes = %d, want the %d of the other pieces", n, size-pieceLength)
	}
}

// While a node reads a late piece from upstream it fetches no other piece from its peers: on a
// full downlink the upstream read would share it with them and might not end before the content
// store gives up. The other pieces come once it is in.
func TestLatePieceReadFromUpstreamHoldsOtherFetchesBack(t *testing.T) {
	const pieces = 12
	up, content, d, seeder, reader := newLatePieceSetup(t, pieces)
	// The upstream read of the late piece is held for 2.5 s. The first second lets the chunks
	// already asked for from the seeder come in; in the next 1.5 s the seeder would send three
	// more pieces if the node asked for them.
	var armed atomic.Bool
	held := make(chan int, 1)
	up.hold = func(ranged bool) {
		if !armed.Load() || !ranged {
			return
		}
		b := blobOf(reader, d)
		beyond := func() int { // pieces past the first and the two read ahead of it
			n := 0
			for i := 1 + readaheadPieces; i < pieces; i++ {
				if b.t.PieceComplete(i) {
					n++
				}
			}
			return n
		}
		time.Sleep(time.Second)
		before := beyond()
		time.Sleep(1500 * time.Millisecond)
		select {
		case held <- beyond() - before:
		default:
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if got, err := readSource(ctx, seeder.swarm.Source("registry.test", "app", d)); err != nil || !bytes.Equal(got, content) {
		t.Fatalf("seeder: %d bytes, %v", len(got), err)
	}
	b := blobOf(seeder, d)
	b.t.Lose(0)
	armed.Store(true)
	got, err := readSource(ctx, reader.swarm.Source("registry.test", "app", d))
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("reader: %d bytes, %v", len(got), err)
	}
	select {
	case n := <-held:
		if n != 0 {
			t.Errorf("%d pieces came from the seeder while the late piece was read from upstream, want none", n)
		}
	default:
		t.Fatal("the late piece was not read from upstream")
	}
	if n := testutil.ToFloat64(reader.swarm.metrics.focuses); n < 1 {
		t.Errorf("reader focuses = %v, want the upstream read counted", n)
	}
}

// horizonRecorder is a blob's pieces that record the horizons they are given.
type horizonRecorder struct {
	blobPieces
	horizons []int
}

func (h *horizonRecorder) SetHorizon(x int) { h.horizons = append(h.horizons, x) }

// The horizon of a blob read by several focused readers is the furthest they need, and it is
// lifted when the last of them lets go.
func TestFocusHorizonIsTheFurthestReadersNeed(t *testing.T) {
	p, err := plan.New(v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("a", 64)}, 40<<20, 16<<20, 1<<20, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	rec := &horizonRecorder{}
	b := &blob{plan: p, segs: make([]*segment, p.Segments()), t: rec}
	r1, r2 := &blobReader{b: b}, &blobReader{b: b}
	b.setFocus(r1, 5)
	b.setFocus(r2, 9)
	b.setFocus(r1, -1)
	b.setFocus(r2, -1)
	b.setFocus(r2, -1) // not focused: nothing changes
	if want := []int{5, 9, 9, 40}; !slices.Equal(rec.horizons, want) {
		t.Errorf("horizons %v, want %v", rec.horizons, want)
	}
}

// latePieceLength is the piece length of newLatePieceSetup's blob.
const latePieceLength = 256 << 10

// newLatePieceSetup starts two nodes with a stall timeout of 1 s, each uploading two pieces a
// second, and an upstream holding a blob of the given number of pieces in one segment; it
// returns which node seeds the segment and which reads.
func newLatePieceSetup(t *testing.T, pieces int) (up *memUpstream, content []byte, d v1.Hash, seeder, reader *testNode) {
	t.Helper()
	size := int64(pieces) * latePieceLength
	up = newMemUpstream()
	content = randomBlob(t, int(size))
	d = up.add(content)
	// At two pieces a second the segment keeps progressing (a piece every half StallTimeout)
	// for longer than the StallTimeouts after which a late piece is fetched alone.
	nodes := startNodesConfigured(t, 2, up, size, latePieceLength, func(_ int, cfg *Config) {
		cfg.StallTimeout = time.Second
		cfg.MaxUploadRate = 2 * latePieceLength
		cfg.RampSegments = -1 // one segment
		cfg.MinSegments = -1
	})
	p, err := plan.New(d, size, size, latePieceLength, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	seeder, reader = nodes[0], nodes[1]
	if assignSeeders(p, nodes[0].members.Members())[0] == nodes[1].addr {
		seeder, reader = nodes[1], nodes[0]
	}
	return up, content, d, seeder, reader
}
