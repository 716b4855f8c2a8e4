package nodecache

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/upstream"
	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

var hex64 = strings.Repeat("ab", 32)

func TestParseReference(t *testing.T) {
	for _, tc := range []struct {
		in, registry, repo string
	}{
		{"registry.test/team/app:1.4@sha256:" + hex64, "registry.test", "team/app"},
		{"registry.test:5000/app@sha256:" + hex64, "registry.test:5000", "app"},
		// The controller writes Docker Hub as go-containerregistry does; containerd asks the
		// mirror for docker.io, and the store and swarm must see the same names.
		{"index.docker.io/library/nginx:1.27@sha256:" + hex64, "docker.io", "library/nginx"},
		{"docker.io/nginx@sha256:" + hex64, "docker.io", "library/nginx"},
	} {
		ref, err := parseReference(tc.in)
		if err != nil || ref.registry != tc.registry || ref.repo != tc.repo || ref.digest.Hex != hex64 {
			t.Errorf("parseReference(%q) = %+v, %v; want %s, %s", tc.in, ref, err, tc.registry, tc.repo)
		}
	}
	for _, bad := range []string{
		"registry.test/team/app:1.4",                     // no digest
		"registry.test/team/app@sha512:" + hex64 + hex64, // not sha256
		"registry.test/Team/app@sha256:" + hex64,         // upper case
		"registry.test/team/app@sha256:abc",
	} {
		if _, err := parseReference(bad); !errors.Is(err, errPermanent) {
			t.Errorf("parseReference(%q) = %v, want a permanent error", bad, err)
		}
	}
}

func TestReasonOf(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("fetch x: %w", err) }
	for _, tc := range []struct {
		err  error
		want v1alpha1.FailureReason
	}{
		{wrap(upstream.ErrUnauthorized), v1alpha1.ReasonUnauthorized},
		{wrap(upstream.ErrNotFound), v1alpha1.ReasonNotFound},
		{wrap(store.ErrDigestMismatch), v1alpha1.ReasonVerifyFailed},
		{wrap(upstream.ErrInvalid), v1alpha1.ReasonVerifyFailed},
		{wrap(store.ErrFull), v1alpha1.ReasonStoreFull},
		{wrap(store.ErrStalled), v1alpha1.ReasonFetchStalled},
		{fmt.Errorf("%w (%w)", errNoProgress, errors.New("context canceled")), v1alpha1.ReasonFetchStalled},
		{wrap(upstream.ErrUnavailable), v1alpha1.ReasonResolveFailed},
		{errors.New("anything else"), v1alpha1.ReasonResolveFailed},
	} {
		if got := reasonOf(tc.err); got != tc.want {
			t.Errorf("reasonOf(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}

func TestTruncate(t *testing.T) {
	long := strings.Repeat("é", 200) // 400 bytes
	got := truncate(long, maxMessage)
	if len(got) > maxMessage || !utf8.ValidString(got) || !strings.HasSuffix(got, "…") {
		t.Errorf("truncate: %d bytes, valid %v: %q", len(got), utf8.ValidString(got), got)
	}
	if got := truncate("short", maxMessage); got != "short" {
		t.Errorf("truncate(short) = %q", got)
	}
}

func TestClassify(t *testing.T) {
	base := func() v1alpha1.NodeCacheStatus {
		return v1alpha1.NodeCacheStatus{
			ObservedGeneration: 1, Ready: "0/1",
			Store: &v1alpha1.StoreUsage{CapacityBytes: 100, UsedBytes: 10},
			Items: []v1alpha1.NodeCacheItemStatus{{Reference: "r", State: v1alpha1.ItemFetching, Bytes: 1, TotalBytes: 10}},
		}
	}
	for _, tc := range []struct {
		name   string
		mutate func(*v1alpha1.NodeCacheStatus)
		want   change
	}{
		{"nothing", func(*v1alpha1.NodeCacheStatus) {}, noChange},
		{"store usage", func(s *v1alpha1.NodeCacheStatus) { s.Store.UsedBytes = 20 }, usageChange},
		{"bytes", func(s *v1alpha1.NodeCacheStatus) { s.Items[0].Bytes = 5 }, progressChange},
		{"back to pending", func(s *v1alpha1.NodeCacheStatus) { s.Items[0].State = v1alpha1.ItemPending }, progressChange},
		{"held", func(s *v1alpha1.NodeCacheStatus) { s.Items[0].State = v1alpha1.ItemReady; s.Ready = "1/1" }, urgentChange},
		{"failed", func(s *v1alpha1.NodeCacheStatus) { s.Items[0].State = v1alpha1.ItemFailed }, urgentChange},
		{"new spec", func(s *v1alpha1.NodeCacheStatus) { s.ObservedGeneration = 2 }, urgentChange},
		{"item added", func(s *v1alpha1.NodeCacheStatus) {
			s.Items = append(s.Items, v1alpha1.NodeCacheItemStatus{Reference: "q", State: v1alpha1.ItemPending})
		}, urgentChange},
	} {
		cur, next := base(), base()
		tc.mutate(&next)
		if got := classify(&cur, &next); got != tc.want {
			t.Errorf("%s: classify = %d, want %d", tc.name, got, tc.want)
		}
	}
}
