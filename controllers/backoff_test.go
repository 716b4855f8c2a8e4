package controllers

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers/resolve"
)

// fixedRand is a source of jitter that always returns v.
func fixedRand(v float64) func() float64 { return func() float64 { return v } }

// justBelowOne is the largest value a source of jitter may return.
var justBelowOne = math.Nextafter(1, 0)

func TestBackoffGrowsToItsCap(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	// d = min(5 min, 5 s·2^(n-1)) for the n-th failure in a row.
	want := []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second, 40 * time.Second,
		80 * time.Second, 160 * time.Second, 5 * time.Minute, 5 * time.Minute, 5 * time.Minute}
	for _, tc := range []struct {
		name string
		rand float64
		// delay is the delay expected of d.
		delay func(d time.Duration) time.Duration
	}{
		{"the least jitter waits half", 0, func(d time.Duration) time.Duration { return d / 2 }},
		{"the most jitter waits all of it", justBelowOne, func(d time.Duration) time.Duration { return d }},
		{"in between", 0.5, func(d time.Duration) time.Duration { return d/2 + d/4 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBackoff(retryKeys, fixedRand(tc.rand))
			now := t0
			for i, d := range want {
				got := b.failed("k", now)
				// The most jitter may round a nanosecond short.
				if exp := tc.delay(d); got < exp-time.Nanosecond || got > exp {
					t.Errorf("failure %d: waits %v, want %v", i+1, got, exp)
				}
				now = now.Add(got) // retried when due, and failed again
			}
		})
	}
	t.Run("many failures never overflow past the cap", func(t *testing.T) {
		b := newBackoff(retryKeys, fixedRand(justBelowOne))
		for i := range 200 {
			if got := b.failed("k", t0); got <= 0 || got > retryMax {
				t.Fatalf("failure %d: waits %v, want within (0, %v]", i+1, got, retryMax)
			}
		}
	})
}

func TestBackoffJitterStaysWithinBounds(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	for n, d := range []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second} {
		seen := map[time.Duration]bool{}
		for i := range 1000 {
			b := newBackoff(retryKeys, nil) // math/rand/v2
			var got time.Duration
			for range n + 1 {
				got = b.failed("k", t0)
			}
			if got < d/2 || got > d {
				t.Fatalf("failure %d, sample %d: waits %v, want within [%v, %v]", n+1, i, got, d/2, d)
			}
			seen[got] = true
		}
		if len(seen) < 100 {
			t.Errorf("failure %d: %d distinct delays in 1000, want them spread", n+1, len(seen))
		}
	}
}

func TestBackoffWaitsUntilTheRetryIsDue(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	b := newBackoff(retryKeys, fixedRand(0.5))
	if w := b.wait("k", t0); w != 0 {
		t.Fatalf("a key that never failed waits %v", w)
	}
	delay := b.failed("k", t0)
	if w := b.wait("k", t0); w != delay {
		t.Errorf("just after the failure: waits %v, want %v", w, delay)
	}
	if w := b.wait("k", t0.Add(time.Second)); w != delay-time.Second {
		t.Errorf("a second later: waits %v, want %v", w, delay-time.Second)
	}
	if w := b.wait("k", t0.Add(delay)); w != 0 {
		t.Errorf("when due: waits %v, want 0", w)
	}
	if w := b.wait("other", t0); w != 0 {
		t.Errorf("another key waits %v", w)
	}
}

func TestBackoffSuccessResetsTheKey(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	b := newBackoff(retryKeys, fixedRand(0))
	for range 4 {
		b.failed("k", t0)
	}
	b.failed("other", t0)
	b.succeeded("k")
	if w := b.wait("k", t0); w != 0 {
		t.Errorf("after a success: waits %v, want 0", w)
	}
	if n := b.size(); n != 1 {
		t.Errorf("%d keys remembered after a success, want 1 (the other)", n)
	}
	if got := b.failed("k", t0); got != retryBase/2 {
		t.Errorf("the first failure after a success waits %v, want %v (from the base again)", got, retryBase/2)
	}
}

