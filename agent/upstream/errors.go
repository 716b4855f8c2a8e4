package upstream

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Kinds of failure, for errors.Is. Every error returned by a Client is an *Error and matches at
// most one of them; an error that matches none (a caller's cancellation, an unexpected status) is
// still an *Error with the details.
var (
	// ErrNotFound: the registry does not have the repository, manifest or blob (404,
	// NAME_UNKNOWN, MANIFEST_UNKNOWN, BLOB_UNKNOWN).
	ErrNotFound = errors.New("not found upstream")
	// ErrUnauthorized: the registry refused us (401/403 after authenticating, or it demands
	// credentials that we do not have), or the token handshake failed.
	ErrUnauthorized = errors.New("unauthorized upstream")
	// ErrUnavailable: the registry could not be reached or did not answer in time (dial error,
	// timeout, stalled body, 5xx, 429), its TLS handshake failed (a certificate not trusted or
	// not valid for its name, a client certificate refused), or the endpoint or its TLS
	// settings could not be set up here (a CA file missing, say).
	ErrUnavailable = errors.New("upstream unavailable")
	// ErrInvalid: the registry answered with something we must not use (digest mismatch,
	// oversized manifest, wrong Content-Range).
	ErrInvalid = errors.New("invalid response from upstream")
	// ErrRangeUnsupported: a ranged blob request starting after byte 0 was answered with the
	// whole blob (200). Blob does not discard its way to the offset: the caller (a segmented
	// fetch) should fall back to one whole-blob download instead.
	ErrRangeUnsupported = errors.New("upstream ignores range requests")
	// ErrBadRequest: the caller's repository, reference, digest or range is malformed; nothing
	// was sent upstream.
	ErrBadRequest = errors.New("bad request")
)

// Error describes a failed upstream operation: what was being done, to which registry, and how
// the registry answered.
type Error struct {
	// Registry is the logical registry name (e.g. "docker.io").
	Registry string
	// Endpoint is where the registry is served (e.g. "https://registry-1.docker.io").
	Endpoint string
	// Op says what was being done, e.g. "get manifest library/alpine:3.20".
	Op string
	// StatusCode is the HTTP status of the answer, 0 if there was none.
	StatusCode int
	// Code is the first OCI error code of the answer's body, if it had one (e.g. "MANIFEST_UNKNOWN").
	Code string
	// Err is the underlying cause.
	Err error

	kind error // one of the Err* kinds, or nil
}

// Error implements error.
func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s from %s", e.Op, e.Registry)
	if e.Endpoint != "" && e.Endpoint != "https://"+e.Registry {
		fmt.Fprintf(&b, " (%s)", e.Endpoint)
	}
	if e.StatusCode != 0 {
		fmt.Fprintf(&b, ": HTTP %d", e.StatusCode)
	}
	if e.Code != "" {
		fmt.Fprintf(&b, " %s", e.Code)
	}
	if e.Err != nil {
		fmt.Fprintf(&b, ": %v", e.Err)
	}
	return b.String()
}

// Unwrap returns the underlying cause.
func (e *Error) Unwrap() error { return e.Err }

// Is reports whether the error is of the given kind (ErrNotFound, ErrUnavailable, ...).
func (e *Error) Is(target error) bool { return e.kind != nil && target == e.kind }

// statusKind classifies a registry's answer by status and OCI error code.
func statusKind(status int, code string) error {
	switch {
	case status == http.StatusNotFound, code == "NAME_UNKNOWN", code == "MANIFEST_UNKNOWN", code == "BLOB_UNKNOWN":
		return ErrNotFound
	case status == http.StatusUnauthorized, status == http.StatusForbidden, code == "UNAUTHORIZED", code == "DENIED":
		return ErrUnauthorized
	case status == http.StatusTooManyRequests, status == http.StatusRequestTimeout, status >= 500,
		code == "TOOMANYREQUESTS", code == "UNAVAILABLE":
		return ErrUnavailable
	case status == http.StatusRequestedRangeNotSatisfiable:
		return ErrBadRequest
	}
	return nil
}

// failureKind classifies the cause of a cancelled request. A caller's own cancellation is not
// the registry's fault and gets no kind (errors.Is(err, context.Canceled) still holds); a
// timeout or a stalled body means the registry is not answering.
func failureKind(cause error) error {
	if errors.Is(cause, context.Canceled) {
		return nil
	}
	return ErrUnavailable
}

// maxErrorBody bounds how much of an error answer is read for its OCI error code.
const maxErrorBody = 64 << 10

// responseError turns a non-success answer into an error, reading the OCI error body if any.
func responseError(resp *http.Response) (status int, code string, err error) {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	var oci struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if json.Unmarshal(body, &oci) == nil && len(oci.Errors) > 0 {
		code = oci.Errors[0].Code
		if msg := oci.Errors[0].Message; msg != "" {
			return resp.StatusCode, code, errors.New(msg)
		}
		return resp.StatusCode, code, nil
	}
	return resp.StatusCode, "", errors.New(http.StatusText(resp.StatusCode))
}

// transportFailure classifies an error of go-containerregistry's transport: a failed ping or
// token exchange, during the handshake or when a bearer token is refreshed after a 401.
func transportFailure(err error) (status int, code string, kind error) {
	if errors.Is(err, errCredentials) {
		return 0, "", ErrUnauthorized
	}
	var terr *transport.Error
	if errors.As(err, &terr) {
		if len(terr.Errors) > 0 {
			code = string(terr.Errors[0].Code)
		}
		if kind := statusKind(terr.StatusCode, code); errors.Is(kind, ErrUnauthorized) || errors.Is(kind, ErrUnavailable) {
			return terr.StatusCode, code, kind
		}
		// Anything else from /v2/ or the token realm (404, 400, ...) means the endpoint is
		// not a registry we can use, not that the content is missing.
		return terr.StatusCode, code, ErrUnavailable
	}
	if isTLSError(err) || isNetworkError(err) {
		return 0, "", ErrUnavailable
	}
	// A token answer without a token, a realm refused by the SSRF guard, unreadable credentials:
	// we could not authenticate.
	return 0, "", ErrUnauthorized
}

// isTLSError reports a failed TLS handshake on our side: the registry's certificate is not
// trusted, not valid for its name or expired, or it did not speak TLS. (A registry refusing our
// client certificate sends an alert, which arrives as a network error.)
func isTLSError(err error) bool {
	var (
		verify   *tls.CertificateVerificationError
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
		header   tls.RecordHeaderError
	)
	return errors.As(err, &verify) || errors.As(err, &unknown) || errors.As(err, &hostname) ||
		errors.As(err, &invalid) || errors.As(err, &header)
}

func isNetworkError(err error) bool {
	var netErr net.Error
	return errors.As(err, &netErr) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF)
}
