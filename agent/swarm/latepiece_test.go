package swarm

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shoal-dev/shoal/agent/plan"
)

// A piece the reader waits for that never comes while the rest of its segment does is read
// from upstream alone: upstream sends the blob once to the seeder and that one piece again, not
// the rest of the segment, and the reader gets the right bytes.
func TestLatePieceIsReadFromUpstreamAlone(t *testing.T) {
	const (
		pieceLength = 256 << 10
		size        = 8 * pieceLength // one segment of eight pieces
		stall       = time.Second
	)
	up := newMemUpstream()
	content := randomBlob(t, size)
	d := up.add(content)
	// The seeder uploads at two pieces a second, so the segment keeps progressing (a piece every
	// half StallTimeout) for longer than the two StallTimeouts after which a late piece is
	// fetched alone.
	nodes := startNodesConfigured(t, 2, up, size, pieceLength, func(_ int, cfg *Config) {
		cfg.StallTimeout = stall
		cfg.MaxUploadRate = 2 * pieceLength
		cfg.RampSegments = -1 // one segment of eight pieces
		cfg.MinSegments = -1
	})
	p, err := plan.New(d, size, size, pieceLength, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	seederAddr := assignSeeders(p, nodes[0].members.Members())[0]
	seeder, reader := nodes[0], nodes[1]
	if seederAddr == nodes[1].addr {
		seeder, reader = nodes[1], nodes[0]
	}

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
