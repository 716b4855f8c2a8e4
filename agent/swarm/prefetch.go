package swarm

import (
	"context"
	"fmt"
	"net/netip"
	"slices"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sync/errgroup"

	"github.com/shoal-dev/shoal/agent/plan"
)

// Prefetch fetches from upstream, ahead of any reader, the segments of blob d that this node
// seeds, and publishes them for its peers: pod pre-seeding, when the controller has announced
// that pods are about to pull the blob (a SwarmSeed). When the runtime's pull begins, the
// segments' bytes are already in the cluster, each fetched once. It returns how many segments
// this node seeds, once they are published. size is the size the announcement claims: a node
// that seeds nothing of the blob under it does nothing at all (most nodes: no request to the
// registry); one that does checks the size with the registry first, since the plan cut from a
// wrong size would not be the one readers use. A blob already in the content store, or one
// whose registry ignores Range (its whole-blob seeder fetches it when first asked), is left
// alone.
func (s *Swarm) Prefetch(ctx context.Context, registry, repo string, d v1.Hash, size int64) (int, error) {
	if local := s.openLocal(d); local != nil {
		_ = local.Close()
		return 0, nil
	}
	if _, noRange := s.noRange.Load(registry); noRange {
		return 0, nil
	}
	p, err := plan.New(d, size, s.cfg.SegmentSize, s.cfg.PieceLength, s.cfg.RampSegments, s.cfg.MinSegments)
	if err != nil {
		return 0, fmt.Errorf("prefetch %s: %w", d, err)
	}
	members := s.cfg.Membership.Members()
	live := s.cfg.Membership.Live()
	seeders := assignSeeders(p, members)
	var mine []int
	for k := range p.Segments() {
		seeder, _ := seederOf(p, k, seeders, members, func(m netip.AddrPort) bool { return slices.Contains(live, m) })
		if seeder == s.self {
			mine = append(mine, k)
		}
	}
	if len(mine) == 0 {
		return 0, nil
	}
	actual, err := s.cfg.Upstream.HeadBlob(ctx, registry, repo, d)
	if err != nil {
		return 0, fmt.Errorf("prefetch %s: %w", d, err)
	}
	if actual != size {
		return 0, fmt.Errorf("prefetch %s: announced as %d bytes, the registry says %d", d, size, actual)
	}
	b, err := s.blobFor(d, size, registry, repo)
	if err != nil {
		return 0, fmt.Errorf("prefetch %s: %w", d, err)
	}
	s.metrics.prefetched.Add(float64(len(mine)))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(s.cfg.UpstreamWindow)
	for _, k := range mine {
		g.Go(func() error {
			_, err := s.ensureSegment(gctx, b, k)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		return len(mine), fmt.Errorf("prefetch %s: %w", d, err)
	}
	s.log.Info("prefetched the segments this node seeds", "digest", d, "segments", len(mine), "of", len(b.segs))
	return len(mine), nil
}
