package swarm

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestNodeAloneGetsEverySegmentFromItsSeeders: one node of many reads a blob that nobody has:
// every segment comes from its seeder, with no stall, however many segments there are.
//
// Without blob.kick it failed in about one run of ten under the race detector: the torrent client
// never asked the connected seeder for a segment's last pieces, and the segment was read from
// upstream after StallTimeout. Run it many times to check a change to the reader or the client:
//
//	go test -race -count=30 -run TestNodeAlone ./agent/swarm
func TestNodeAloneGetsEverySegmentFromItsSeeders(t *testing.T) {
	const (
		pieceLength = 64 << 10
		segmentSize = 4 * pieceLength
		size        = 24 * segmentSize
	)
	up := newMemUpstream()
	content := randomBlob(t, size)
	d := up.add(content)
	nodes := startNodesConfigured(t, 12, up, segmentSize, pieceLength, func(_ int, cfg *Config) {
		cfg.StallTimeout = DefaultStallTimeout
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	got, err := readSource(ctx, nodes[0].swarm.Source("registry.test", "app", d))
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("%d bytes, %v", len(got), err)
	}
	t.Logf("kicks: %v", testutil.ToFloat64(nodes[0].swarm.metrics.kicks))
	for _, reason := range []string{stallNoProgress, stallLatePiece} {
		if n := testutil.ToFloat64(nodes[0].swarm.metrics.stalls.WithLabelValues(reason)); n != 0 {
			t.Errorf("%s stalls = %v, want 0", reason, n)
		}
	}
	if sent := up.sent.Load(); sent != size {
		t.Errorf("upstream sent %d bytes, want %d", sent, size)
	}
}