func TestBackoffMemoryIsBounded(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	t.Run("at most maxKeys keys, the one failed longest ago forgotten first", func(t *testing.T) {
		b := newBackoff(100, fixedRand(0))
		b.failed("first", t0)
		b.failed("first", t0) // its second failure in a row
		for i := range 10_000 {
			b.failed(fmt.Sprint("key-", i), t0.Add(time.Duration(i+1)*time.Millisecond))
			if n := b.size(); n > 100 {
				t.Fatalf("%d keys remembered, want at most 100", n)
			}
		}
		if got := b.failed("first", t0.Add(time.Minute)); got != retryBase/2 {
			t.Errorf("an evicted key waits %v on its next failure, want %v (forgotten)", got, retryBase/2)
		}
		if got := b.failed("key-9999", t0.Add(time.Minute)); got != retryBase {
			t.Errorf("the key failed last waits %v on its next failure, want %v (remembered)", got, retryBase)
		}
	})
	t.Run("keys no longer retried are forgotten", func(t *testing.T) {
		b := newBackoff(retryKeys, fixedRand(0))
		for i := range 1000 {
			b.failed(fmt.Sprint("gone-", i), t0) // their Prewarms were deleted: never retried
		}
		b.failed("live", t0)
		// Retried each time it is due, "live" is kept; the others' retries have been due for
		// longer than the cap by the time the next sweep runs.
		now := t0
		for now.Before(t0.Add(3 * retryMax)) {
			now = now.Add(b.failed("live", now))
		}
		if n := b.size(); n != 1 {
			t.Errorf("%d keys remembered, want 1 (live)", n)
		}
		if got := b.failed("live", now); got != retryMax/2 {
			t.Errorf("the key still being retried waits %v on its next failure, want %v (its run remembered)", got, retryMax/2)
		}
	})
}

// flakyResolver fails while err is set and counts its calls.
type flakyResolver struct {
	err    error
	digest string
	calls  int
}

func (f *flakyResolver) Resolve(_ context.Context, ref string, _ bool, _ []string, _ [][]byte) (v1.ResolvedReference, error) {
	f.calls++
	if f.err != nil {
		return v1.ResolvedReference{}, f.err
	}
	return v1.ResolvedReference{Repository: strings.Split(ref, ":")[0], Digest: f.digest}, nil
}

// TestPrewarmRetriesAFailedReferenceWithBackoff: a reference that fails keeps its last
// resolution with the error beside it, and the registry is not asked again before its retry is
// due, however often the Prewarm reconciles; the delay grows with each failure in a row, and a
// success or an edit of the Prewarm starts over.
func TestPrewarmRetriesAFailedReferenceWithBackoff(t *testing.T) {
	ctx := t.Context()
	t0 := time.Unix(1_700_000_000, 0)
	res := &flakyResolver{digest: "sha256:" + strings.Repeat("a", 64)}
	r := &PrewarmReconciler{Resolver: res, retries: newBackoff(retryKeys, fixedRand(0))}
	p := &v1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "team", UID: "uid-1", Generation: 1},
		Spec:       v1.PrewarmSpec{Images: []string{"registry.test/app:1"}},
	}
	secrets := func() [][]byte { return nil }
	const refresh = 10 * time.Minute

	// step resolves at now and checks how many registry calls it made and when it wants to
	// come back.
	step := func(at time.Duration, wantCalls int, wantNext time.Duration) {
		t.Helper()
		before := res.calls
		next := r.resolve(ctx, p, nil, secrets, t0.Add(at))
		if calls := res.calls - before; calls != wantCalls || next != wantNext {
			t.Errorf("at %v: %d registry calls, next in %v; want %d, %v", at, calls, next, wantCalls, wantNext)
		}
		if len(p.Status.References) != 1 || p.Status.References[0].Digest != res.digest {
			t.Errorf("at %v: references %+v, want the last resolution kept", at, p.Status.References)
		}
	}

	step(0, 1, refresh)
	res.err = errors.New("registry down")
	step(refresh, 1, 2500*time.Millisecond) // failure 1: 5 s, the least jitter
	if ref := p.Status.References[0]; ref.Error != "registry down" || !ref.ResolvedAt.Time.Equal(t0) {
		t.Errorf("after a failure: %+v, want the last resolution with the error beside it", ref)
	}
	step(refresh+time.Second, 0, 1500*time.Millisecond) // a NodeCache changed: not retried yet
	step(refresh+2500*time.Millisecond, 1, 5*time.Second)
	step(refresh+7500*time.Millisecond, 1, 10*time.Second)
	step(refresh+8*time.Second, 0, 9500*time.Millisecond)

	p.Generation = 2 // an edit is tried at once
	step(refresh+9*time.Second, 1, 2500*time.Millisecond)

	res.err = nil
	step(refresh+12*time.Second, 1, refresh)
	if ref := p.Status.References[0]; ref.Error != "" {
		t.Errorf("after a success: error %q kept", ref.Error)
	}
	if n := r.retries.size(); n != 1 {
		// The success forgot generation 2's key; generation 1's waits for the sweep.
		t.Errorf("%d keys remembered, want 1", n)
	}
	res.err = errors.New("registry down")
	step(2*refresh+12*time.Second, 1, 2500*time.Millisecond) // from the base again
}

