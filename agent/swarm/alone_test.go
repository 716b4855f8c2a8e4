package swarm

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestNodeAloneGetsEverySegmentFromItsSeeders: one node of many reads a blob that nobody has:
// every segment comes from its seeder, with no stall, however many segments there are.
//
// It reproduces an open bug (docs/swarm.md, "A lone reader's piece can be late"): under the race
// detector, in about one run of four, the last pieces of a segment are never requested although
// their seeder has them, and the segment is read from upstream after StallTimeout. Until that
// is fixed it runs only when SHOAL_REPRO_LONE_READER is set:
//
//	SHOAL_REPRO_LONE_READER=1 go test -race -count=4 -run TestNodeAlone ./agent/swarm
func TestNodeAloneGetsEverySegmentFromItsSeeders(t *testing.T) {
	if os.Getenv("SHOAL_REPRO_LONE_READER") == "" {
		t.Skip("reproduces an open bug; set SHOAL_REPRO_LONE_READER=1 to run")
	}
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
	if n := testutil.ToFloat64(nodes[0].swarm.metrics.stalls); n != 0 {
		t.Errorf("stalls = %v, want 0", n)
	}
	if sent := up.sent.Load(); sent != size {
		t.Errorf("upstream sent %d bytes, want %d", sent, size)
	}
}
