package upstream_test

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"regexp"
	"sync"
	"testing"

	"github.com/shoal-dev/shoal/agent/upstream"
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

// checkKeys fails the test for a key that is not snake_case or an error under another key than
// "error", and returns how many records carried an error.
func (h *recordingHandler) checkKeys(t *testing.T) (withError int) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.records {
		r.Attrs(func(a slog.Attr) bool {
			if !snakeCase.MatchString(a.Key) {
				t.Errorf("%q: key %q is not snake_case", r.Message, a.Key)
			}
			if _, isErr := a.Value.Any().(error); isErr {
				if a.Key != "error" {
					t.Errorf("%q: an error under the key %q, want \"error\"", r.Message, a.Key)
				}
				withError++
			}
			return true
		})
	}
	return withError
}

// TestLogKeys runs requests that succeed, fail at the registry and fail to authenticate, and
// checks the keys of everything the client logs.
func TestLogKeys(t *testing.T) {
	h := &recordingHandler{}
	host := fakeRegistry(t, func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusNotFound)
	})
	c := newClient(host, upstream.WithLogger(slog.New(h)))
	t.Cleanup(c.CloseIdleConnections)
	if _, err := c.Manifest(testContext(t), "registry.test", "app", "v1", nil); !errors.Is(err, upstream.ErrNotFound) {
		t.Fatalf("err = %v, want ErrNotFound", err)
	}
	down := newClient(freeAddr(t), upstream.WithLogger(slog.New(h)))
	t.Cleanup(down.CloseIdleConnections)
	if _, err := down.HeadBlob(testContext(t), "registry.test", "app", sha256Of([]byte("x"))); !errors.Is(err, upstream.ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	if len(h.records) < 2 {
		t.Fatalf("%d records logged, want at least a request and a failed authentication", len(h.records))
	}
	if h.checkKeys(t) == 0 {
		t.Error("no record carried the failed authentication's error")
	}
}
