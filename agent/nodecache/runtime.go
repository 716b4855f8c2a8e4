package nodecache

import (
	"context"
	"errors"
	"fmt"

	"github.com/shoal-dev/shoal/agent/criruntime"
	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

// Runtime is the node's container runtime, into which items with runtimeImport are imported
// and pinned; *criruntime.Runtime implements it. Its pins have an owner: PinnedByOwner lists
// only those Pin made, and Unpin removes only those.
type Runtime interface {
	// Import pulls ref through the runtime's own pull path (CRI), which goes through this
	// agent's mirror, so the bytes come from the store.
	Import(ctx context.Context, ref string) error
	// Status says whether the runtime has ref, and pinned.
	Status(ctx context.Context, ref string) (criruntime.State, error)
	// Pin pins ref; it returns Imported and an error wrapping criruntime.ErrCannotPin when
	// the runtime has no pinned images.
	Pin(ctx context.Context, ref string) (criruntime.State, error)
	// Unpin removes the pin Pin made on ref, if any.
	Unpin(ctx context.Context, ref string) error
	// PinnedByOwner lists what Pin pinned.
	PinnedByOwner(ctx context.Context) ([]string, error)
}

// errImport marks a failure to import into, or pin in, the container runtime.
var errImport = errors.New("runtime import")

// runtimeName is the name the runtime knows the item's image by when it is pulled by digest:
// repository@digest, with Docker Hub's names as containerd writes them (docker.io/library/…).
func (r reference) runtimeName() string {
	return r.registry + "/" + r.repo + "@" + r.digest.String()
}

// importRuntime makes the runtime hold the item's image, pinned where it can, and returns
// where it stands there. The content is in the store already, so the runtime's pull reads
// it from the mirror; the runtime bounds a pull that stops moving itself (containerd's
// image_pull_progress_timeout), so no bound is set here, and a large image that keeps
// unpacking is never cut short.
func (w *Worker) importRuntime(ctx context.Context, it *item) (v1alpha1.RuntimeState, string, error) {
	if w.cfg.Runtime == nil {
		return v1alpha1.RuntimeNotImported, "", fmt.Errorf("%w: %w: this agent has no container runtime to import into (set --runtime-endpoint)", errPermanent, errImport)
	}
	ref := it.ref.runtimeName()
	st, err := w.cfg.Runtime.Status(ctx, ref)
	if err != nil {
		return v1alpha1.RuntimeNotImported, "", fmt.Errorf("%w: %w", errImport, err)
	}
	if st == criruntime.Absent {
		if err := w.cfg.Runtime.Import(ctx, ref); err != nil {
			return v1alpha1.RuntimeNotImported, "", fmt.Errorf("%w: %w", errImport, err)
		}
		w.metrics.imports.Inc()
		w.log.Info("imported into the container runtime", "reference", it.spec.Reference, "image", ref)
	}
	if st == criruntime.Pinned {
		return v1alpha1.RuntimePinned, "", nil
	}
	switch st, err := w.cfg.Runtime.Pin(ctx, ref); {
	case errors.Is(err, criruntime.ErrCannotPin):
		return v1alpha1.RuntimeImported, "imported, not pinned: the container runtime cannot pin images (containerd 1.7 or newer can)", nil
	case err != nil:
		return v1alpha1.RuntimeImported, "", fmt.Errorf("%w: %w", errImport, err)
	case st == criruntime.Pinned:
		return v1alpha1.RuntimePinned, "", nil
	}
	return v1alpha1.RuntimeImported, "", nil
}

// runtimeChanged reports whether the runtime no longer holds the item's image as the item
// last left it: removed, or unpinned, out of band.
func (w *Worker) runtimeChanged(ctx context.Context, it *item) bool {
	w.mu.Lock()
	want := it.runtime
	w.mu.Unlock()
	st, err := w.cfg.Runtime.Status(ctx, it.ref.runtimeName())
	if err != nil {
		w.log.Warn("check the image in the container runtime", "reference", it.spec.Reference, "error", err)
		return false
	}
	switch want {
	case v1alpha1.RuntimePinned:
		return st != criruntime.Pinned
	case v1alpha1.RuntimeImported:
		return st == criruntime.Absent
	}
	return false
}

// reconcileRuntimePins unpins, in the runtime, the images this package pinned there that no
// item of the spec imports any more. Images are never removed: kubelet's garbage collector
// takes them once unused, and never while a container uses them.
func (w *Worker) reconcileRuntimePins(ctx context.Context) error {
	if w.cfg.Runtime == nil {
		return nil
	}
	w.mu.Lock()
	if !w.synced {
		w.mu.Unlock()
		return nil
	}
	want := map[string]bool{}
	for _, it := range w.byRef {
		if it.spec.RuntimeImport && it.parseErr == nil {
			want[it.ref.runtimeName()] = true
		}
	}
	w.mu.Unlock()
	pinned, err := w.cfg.Runtime.PinnedByOwner(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, ref := range pinned {
		if want[ref] {
			continue
		}
		if err := w.cfg.Runtime.Unpin(ctx, ref); err != nil {
			errs = append(errs, err)
			continue
		}
		w.log.Info("unpinned in the container runtime: no item imports it any more", "image", ref)
	}
	return errors.Join(errs...)
}
