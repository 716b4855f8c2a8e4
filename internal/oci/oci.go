// Package oci holds the small, shared vocabulary of the OCI Distribution API that both the agent
// and the controller need: validation of repository names, tags, digests and registry hosts, and
// the media types of manifests. It validates strictly so that nothing derived from a request is
// ever used before it is known to be well formed.
package oci

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Limits from the OCI Distribution specification (and what registries enforce in practice).
const (
	// MaxRepositoryLength bounds a repository name; registries reject longer ones.
	MaxRepositoryLength = 255
	// MaxTagLength bounds a tag.
	MaxTagLength = 128
	// MaxManifestSize is the largest manifest the agent accepts (registries use 4 MiB).
	MaxManifestSize = 4 << 20
)

// Manifest media types the agent asks for by default and recognises.
const (
	MediaTypeOCIManifest    = "application/vnd.oci.image.manifest.v1+json"
	MediaTypeOCIIndex       = "application/vnd.oci.image.index.v1+json"
	MediaTypeDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
	MediaTypeDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"
)

// ManifestMediaTypes is the Accept list used when a client sends none.
var ManifestMediaTypes = []string{MediaTypeOCIIndex, MediaTypeOCIManifest, MediaTypeDockerList, MediaTypeDockerManifest}

var (
	// ErrInvalidName reports a repository name outside the Distribution grammar.
	ErrInvalidName = errors.New("invalid repository name")
	// ErrInvalidReference reports a tag or digest that is malformed.
	ErrInvalidReference = errors.New("invalid reference")
	// ErrUnsupportedDigest reports a well-formed digest whose algorithm the agent does not serve.
	ErrUnsupportedDigest = errors.New("unsupported digest algorithm")
	// ErrInvalidRegistry reports a registry host that is not a host[:port].
	ErrInvalidRegistry = errors.New("invalid registry host")
)

var (
	repositoryComponent = regexp.MustCompile(`^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$`)
	tagPattern          = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
	digestPattern       = regexp.MustCompile(`^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$`)
	hostLabel           = regexp.MustCompile(`^[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$`)
)

// ValidateRepository checks a repository name (e.g. "library/alpine") against the Distribution grammar.
func ValidateRepository(name string) error {
	if name == "" || len(name) > MaxRepositoryLength {
		return fmt.Errorf("%w: length %d not in 1..%d", ErrInvalidName, len(name), MaxRepositoryLength)
	}
	for _, component := range strings.Split(name, "/") {
		if !repositoryComponent.MatchString(component) {
			return fmt.Errorf("%w: %q", ErrInvalidName, name)
		}
	}
	return nil
}

// ValidateTag checks a tag against the Distribution grammar.
func ValidateTag(tag string) error {
	if !tagPattern.MatchString(tag) {
		return fmt.Errorf("%w: tag %q", ErrInvalidReference, truncate(tag))
	}
	return nil
}

// ParseDigest parses "sha256:<64 lowercase hex>". A digest that is well formed but uses another
// algorithm (sha512, ...) yields ErrUnsupportedDigest so callers can answer with the right error.
func ParseDigest(s string) (v1.Hash, error) {
	if len(s) > 256 || !digestPattern.MatchString(s) {
		return v1.Hash{}, fmt.Errorf("%w: digest %q", ErrInvalidReference, truncate(s))
	}
	algorithm, _, _ := strings.Cut(s, ":")
	if algorithm != "sha256" {
		return v1.Hash{}, fmt.Errorf("%w: %q", ErrUnsupportedDigest, algorithm)
	}
	h, err := v1.NewHash(s)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("%w: %w", ErrInvalidReference, err)
	}
	return h, nil
}

// IsDigest reports whether a manifest reference is a digest rather than a tag.
func IsDigest(reference string) bool { return strings.Contains(reference, ":") }

// MirrorRegistry is the name containerd gives the mirror (in ?ns=) for registry host: docker.io
// for the names Docker Hub also goes by (index.docker.io, as go-containerregistry and the
// controller write it, and registry-1.docker.io), host itself otherwise. The store, the swarm
// and the upstream client key blobs by that name, so anything the agent fetches on its own
// must use it too.
func MirrorRegistry(host string) string {
	switch host {
	case "index.docker.io", "registry-1.docker.io":
		return "docker.io"
	}
	return host
}

// ValidateURLHost checks that the host of a parsed endpoint URL (host[:port], an IPv6 address
// in brackets, perhaps with a zone) holds only printable ASCII: url.Parse takes, e.g., an IPv6
// zone with a raw byte that no URL can carry back.
func ValidateURLHost(host string) error {
	if strings.ContainsFunc(host, func(r rune) bool { return r <= ' ' || r > '~' }) {
		return fmt.Errorf("host %q has a character that is not printable ASCII", host)
	}
	return nil
}

// ValidateRegistry checks a registry host as containerd passes it in ?ns= ("docker.io",
// "registry.test:5000", "[::1]:5000"). It rejects anything that could smuggle a path or scheme.
func ValidateRegistry(registry string) error {
	if registry == "" || len(registry) > 255 {
		return fmt.Errorf("%w: length %d", ErrInvalidRegistry, len(registry))
	}
	host, port := registry, ""
	if rest, ok := strings.CutPrefix(registry, "["); ok {
		ip, after, ok := strings.Cut(rest, "]")
		if addr, err := netip.ParseAddr(ip); !ok || err != nil || !addr.Is6() || addr.Zone() != "" {
			return fmt.Errorf("%w: %q is not an IPv6 address in brackets", ErrInvalidRegistry, truncate(registry))
		}
		if after == "" {
			return nil
		}
		p, ok := strings.CutPrefix(after, ":")
		if !ok {
			return fmt.Errorf("%w: unexpected text after ']' in %q", ErrInvalidRegistry, truncate(registry))
		}
		return validatePort(registry, p)
	}
	if i := strings.LastIndexByte(registry, ':'); i >= 0 {
		host, port = registry[:i], registry[i+1:]
		if err := validatePort(registry, port); err != nil {
			return err
		}
	}
	for _, label := range strings.Split(host, ".") {
		if !hostLabel.MatchString(label) {
			return fmt.Errorf("%w: %q", ErrInvalidRegistry, truncate(registry))
		}
	}
	return nil
}

func validatePort(registry, port string) error {
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != port {
		return fmt.Errorf("%w: bad port in %q", ErrInvalidRegistry, truncate(registry))
	}
	return nil
}

// ManifestMediaType returns the media type of a manifest body: its mediaType field when set,
// otherwise inferred from its shape (an OCI manifest may omit the field).
func ManifestMediaType(body []byte) string {
	var probe struct {
		MediaType string          `json:"mediaType"`
		Manifests json.RawMessage `json:"manifests"`
		Layers    json.RawMessage `json:"layers"`
		Config    json.RawMessage `json:"config"`
	}
	if err := json.Unmarshal(body, &probe); err != nil {
		return ""
	}
	switch {
	case probe.MediaType != "":
		return probe.MediaType
	case probe.Manifests != nil:
		return MediaTypeOCIIndex
	case probe.Config != nil || probe.Layers != nil:
		return MediaTypeOCIManifest
	}
	return ""
}

// truncate keeps error messages readable when the offending input is huge.
func truncate(s string) string {
	const limit = 80
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}
