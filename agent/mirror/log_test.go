package mirror

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"regexp"
	"sync"
	"testing"
)

// recordingHandler keeps every record logged through it.
type recordingHandler struct {
	mu      sync.Mutex
	records []slog.Record
}

func (h *recordingHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *recordingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records = append(h.records, r.Clone())
	return nil
}

func (h *recordingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordingHandler) WithGroup(string) slog.Handler      { return h }

var snakeCase = regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)

// TestLogKeys serves, refuses and aborts requests and checks the keys of everything the mirror
// logs: snake_case, errors under "error", and values that a JSON handler writes as text.
func TestLogKeys(t *testing.T) {
	h := &recordingHandler{}
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
	h.mu.Lock()
	defer h.mu.Unlock()
	withError := 0
	for _, r := range h.records {
		r.Attrs(func(a slog.Attr) bool {
			if !snakeCase.MatchString(a.Key) {
				t.Errorf("%q: key %q is not snake_case", r.Message, a.Key)
			}
			switch v := a.Value.Any().(type) {
			case error:
				if a.Key != "error" {
					t.Errorf("%q: an error under the key %q, want \"error\"", r.Message, a.Key)
				}
				withError++
			case Kind:
				t.Errorf("%q: %q is a Kind, which a JSON handler writes as a number; log %q", r.Message, a.Key, v.String())
			}
			return true
		})
	}
	if withError < 3 {
		t.Errorf("%d records carried an error, want at least 3 (not found, refused, aborted)", withError)
	}
}
