package upstream_test

import (
	"errors"
	"log/slog"
	"net/http"
	"testing"

	"github.com/shoal-dev/shoal/agent/upstream"
	"github.com/shoal-dev/shoal/internal/logcheck"
)

// TestLogKeys runs requests that succeed, fail at the registry and fail to authenticate, and
// checks the keys of everything the client logs.
func TestLogKeys(t *testing.T) {
	h := &logcheck.Recorder{}
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
	if n := len(h.Records()); n < 2 {
		t.Fatalf("%d records logged, want at least a request and a failed authentication", n)
	}
	problems, withError := h.Check(nil)
	for _, p := range problems {
		t.Error(p)
	}
	if withError == 0 {
		t.Error("no record carried the failed authentication's error")
	}
}
