package kubeseeds_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shoal-dev/shoal/agent/kubeseeds"
	shoalv1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/kubetest"
)

const (
	d1 = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	d2 = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
)

type calls struct {
	mu  sync.Mutex
	got []string
}

func (c *calls) prefetch(_ context.Context, registry, repo string, d v1.Hash, size int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.got = append(c.got, fmt.Sprintf("%s %s %s %d", registry, repo, d, size))
	return 1, nil
}

func (c *calls) list() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Sorted(slices.Values(c.got))
}

func (c *calls) wait(t *testing.T, want ...string) {
	t.Helper()
	want = slices.Sorted(slices.Values(want))
	for deadline := time.Now().Add(30 * time.Second); !slices.Equal(c.list(), want); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("prefetched %v, want %v", c.list(), want)
		}
	}
}

func seed(name string) *shoalv1.SwarmSeed {
	return &shoalv1.SwarmSeed{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: shoalv1.SwarmSeedSpec{
			Repository: "registry.test/team/app", Manifest: d1,
			Blobs: []shoalv1.SeedBlob{{Digest: d1, Size: 100}, {Digest: d2, Size: 200}},
		},
	}
}

func TestWatcherPrefetchesEachSeedOnce(t *testing.T) {
	env := kubetest.Start(t)
	c := &calls{}
	w := kubeseeds.New(env.Config, c.prefetch, kubeseeds.WithLogger(slog.New(slog.DiscardHandler)))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return after its context ended")
		}
	}()

	s := seed("sha256-1111")
	if err := env.Client.Create(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	first := []string{"registry.test team/app " + d1 + " 100", "registry.test team/app " + d2 + " 200"}
	c.wait(t, first...)

	// An update is not a new announcement.
	s.Labels = map[string]string{"touched": "yes"}
	if err := env.Client.Update(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	// A new SwarmSeed after it (the controller seeds the image again later) is.
	if err := env.Client.Delete(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Create(t.Context(), seed("sha256-1111")); err != nil {
		t.Fatal(err)
	}
	c.wait(t, append(first, first...)...)
}

func TestSplitRepository(t *testing.T) {
	for in, want := range map[string]string{
		"registry.test/team/app":           "registry.test team/app",
		"registry.test:5000/app":           "registry.test:5000 app",
		"index.docker.io/library/nginx":    "docker.io library/nginx",
		"registry-1.docker.io/library/xyz": "docker.io library/xyz",
	} {
		registry, repo, err := kubeseeds.SplitRepository(in)
		if got := registry + " " + repo; err != nil || got != want {
			t.Errorf("SplitRepository(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "app", "/app", "registry.test/", "registry.test/../etc", "registry.test/UPPER", "bad host!/app", "registry.test/a//b"} {
		if _, _, err := kubeseeds.SplitRepository(bad); err == nil {
			t.Errorf("SplitRepository(%q): no error", bad)
		}
	}
}