// failingIssuer refuses every exchange and counts them.
type failingIssuer struct{ calls int }

func (f *failingIssuer) PullCredential(context.Context, string, [][]byte) (resolve.Credential, error) {
	f.calls++
	return resolve.Credential{}, errors.New("token endpoint down")
}

// noSecrets is an API server without Secrets.
type noSecrets struct{ client.Reader }

func (noSecrets) Get(_ context.Context, key client.ObjectKey, _ client.Object, _ ...client.GetOption) error {
	return apierrors.NewNotFound(schema.GroupResource{Resource: "secrets"}, key.Name)
}

// TestPrewarmRetriesAFailedTokenWithBackoff: a pull token that could not be had keeps the last
// one named, and the registry is not asked again before its retry is due.
func TestPrewarmRetriesAFailedTokenWithBackoff(t *testing.T) {
	ctx := t.Context()
	t0 := time.Unix(1_700_000_000, 0)
	issuer := &failingIssuer{}
	now := t0
	r := &PrewarmReconciler{
		Tokens:  &PullTokens{Reader: noSecrets{}, Namespace: "shoal-system", Issuer: issuer, Now: func() time.Time { return now }},
		retries: newBackoff(retryKeys, fixedRand(0)),
	}
	p := &v1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "team", UID: "uid-1", Generation: 1},
		Spec:       v1.PrewarmSpec{ImagePullSecrets: []corev1.LocalObjectReference{{Name: "pull"}}},
		Status: v1.PrewarmStatus{References: []v1.ResolvedReference{
			{Reference: "private.test/app:1", Repository: "private.test/app", PullSecretName: "last"},
			{Reference: "private.test/app:2", Repository: "private.test/app", PullSecretName: "last"},
		}},
	}
	secrets := func() [][]byte { return [][]byte{[]byte("{}")} }
	for _, s := range []struct {
		at        time.Duration
		wantCalls int
		wantNext  time.Duration
	}{
		{0, 1, 2500 * time.Millisecond}, // one exchange for both references of the repository
		{time.Second, 0, 1500 * time.Millisecond},
		{2500 * time.Millisecond, 1, 5 * time.Second},
		{7500 * time.Millisecond, 1, 10 * time.Second},
	} {
		now = t0.Add(s.at)
		before := issuer.calls
		next := r.ensureTokens(ctx, p, secrets, now)
		if calls := issuer.calls - before; calls != s.wantCalls || next != s.wantNext {
			t.Errorf("at %v: %d exchanges, next in %v; want %d, %v", s.at, calls, next, s.wantCalls, s.wantNext)
		}
		for _, ref := range p.Status.References {
			if ref.PullSecretName != "last" {
				t.Errorf("at %v: %s names %q, want the last token kept", s.at, ref.Reference, ref.PullSecretName)
			}
		}
	}
}
