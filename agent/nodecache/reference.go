package nodecache

import (
	"context"
	"errors"
	"fmt"
	"unicode/utf8"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/upstream"
	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/internal/oci"
)

// reference is where an item's content is and the digest of its manifest (or index).
type reference struct {
	// registry and repo name the content as containerd names it to the mirror (?ns=docker.io,
	// library/nginx), so that the store, the swarm and the upstream client see the same names
	// as for a pull.
	registry, repo string
	digest         v1.Hash
}

// errPermanent marks a failure that retrying cannot mend: only a new spec item can.
var errPermanent = errors.New("permanent")

// errPinLimit marks an item left alone because pinning it would pass the pinned share of the
// store; it is tried again, since other items may leave the spec.
var errPinLimit = errors.New("pin limit exceeded")

// parseReference parses an item's reference: registry/repository[:tag]@sha256:<hex>.
func parseReference(s string) (reference, error) {
	ref, err := name.NewDigest(s)
	if err != nil {
		return reference{}, fmt.Errorf("%w: reference %q: %w", errPermanent, s, err)
	}
	d, err := oci.ParseDigest(ref.DigestStr())
	if err != nil {
		return reference{}, fmt.Errorf("%w: reference %q: %w", errPermanent, s, err)
	}
	registry := oci.MirrorRegistry(ref.Context().RegistryStr())
	repo := ref.Context().RepositoryStr()
	if err := oci.ValidateRegistry(registry); err != nil {
		return reference{}, fmt.Errorf("%w: reference %q: %w", errPermanent, s, err)
	}
	if err := oci.ValidateRepository(repo); err != nil {
		return reference{}, fmt.Errorf("%w: reference %q: %w", errPermanent, s, err)
	}
	return reference{registry: registry, repo: repo, digest: d}, nil
}

// errNoProgress: a transfer moved no byte for the stall timeout.
var errNoProgress = errors.New("no progress")

// stalled returns err, marked as a stall when the stall watch of tctx ended the transfer.
func stalled(tctx context.Context, err error) error {
	if cause := context.Cause(tctx); errors.Is(cause, errNoProgress) && !errors.Is(err, errNoProgress) {
		return fmt.Errorf("%w (%w)", cause, err)
	}
	return err
}

// reasonOf is the failure reason an item's error is reported with, from the API's fixed set.
func reasonOf(err error) v1alpha1.FailureReason {
	switch {
	case errors.Is(err, upstream.ErrUnauthorized):
		return v1alpha1.ReasonUnauthorized
	case errors.Is(err, upstream.ErrNotFound):
		return v1alpha1.ReasonNotFound
	case errors.Is(err, store.ErrDigestMismatch), errors.Is(err, store.ErrSizeMismatch), errors.Is(err, upstream.ErrInvalid):
		return v1alpha1.ReasonVerifyFailed
	case errors.Is(err, store.ErrFull):
		return v1alpha1.ReasonStoreFull
	case errors.Is(err, errPinLimit):
		return v1alpha1.ReasonPinLimitExceeded
	case errors.Is(err, store.ErrStalled), errors.Is(err, errNoProgress):
		return v1alpha1.ReasonFetchStalled
	case errors.Is(err, errImport):
		return v1alpha1.ReasonImportFailed
	}
	return v1alpha1.ReasonResolveFailed
}

// maxMessage is the API's limit on an item's message.
const maxMessage = 256

// truncate cuts s to at most n bytes, on a character boundary, marking the cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	const mark = "…"
	cut := n - len(mark)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + mark
}
