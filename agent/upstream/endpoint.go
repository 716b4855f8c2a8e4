package upstream

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/shoal-dev/shoal/internal/oci"
)

// Endpoint is where a logical registry (the name in image references, e.g. "docker.io" or
// "registry.test") is really served. Credentials belong to the logical name; requests go here.
type Endpoint struct {
	// Scheme is "http" or "https".
	Scheme string
	// Host is host[:port], e.g. "registry-1.docker.io" or "127.0.0.1:5000".
	Host string
}

// String returns the endpoint as a URL, e.g. "https://registry-1.docker.io", with the host
// escaped where it needs to be (the zone of a link-local IPv6 address: "%25eth0").
func (e Endpoint) String() string { return (&url.URL{Scheme: e.Scheme, Host: e.Host}).String() }

// url returns the absolute URL of path (which starts with "/v2/") on the endpoint.
func (e Endpoint) url(path string) string { return e.String() + path }

// ParseEndpoint parses "http://127.0.0.1:5000" or "https://registry-1.docker.io". A missing scheme
// means https. A trailing "/v2" or "/v2/" (as containerd's hosts.toml may have it) is accepted and
// dropped; any other path, a query, a fragment or user information is refused, so that nothing
// but the Distribution API paths this package builds is ever requested.
func ParseEndpoint(s string) (Endpoint, error) {
	raw := s
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return Endpoint{}, fmt.Errorf("parse registry endpoint %q: %w", raw, err)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		err = fmt.Errorf("scheme %q is not http or https", u.Scheme)
	case u.Host == "" || u.Hostname() == "":
		err = errors.New("no host")
	case u.User != nil:
		err = errors.New("user information is not allowed; put credentials in the auth file")
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "":
		err = errors.New("query and fragment are not allowed")
	case u.Path != "" && u.Path != "/" && u.Path != "/v2" && u.Path != "/v2/":
		err = fmt.Errorf("path %q is not allowed (want none, or /v2)", u.Path)
	default:
		err = oci.ValidateURLHost(u.Host)
	}
	if err != nil {
		return Endpoint{}, fmt.Errorf("parse registry endpoint %q: %w", raw, err)
	}
	return Endpoint{Scheme: u.Scheme, Host: u.Host}, nil
}

// DefaultEndpoint is the usual endpoint of a registry: Docker Hub's API host for docker.io (and
// its aliases), otherwise https://<registry>.
func DefaultEndpoint(registry string) Endpoint {
	if isDockerHub(registry) {
		return Endpoint{Scheme: "https", Host: "registry-1.docker.io"}
	}
	return Endpoint{Scheme: "https", Host: registry}
}

func isDockerHub(registry string) bool {
	switch registry {
	case "docker.io", "index.docker.io", "registry-1.docker.io":
		return true
	}
	return false
}
