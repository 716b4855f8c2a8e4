package controllers

import (
	"context"
	"errors"

	"github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers/resolve"
)

// RegistryResolver is the Resolver of a running controller: the registries, through
// resolve.Resolver and its cache.
type RegistryResolver struct {
	R *resolve.Resolver
}

// Resolve implements Resolver. A reference to an index with only some of the platforms asked
// for resolves to those, with the error beside them; the others are reported per node as
// PlatformUnavailable.
func (rr RegistryResolver) Resolve(ctx context.Context, ref string, artifact bool, platforms []string, pullSecrets [][]byte) (v1alpha1.ResolvedReference, error) {
	res, err := rr.R.Resolve(ctx, ref, resolve.Options{Platforms: platforms, PullSecrets: pullSecrets})
	if err != nil && (res == nil || resolve.Reason(err) != v1alpha1.ReasonPlatformUnavailable) {
		return v1alpha1.ResolvedReference{}, err
	}
	if res == nil {
		return v1alpha1.ResolvedReference{}, errors.New("resolve: no result")
	}
	out := v1alpha1.ResolvedReference{
		Repository: res.Repository.Name(),
		Tag:        res.Tag,
		Digest:     res.Digest.String(),
		Size:       res.Size(),
	}
	// A single manifest is held as it is, whatever the node's platform; an index by the
	// manifest of each platform.
	if res.MediaType.IsIndex() {
		for _, m := range res.Manifests {
			pm := v1alpha1.PlatformManifest{Digest: m.Digest.String(), Size: m.Size}
			if m.Platform != nil {
				pm.Platform = platformString(m.Platform.OS, m.Platform.Architecture, m.Platform.Variant)
			}
			if len(out.Platforms) < 8 { // the CRD's bound
				out.Platforms = append(out.Platforms, pm)
			}
		}
	}
	return out, nil
}

func platformString(os, arch, variant string) string {
	s := os + "/" + arch
	if variant != "" {
		s += "/" + variant
	}
	return s
}
