package upstream_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/shoal-dev/shoal/agent/upstream"
)

// TestMemoryKnobs checks what Memory offers beyond the contract: failing every call with a
// given error, counting calls and bytes read, and a body that fails once its context is done.
func TestMemoryKnobs(t *testing.T) {
	m := upstream.NewMemory()
	content := []byte("0123456789")
	d := m.AddBlob("registry.test", "app", content)

	ctx, cancel := context.WithCancel(t.Context())
	body, _, err := m.Blob(ctx, "registry.test", "app", d, 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, 1)
	if _, err := io.ReadFull(body, first); err != nil || first[0] != '2' {
		t.Fatalf("first byte %q, %v; want '2'", first, err)
	}
	cancel()
	if _, err := body.Read(first); !errors.Is(err, context.Canceled) {
		t.Errorf("read after cancel: err = %v, want context.Canceled", err)
	}
	_ = body.Close()
	if _, err := m.HeadBlob(t.Context(), "registry.test", "app", d); err != nil {
		t.Fatal(err)
	}
	want := upstream.MemoryStats{Blob: 1, HeadBlob: 1, BlobBytes: 1}
	if got := m.Stats(); got != want {
		t.Errorf("Stats = %+v, want %+v", got, want)
	}

	m.SetFailure(fmt.Errorf("token: %w", upstream.ErrUnauthorized))
	_, err = m.HeadBlob(t.Context(), "registry.test", "app", d)
	var uerr *upstream.Error
	if !errors.Is(err, upstream.ErrUnauthorized) || errors.Is(err, upstream.ErrUnavailable) || !errors.As(err, &uerr) {
		t.Errorf("with a failure set: err = %v, want an *upstream.Error matching ErrUnauthorized only", err)
	}
	m.SetFailure(nil)
	if _, err := m.HeadBlob(t.Context(), "registry.test", "app", d); err != nil {
		t.Errorf("failure cleared: %v", err)
	}
}
