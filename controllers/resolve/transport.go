package resolve

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/shoal-dev/shoal/internal/oci"
)

// endpoint is where a registry is really served.
type endpoint struct {
	scheme string // "http" or "https"
	host   string // host[:port]
}

// parseEndpoint parses "http://127.0.0.1:5000" or "https://mirror.example:8443" (a missing scheme
// means https; a trailing "/v2" is dropped). Any other path, a query or user information is
// refused: requests go to the Distribution API's paths and credentials come from pull secrets.
func parseEndpoint(s string) (endpoint, error) {
	raw := s
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	switch {
	case err != nil:
	case u.Scheme != "http" && u.Scheme != "https":
		err = fmt.Errorf("scheme %q is not http or https", u.Scheme)
	case u.Hostname() == "":
		err = errors.New("no host")
	case u.User != nil:
		err = errors.New("user information is not allowed; credentials come from pull secrets")
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "":
		err = errors.New("query and fragment are not allowed")
	case u.Path != "" && u.Path != "/" && u.Path != "/v2" && u.Path != "/v2/":
		err = fmt.Errorf("path %q is not allowed (want none, or /v2)", u.Path)
	default:
		err = oci.ValidateURLHost(u.Host)
	}
	if err != nil {
		return endpoint{}, fmt.Errorf("registry endpoint %q: %w", raw, err)
	}
	return endpoint{scheme: u.Scheme, host: u.Host}, nil
}

// normalizeRegistry checks a registry name (host[:port]) and folds its case and Docker Hub's names.
func normalizeRegistry(registry string) (string, error) {
	if err := oci.ValidateRegistry(registry); err != nil {
		return "", err
	}
	return foldDockerHub(strings.ToLower(registry)), nil
}

// endpointTransport sends requests for a registry to its endpoint, and refuses plain HTTP to any
// registry not listed as insecure. It sits beneath go-containerregistry's authenticating
// transports, which address requests to the registry's name (so credentials and tokens are chosen
// by that name) and never see the endpoint.
type endpointTransport struct {
	endpoints map[string]endpoint // by normalised registry name
	insecure  map[string]bool     // by normalised registry name
	base      http.RoundTripper
}

// RoundTrip implements http.RoundTripper.
func (t *endpointTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	registry := foldDockerHub(strings.ToLower(req.URL.Host))
	if ep, ok := t.endpoints[registry]; ok {
		out := req.Clone(req.Context())
		out.URL.Scheme, out.URL.Host, out.Host = ep.scheme, ep.host, ""
		return t.base.RoundTrip(out)
	}
	if req.URL.Scheme != "https" && !t.insecure[registry] {
		if req.Body != nil {
			_ = req.Body.Close() // a RoundTripper closes the body, even on error
		}
		return nil, fmt.Errorf("refusing plain HTTP to %s: it is not listed as an insecure registry", req.URL.Host)
	}
	return t.base.RoundTrip(req)
}
