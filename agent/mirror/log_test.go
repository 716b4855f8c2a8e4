package mirror

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/http"
	"testing"

	"github.com/shoal-dev/shoal/internal/logcheck"
)

// TestLogKeys serves, refuses and aborts requests and checks the keys of everything the mirror
// logs: snake_case, errors under "error", and values that a JSON handler writes as text.
func TestLogKeys(t *testing.T) {
	h := &logcheck.Recorder{}
	tm := newTestMirrorWith(t, nil, []Option{WithLogger(slog.New(h))})
	content := randomBytes(t, 64<<10)
	d := tm.upstream.addBlob(content)
	corrupted := bytes.Clone(content)
	corrupted[0] ^= 0xff
	bad := digestOf(append(bytes.Clone(content), 1))
	tm.upstream.addBlobAs(bad, corrupted)
	for _, path := range []string{
		blobPath(d),                         // served
		blobPath(digestOf([]byte("nope"))),  // not found upstream
		"/v2/app/blobs/sha256:xyz",          // refused
		blobPath(bad),                       // aborted mid-body
		"/v2/app/manifests/v1?ns=elsewhere", // not mirrored
	} {
		if _, _, err := tm.get(t, http.MethodGet, path, nil); err != nil && path != blobPath(bad) {
			t.Fatalf("GET %s: %v", path, err)
		}
	}
	problems, withError := h.Check(func(a slog.Attr) string {
		if k, ok := a.Value.Any().(Kind); ok {
			return fmt.Sprintf("%q is a Kind, which a JSON handler writes as a number; log %q", a.Key, k.String())
		}
		return ""
	})
	for _, p := range problems {
		t.Error(p)
	}
	if withError < 3 {
		t.Errorf("%d records carried an error, want at least 3 (not found, refused, aborted)", withError)
	}
}
