package resolve

import (
	"errors"
	"net/http"
	"strings"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/shoal-dev/shoal/api/v1alpha1"
)

// Error is a failed resolution: the reference as written, why it failed in the API's terms, and
// the cause.
type Error struct {
	// Reference is the reference as the caller wrote it.
	Reference string
	// Reason is ResolveFailed, Unauthorized, NotFound or PlatformUnavailable.
	Reason v1alpha1.FailureReason
	// Err is the cause.
	Err error
}

// Error implements error.
func (e *Error) Error() string {
	msg := "resolve " + truncate(e.Reference) + ": " + e.Err.Error()
	switch e.Reason {
	case v1alpha1.ReasonUnauthorized:
		msg += " (the registry refused the credentials: check that an imagePullSecret of type " +
			"kubernetes.io/dockerconfigjson holds credentials for this registry that may pull this repository)"
	case v1alpha1.ReasonNotFound:
		msg += " (check the repository, tag or digest; some registries also answer so when credentials are missing)"
	}
	return msg
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Reason returns why an error of Resolve happened, as the API counts failures: Unauthorized (the
// registry answered 401 or 403), NotFound (404, or the error code MANIFEST_UNKNOWN, NAME_UNKNOWN
// or BLOB_UNKNOWN), PlatformUnavailable (an index lacks a platform asked for) or ResolveFailed
// (anything else: a malformed reference, platform or pull secret, the network, a timeout, a 5xx,
// a malformed manifest).
// It returns "" for nil.
func Reason(err error) v1alpha1.FailureReason {
	if err == nil {
		return ""
	}
	if e, ok := errors.AsType[*Error](err); ok {
		return e.Reason
	}
	return classify(err)
}

// classify maps a registry's answer to a failure reason.
func classify(err error) v1alpha1.FailureReason {
	terr, ok := errors.AsType[*transport.Error](err)
	if !ok {
		return v1alpha1.ReasonResolveFailed
	}
	switch terr.StatusCode {
	case http.StatusUnauthorized, http.StatusForbidden:
		return v1alpha1.ReasonUnauthorized
	}
	// A 404 from the ping ("/v2/") or the token realm says the endpoint is no registry we can
	// use, not that the content is missing.
	if terr.Request != nil && (!strings.HasPrefix(terr.Request.URL.Path, "/v2/") || terr.Request.URL.Path == "/v2/") {
		return v1alpha1.ReasonResolveFailed
	}
	if terr.StatusCode == http.StatusNotFound {
		return v1alpha1.ReasonNotFound
	}
	for _, d := range terr.Errors {
		switch d.Code {
		case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
			return v1alpha1.ReasonUnauthorized
		case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
			return v1alpha1.ReasonNotFound
		}
	}
	return v1alpha1.ReasonResolveFailed
}
