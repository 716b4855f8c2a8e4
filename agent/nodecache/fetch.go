package nodecache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sync/errgroup"

	"github.com/shoal-dev/shoal/internal/oci"
)

// maxManifests bounds the manifests of one item (an index and its children, nested indexes
// included), so that a malicious or broken index cannot make the worker fetch without end.
const maxManifests = 256

// readBufferSize is how much of a blob is read at a time while following its download.
const readBufferSize = 256 << 10

// resolve reads the item's manifest and, for an index, every manifest under it, from the store
// or else from the registry (keeping them in the store). It returns the manifests' digests,
// the blobs they reference (each once) and the size of all of them together.
func (w *Worker) resolve(ctx context.Context, it *item) (manifests []v1.Hash, blobs []v1.Descriptor, total int64, err error) {
	queue := []v1.Hash{it.ref.digest}
	seen := map[v1.Hash]bool{}
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		if seen[d] {
			continue
		}
		seen[d] = true
		if len(manifests) == maxManifests {
			return nil, nil, 0, fmt.Errorf("%w: %s has more than %d manifests", errPermanent, it.ref.digest, maxManifests)
		}
		body, fetched, err := w.manifest(ctx, it.ref, d)
		if err != nil {
			return nil, nil, 0, err
		}
		it.add(int64(len(body)))
		if fetched {
			w.progressed(it)
		}
		total += int64(len(body))
		manifests = append(manifests, d)
		children, layers, err := references(body)
		if err != nil {
			// The bytes hash to the digest asked for: the content itself is unusable.
			return nil, nil, 0, fmt.Errorf("%w: manifest %s: %w", errPermanent, d, err)
		}
		queue = append(queue, children...)
		for _, l := range layers {
			if !seen[l.Digest] {
				seen[l.Digest] = true
				blobs = append(blobs, l)
				total += l.Size
			}
		}
	}
	return manifests, blobs, total, nil
}

// references returns what a manifest references: for an index its manifests, for an image (or
// artifact) manifest its config and its distributable layers.
func references(body []byte) (children []v1.Hash, blobs []v1.Descriptor, err error) {
	switch mt := types.MediaType(oci.ManifestMediaType(body)); {
	case mt.IsIndex():
		idx, err := v1.ParseIndexManifest(bytes.NewReader(body))
		if err != nil {
			return nil, nil, err
		}
		for _, m := range idx.Manifests {
			if err := checkDescriptor(m); err != nil {
				return nil, nil, err
			}
			children = append(children, m.Digest)
		}
		return children, nil, nil
	case mt.IsImage():
		m, err := v1.ParseManifest(bytes.NewReader(body))
		if err != nil {
			return nil, nil, err
		}
		for _, l := range append([]v1.Descriptor{m.Config}, m.Layers...) {
			if !l.MediaType.IsDistributable() {
				continue // not served by registries (foreign layers); the runtime fetches it from its URLs
			}
			if err := checkDescriptor(l); err != nil {
				return nil, nil, err
			}
			blobs = append(blobs, l)
		}
		return nil, blobs, nil
	default:
		return nil, nil, fmt.Errorf("unsupported media type %q", mt)
	}
}

func checkDescriptor(d v1.Descriptor) error {
	if _, err := oci.ParseDigest(d.Digest.String()); err != nil {
		return err
	}
	if d.Size < 0 {
		return fmt.Errorf("%s: negative size %d", d.Digest, d.Size)
	}
	return nil
}

