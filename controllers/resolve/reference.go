package resolve

import (
	"errors"
	"fmt"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/internal/oci"
)

// ErrNotReference reports a string that is not an image or artifact reference.
var ErrNotReference = errors.New("not a reference")

// ParseReference parses an image or artifact reference as a Prewarm or a pod writes it
// ("registry.test/team/app:1.4", "registry.test/app@sha256:…", "nginx") into a
// go-containerregistry reference whose Name() is the canonical form: registry and repository
// spelled out, Docker Hub names normalised as go-containerregistry does ("nginx" is
// "index.docker.io/library/nginx:latest"). A reference with both a tag and a digest is the digest
// (the tag only documents it, as in containerd). Parsing the canonical form again gives it back
// unchanged.
//
// go-containerregistry accepts repository names that registries refuse ("app/-x", "a//b"), so the
// repository is also checked against the Distribution grammar and the registry must be a host[:port].
func ParseReference(s string) (name.Reference, error) {
	return parseReference(s)
}

func parseReference(s string, opts ...name.Option) (name.Reference, error) {
	ref, err := name.ParseReference(s, opts...)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %w", ErrNotReference, truncate(s), err)
	}
	if err := oci.ValidateRegistry(ref.Context().RegistryStr()); err != nil {
		return nil, fmt.Errorf("%w: %q: %w", ErrNotReference, truncate(s), err)
	}
	if err := oci.ValidateRepository(ref.Context().RepositoryStr()); err != nil {
		return nil, fmt.Errorf("%w: %q: %w", ErrNotReference, truncate(s), err)
	}
	return ref, nil
}

// writtenTag returns the tag a reference names: its own for a tag reference (go-containerregistry
// supplies "latest" when none is written), the one written before the digest for a digest
// reference, if any.
func writtenTag(s string, ref name.Reference) string {
	switch r := ref.(type) {
	case name.Tag:
		return r.TagStr()
	case name.Digest:
		base, _, _ := strings.Cut(s, "@")
		if t, err := name.NewTag(base, name.WithDefaultTag("")); err == nil {
			return t.TagStr()
		}
	}
	return ""
}

// platform is one platform a caller asked for: as written, and normalised for matching.
type platform struct {
	asked string
	norm  v1.Platform
}

// parsePlatforms parses "os/arch[/variant]" platforms (as spec.platforms of a Prewarm has them),
// dropping duplicates (after normalisation) and keeping the order.
func parsePlatforms(ss []string) ([]platform, error) {
	var out []platform
	seen := map[string]bool{}
	for _, s := range ss {
		p, err := parsePlatform(s)
		if err != nil {
			return nil, err
		}
		key := platformString(p)
		if seen[key] {
			continue
		}
		seen[key] = true
		out = append(out, platform{asked: s, norm: p})
	}
	return out, nil
}

func parsePlatform(s string) (v1.Platform, error) {
	parts := strings.Split(s, "/")
	ok := len(parts) == 2 || len(parts) == 3
	for _, part := range parts {
		ok = ok && part != "" && strings.Trim(part, "abcdefghijklmnopqrstuvwxyz0123456789_") == "" && len(part) <= 32
	}
	if !ok {
		return v1.Platform{}, fmt.Errorf("not a platform (os/arch or os/arch/variant in lowercase, e.g. linux/arm64/v8): %q", truncate(s))
	}
	p := v1.Platform{OS: parts[0], Architecture: parts[1]}
	if len(parts) == 3 {
		p.Variant = parts[2]
	}
	return normalizePlatform(p), nil
}

// normalizePlatform folds the spellings of one platform together as containerd's platforms
// package does, so that "linux/arm64/v8" asked for matches an index entry "linux/arm64" (arm64
// is v8 unless said otherwise), "linux/arm" matches "linux/arm/v7", "linux/x86_64" matches
// "linux/amd64". OS version and features are dropped: nodes are chosen by os/arch/variant.
func normalizePlatform(p v1.Platform) v1.Platform {
	out := v1.Platform{OS: strings.ToLower(p.OS), Architecture: strings.ToLower(p.Architecture), Variant: strings.ToLower(p.Variant)}
	if out.OS == "macos" {
		out.OS = "darwin"
	}
	switch out.Architecture {
	case "i386":
		out.Architecture, out.Variant = "386", ""
	case "x86_64", "x86-64", "amd64":
		out.Architecture = "amd64"
		if out.Variant == "v1" {
			out.Variant = ""
		}
	case "aarch64", "arm64":
		out.Architecture = "arm64"
		switch out.Variant {
		case "8", "v8", "v8.0":
			out.Variant = ""
		}
	case "armhf":
		out.Architecture, out.Variant = "arm", "v7"
	case "armel":
		out.Architecture, out.Variant = "arm", "v6"
	case "arm":
		switch out.Variant {
		case "", "7":
			out.Variant = "v7"
		case "5", "6", "8":
			out.Variant = "v" + out.Variant
		}
	}
	return out
}

// platformString is "os/arch" or "os/arch/variant".
func platformString(p v1.Platform) string {
	if p.Variant != "" {
		return p.OS + "/" + p.Architecture + "/" + p.Variant
	}
	return p.OS + "/" + p.Architecture
}

// truncate keeps error messages readable when the offending input is huge.
func truncate(s string) string {
	const limit = 256
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}