// manifest returns manifest d of ref: from the store, or else from the registry, keeping it in
// the store (which verifies its digest again) as the mirror keeps the manifests it serves.
// fetched reports whether it came from the registry.
func (w *Worker) manifest(ctx context.Context, ref reference, d v1.Hash) (body []byte, fetched bool, err error) {
	if b, err := w.cfg.Store.Get(d); err == nil {
		body, err := io.ReadAll(io.LimitReader(b, oci.MaxManifestSize+1))
		_ = b.Close() // read-only
		if err != nil {
			return nil, false, fmt.Errorf("read manifest %s from the store: %w", d, err)
		}
		if len(body) > oci.MaxManifestSize {
			return nil, false, fmt.Errorf("%w: %s in the store is over the %d bytes of a manifest", errPermanent, d, oci.MaxManifestSize)
		}
		return body, false, nil
	}
	select {
	case w.manifestSlots <- struct{}{}:
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
	defer func() { <-w.manifestSlots }()
	// A manifest comes in one answer of at most 4 MiB: none within the stall timeout is a stall.
	mctx, cancel := context.WithTimeoutCause(ctx, w.cfg.StallTimeout,
		fmt.Errorf("%w: manifest %s not received within %s", errNoProgress, d, w.cfg.StallTimeout))
	defer cancel()
	m, err := w.cfg.Manifests.Manifest(mctx, ref.registry, ref.repo, d.String(), oci.ManifestMediaTypes)
	if err != nil {
		return nil, false, stalled(mctx, err)
	}
	src := func(context.Context) (io.ReadCloser, int64, error) {
		return io.NopCloser(bytes.NewReader(m.Body)), int64(len(m.Body)), nil
	}
	b, err := w.cfg.Store.Fetch(ctx, d, src)
	if err != nil {
		return nil, true, fmt.Errorf("store manifest %s: %w", d, err)
	}
	// Reading to the end waits for the store to verify and keep it.
	_, err = io.Copy(io.Discard, b)
	_ = b.Close() // read-only
	if err != nil {
		return nil, true, fmt.Errorf("store manifest %s: %w", d, err)
	}
	return m.Body, true, nil
}

// seedersOf returns the swarm addresses of the nodes of the item's seed group, those known;
// nil when it has none, or none is known: every member may seed then.
func (w *Worker) seedersOf(it *item) []netip.AddrPort {
	if w.cfg.Seeders == nil {
		return nil
	}
	w.mu.Lock()
	var nodes []string
	if group := it.spec.SeedGroup; group != "" && w.latest != nil {
		for _, g := range w.latest.Spec.SeedGroups {
			if g.Name == group {
				nodes = g.Nodes
			}
		}
	}
	w.mu.Unlock()
	if len(nodes) == 0 {
		return nil
	}
	return w.cfg.Seeders(nodes)
}

// fetchBlobs makes the store hold every blob: those it holds are counted, the others fetched,
// Parallel at once across all items. The first failure stops the others.
func (w *Worker) fetchBlobs(ctx context.Context, it *item, blobs []v1.Descriptor) error {
	seeders := w.seedersOf(it)
	g, gctx := errgroup.WithContext(ctx)
	for _, desc := range blobs {
		if size, err := w.cfg.Store.Stat(desc.Digest); err == nil {
			it.add(size)
			continue
		}
		select {
		case w.blobSlots <- struct{}{}:
		case <-gctx.Done():
		}
		if gctx.Err() != nil {
			break
		}
		g.Go(func() error {
			defer func() { <-w.blobSlots }()
			return w.fetchBlob(gctx, it, desc, seeders)
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return ctx.Err()
}

// fetchBlob fetches one blob into the store through the blob source, following the download
// to its end: the store releases the last byte only once the digest matched. A download that
// moves no byte for the stall timeout is given up; one that keeps moving has no time limit.
func (w *Worker) fetchBlob(ctx context.Context, it *item, desc v1.Descriptor, seeders []netip.AddrPort) error {
	d := desc.Digest
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stall := w.cfg.StallTimeout
	watch := time.AfterFunc(stall, func() {
		cancel(fmt.Errorf("%w: no byte of %s for %s", errNoProgress, d, stall))
	})
	defer watch.Stop()
	b, err := w.cfg.Store.Fetch(ctx, d, w.cfg.BlobSource(it.ref.registry, it.ref.repo, d, seeders))
	if err != nil {
		return stalled(ctx, err)
	}
	defer func() { _ = b.Close() }() // read-only
	buf := make([]byte, readBufferSize)
	var n int64
	fetching := false
	for {
		m, err := b.Read(buf)
		if m > 0 {
			n += int64(m)
			it.add(int64(m))
			watch.Reset(stall)
			if !fetching {
				fetching = w.progressed(it)
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			it.add(-n)
			return stalled(ctx, fmt.Errorf("fetch %s after %d bytes: %w", d, n, err))
		}
	}
}
