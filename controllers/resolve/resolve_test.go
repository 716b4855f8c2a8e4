package resolve

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shoal-dev/shoal/api/v1alpha1"
)

var (
	amd64 = v1.Platform{OS: "linux", Architecture: "amd64"}
	arm64 = v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}
	armv7 = v1.Platform{OS: "linux", Architecture: "arm", Variant: "v7"}
)

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func checkManifests(t *testing.T, got, want []Manifest) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d manifests, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		if !reflect.DeepEqual(got[i], want[i]) {
			t.Errorf("manifest %d:\n got %+v\nwant %+v", i, got[i], want[i])
		}
	}
}

func TestResolveIndex(t *testing.T) {
	tr := startRegistry(t)
	idx, imgs := indexOf(t, amd64, arm64, armv7)
	tr.pushIndex(t, "team/app:1.4", idx)
	r := newTestResolver(t, tr)

	tests := []struct {
		name      string
		platforms []string
		want      []int // indexes into imgs, in the order expected
	}{
		{name: "every platform, attestation aside", want: []int{0, 1, 2}},
		{name: "platforms asked, in the order asked, arm64 meaning arm64/v8", platforms: []string{"linux/arm64", "linux/amd64"}, want: []int{1, 0}},
		{name: "variant spelled out, arm meaning arm/v7", platforms: []string{"linux/arm64/v8", "linux/arm"}, want: []int{1, 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := r.Resolve(t.Context(), testRegistryName+"/team/app:1.4", Options{Platforms: tt.platforms})
			if err != nil {
				t.Fatal(err)
			}
			if got := res.Repository.Name(); got != "registry.test/team/app" {
				t.Errorf("repository %q", got)
			}
			if res.Tag != "1.4" || res.Digest != digestOf(t, idx) || res.MediaType != types.OCIImageIndex {
				t.Errorf("tag %q digest %s media type %s, want 1.4 %s %s", res.Tag, res.Digest, res.MediaType, digestOf(t, idx), types.OCIImageIndex)
			}
			if len(res.Unavailable) != 0 {
				t.Errorf("unavailable %v", res.Unavailable)
			}
			platforms := []v1.Platform{amd64, arm64, armv7}
			var want []Manifest
			for _, i := range tt.want {
				want = append(want, wantManifest(t, imgs[i], &platforms[i]))
			}
			checkManifests(t, res.Manifests, want)
		})
	}
}

func TestResolveSingleManifest(t *testing.T) {
	tr := startRegistry(t)
	img := imageFor(t, arm64)
	tr.pushImage(t, "app:2", img)
	r := newTestResolver(t, tr)

	res, err := r.Resolve(t.Context(), testRegistryName+"/app:2", Options{Platforms: []string{"linux/arm64"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Digest != digestOf(t, img) || res.MediaType != types.DockerManifestSchema2 || res.Tag != "2" {
		t.Errorf("digest %s media type %s tag %q", res.Digest, res.MediaType, res.Tag)
	}
	checkManifests(t, res.Manifests, []Manifest{wantManifest(t, img, &arm64)})
	if res.Size() != res.Manifests[0].Size {
		t.Errorf("Size() = %d, want %d", res.Size(), res.Manifests[0].Size)
	}

	// The same manifest by digest, tag written too: the digest decides, the tag is kept.
	byDigest := testRegistryName + "/app:2@" + digestOf(t, img).String()
	res, err = r.Resolve(t.Context(), byDigest, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Digest != digestOf(t, img) || res.Tag != "2" {
		t.Errorf("by digest: digest %s tag %q", res.Digest, res.Tag)
	}
}

func TestResolveArtifact(t *testing.T) {
	weights := static.NewLayer([]byte("weights"), "application/vnd.example.model.weights.v1.tar")
	tests := []struct {
		name         string
		artifactType string
		config       v1.Layer
	}{
		{"empty config", "application/vnd.example.model.v1", static.NewLayer([]byte("{}"), types.OCIEmptyJSON)},
		{"model config", "", static.NewLayer([]byte(`{"format":"gguf"}`), "application/vnd.example.model.config.v1+json")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := startRegistry(t)
			m, raw := tr.pushArtifact(t, "models/llm:q4", tt.artifactType, tt.config, weights)
			r := newTestResolver(t, tr)
			blobGetsBefore := tr.countPrefix(http.MethodGet, "/v2/models/llm/blobs/")

			// Platforms do not apply to artifacts: asking for some changes nothing.
			res, err := r.Resolve(t.Context(), testRegistryName+"/models/llm:q4", Options{Platforms: []string{"linux/amd64"}})
			if err != nil {
				t.Fatal(err)
			}
			wantType := tt.artifactType
			if wantType == "" {
				wantType = string(m.Config.MediaType)
			}
			want := Manifest{
				Digest: res.Digest, MediaType: types.OCIManifestSchema1, ArtifactType: wantType,
				Size:  int64(len(raw)) + m.Config.Size + m.Layers[0].Size,
				Blobs: []v1.Descriptor{m.Config, m.Layers[0]},
			}
			checkManifests(t, res.Manifests, []Manifest{want})
			if h, _, err := v1.SHA256(strings.NewReader(string(raw))); err != nil || res.Digest != h {
				t.Errorf("digest %s, want %s", res.Digest, h)
			}
			if n := tr.countPrefix(http.MethodGet, "/v2/models/llm/blobs/") - blobGetsBefore; n != 0 {
				t.Errorf("%d blob GETs: a config that is not an image config must not be read", n)
			}
		})
	}
}

func TestResolvePlatformUnavailable(t *testing.T) {
	tr := startRegistry(t)
	idx, imgs := indexOf(t, amd64, arm64)
	tr.pushIndex(t, "app:1", idx)
	tr.pushImage(t, "single:1", imageFor(t, amd64))
	r := newTestResolver(t, tr)

	res, err := r.Resolve(t.Context(), testRegistryName+"/app:1", Options{Platforms: []string{"linux/s390x", "linux/amd64"}})
	if Reason(err) != v1alpha1.ReasonPlatformUnavailable {
		t.Fatalf("Reason(%v) = %q, want PlatformUnavailable", err, Reason(err))
	}
	if !strings.Contains(err.Error(), "linux/s390x") || !strings.Contains(err.Error(), "linux/amd64, linux/arm64") {
		t.Errorf("error %q does not name the platform missing and those the index has", err)
	}
	if res == nil {
		t.Fatal("no result for the platforms that are available")
	}
	if !reflect.DeepEqual(res.Unavailable, []string{"linux/s390x"}) {
		t.Errorf("Unavailable = %v, want [linux/s390x]", res.Unavailable)
	}
	checkManifests(t, res.Manifests, []Manifest{wantManifest(t, imgs[0], &amd64)})

	// A single image manifest is one platform.
	res, err = r.Resolve(t.Context(), testRegistryName+"/single:1", Options{Platforms: []string{"linux/arm64"}})
	if Reason(err) != v1alpha1.ReasonPlatformUnavailable || res == nil || len(res.Manifests) != 0 {
		t.Errorf("single amd64 manifest asked for arm64: %v, %+v, want PlatformUnavailable and no manifest", err, res)
	}
}

func TestResolveBasicAuth(t *testing.T) {
	tr := startRegistry(t)
	tr.requireBasicAuth("puller", "s3cret")
	tr.pushImage(t, "private/app:1", imageFor(t, amd64))

	tests := []struct {
		name    string
		secrets [][]byte
		want    v1alpha1.FailureReason
	}{
		{"dockerconfigjson", [][]byte{dockerConfigJSON(testRegistryName, "puller", "s3cret")}, ""},
		{"dockercfg with scheme", [][]byte{dockerCfg("https://"+testRegistryName+"/v1/", "puller", "s3cret")}, ""},
		{"several secrets, one for this registry", [][]byte{dockerConfigJSON("other.test", "x", "y"), dockerConfigJSON(testRegistryName, "puller", "s3cret")}, ""},
		{"no secret", nil, v1alpha1.ReasonUnauthorized},
		{"wrong password", [][]byte{dockerConfigJSON(testRegistryName, "puller", "wrong")}, v1alpha1.ReasonUnauthorized},
		{"secret for another registry", [][]byte{dockerConfigJSON("other.test", "puller", "s3cret")}, v1alpha1.ReasonUnauthorized},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestResolver(t, tr)
			_, err := r.Resolve(t.Context(), testRegistryName+"/private/app:1", Options{PullSecrets: tt.secrets})
			if got := Reason(err); got != tt.want {
				t.Fatalf("Reason(%v) = %q, want %q", err, got, tt.want)
			}
			if tt.want == v1alpha1.ReasonUnauthorized && !strings.Contains(err.Error(), "imagePullSecret") {
				t.Errorf("error %q does not say what to check", err)
			}
		})
	}
}

func TestResolveNotFound(t *testing.T) {
	tr := startRegistry(t)
	tr.pushImage(t, "app:1", imageFor(t, amd64))
	r := newTestResolver(t, tr)
	missing := "sha256:" + strings.Repeat("ab", 32)
	for _, ref := range []string{
		testRegistryName + "/app:2",              // MANIFEST_UNKNOWN
		testRegistryName + "/nothing:1",          // NAME_UNKNOWN
		testRegistryName + "/app@" + missing,     // by digest
		testRegistryName + "/nothing@" + missing, // by digest, no repository
	} {
		if _, err := r.Resolve(t.Context(), ref, Options{}); Reason(err) != v1alpha1.ReasonNotFound {
			t.Errorf("%s: Reason(%v) = %q, want NotFound", ref, err, Reason(err))
		}
	}
}

func TestResolveFailed(t *testing.T) {
	tests := []struct {
		name string
		hook func(w http.ResponseWriter, r *http.Request) bool
	}{
		{"500", func(w http.ResponseWriter, r *http.Request) bool {
			if !strings.Contains(r.URL.Path, "/manifests/") {
				return false
			}
			http.Error(w, "boom", http.StatusInternalServerError)
			return true
		}},
		{"malformed manifest", func(w http.ResponseWriter, r *http.Request) bool {
			if !strings.Contains(r.URL.Path, "/manifests/") {
				return false
			}
			w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
			_, _ = w.Write([]byte(`{"schemaVersion": 2, "layers": "not a list"`))
			return true
		}},
		{"manifest without config", func(w http.ResponseWriter, r *http.Request) bool {
			if !strings.Contains(r.URL.Path, "/manifests/") {
				return false
			}
			w.Header().Set("Content-Type", string(types.OCIManifestSchema1))
			_, _ = w.Write([]byte(`{"schemaVersion": 2, "layers": []}`))
			return true
		}},
		{"ping 404: not a registry", func(w http.ResponseWriter, r *http.Request) bool {
			if r.URL.Path != "/v2/" {
				return false
			}
			http.NotFound(w, r)
			return true
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := startRegistry(t)
			tr.setHook(tt.hook)
			r := newTestResolver(t, tr)
			_, err := r.Resolve(t.Context(), testRegistryName+"/app:1", Options{})
			if Reason(err) != v1alpha1.ReasonResolveFailed {
				t.Fatalf("Reason(%v) = %q, want ResolveFailed", err, Reason(err))
			}
			if n := tr.manifestGets("app", "1"); n > 1 {
				t.Errorf("%d manifest GETs: retries are the controller's, not the resolver's", n)
			}
		})
	}
}

func TestTimeoutBoundsRegistryCalls(t *testing.T) {
	tr := startRegistry(t)
	tr.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.Contains(r.URL.Path, "/manifests/") {
			return false
		}
		<-r.Context().Done() // a registry that never answers
		return true
	})
	r := newTestResolver(t, tr, WithTimeout(50*time.Millisecond))
	_, err := r.Resolve(t.Context(), testRegistryName+"/app:1", Options{})
	if Reason(err) != v1alpha1.ReasonResolveFailed || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Resolve against a registry that never answers: %v (%q), want ResolveFailed and a deadline", err, Reason(err))
	}
}

func TestTagCacheExpires(t *testing.T) {
	tr := startRegistry(t)
	first, second := imageFor(t, amd64), imageFor(t, amd64)
	tr.pushImage(t, "app:latest", first)
	clock := newFakeClock()
	r := newTestResolver(t, tr, WithClock(clock.Now), WithTagTTL(30*time.Second))
	resolve := func() v1.Hash {
		t.Helper()
		res, err := r.Resolve(t.Context(), testRegistryName+"/app", Options{})
		if err != nil {
			t.Fatal(err)
		}
		return res.Digest
	}

	if got := resolve(); got != digestOf(t, first) {
		t.Fatalf("digest %s, want %s", got, digestOf(t, first))
	}
	tr.pushImage(t, "app:latest", second) // the tag moves
	clock.Advance(29 * time.Second)
	if got := resolve(); got != digestOf(t, first) || tr.manifestGets("app", "latest") != 1 {
		t.Fatalf("within the TTL: digest %s after %d GETs, want the cached %s after 1", got, tr.manifestGets("app", "latest"), digestOf(t, first))
	}
	clock.Advance(time.Second)
	if got := resolve(); got != digestOf(t, second) || tr.manifestGets("app", "latest") != 2 {
		t.Fatalf("after the TTL: digest %s after %d GETs, want the new %s after 2", got, tr.manifestGets("app", "latest"), digestOf(t, second))
	}
}

func TestDigestCacheHit(t *testing.T) {
	tr := startRegistry(t)
	img := imageFor(t, amd64)
	tr.pushImage(t, "app:1", img)
	clock := newFakeClock()
	r := newTestResolver(t, tr, WithClock(clock.Now))
	dgst := digestOf(t, img).String()
	configGets := func() int {
		cfg, err := img.ConfigName()
		if err != nil {
			t.Fatal(err)
		}
		return tr.count(http.MethodGet, "/v2/app/blobs/"+cfg.String())
	}

	for range 3 {
		if _, err := r.Resolve(t.Context(), testRegistryName+"/app@"+dgst, Options{}); err != nil {
			t.Fatal(err)
		}
		clock.Advance(365 * 24 * time.Hour) // digests never expire
	}
	if n := tr.manifestGets("app", dgst); n != 1 {
		t.Errorf("%d GETs of the manifest by digest, want 1", n)
	}
	// A tag naming the same manifest costs the tag's GET only: the config is not read again.
	if _, err := r.Resolve(t.Context(), testRegistryName+"/app:1", Options{}); err != nil {
		t.Fatal(err)
	}
	if n := configGets(); n != 1 {
		t.Errorf("%d GETs of the config, want 1", n)
	}
}

func TestCacheIsBounded(t *testing.T) {
	tr := startRegistry(t)
	var digests []string
	for range 3 {
		img := imageFor(t, amd64)
		tr.pushImage(t, "app:x", img)
		digests = append(digests, digestOf(t, img).String())
	}
	r := newTestResolver(t, tr, WithCacheSize(2))
	for _, d := range append(digests, digests[0]) {
		if _, err := r.Resolve(t.Context(), testRegistryName+"/app@"+d, Options{}); err != nil {
			t.Fatal(err)
		}
	}
	if n := tr.manifestGets("app", digests[0]); n != 2 {
		t.Errorf("%d GETs of the first digest, want 2: the cache holds 2 entries, it was evicted", n)
	}
	if n := r.cache.len(); n != 2 {
		t.Errorf("cache holds %d entries, want 2", n)
	}
}

// blockManifest makes GETs of repo's manifest by ref wait until release is closed (or the
// request ends), and reports each one's arrival on arrived.
func blockManifest(tr *testRegistry, repo, ref string) (release chan struct{}, arrived chan struct{}) {
	release, arrived = make(chan struct{}), make(chan struct{}, 64)
	tr.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || r.URL.Path != "/v2/"+repo+"/manifests/"+ref {
			return false
		}
		arrived <- struct{}{}
		select {
		case <-release:
			return false
		case <-r.Context().Done():
			return true
		}
	})
	return release, arrived
}

// waitForWaiters returns once n resolutions wait for one in progress, or once more than one
// GET of repo's manifest by ref arrived (resolutions that should have waited did not).
func waitForWaiters(t *testing.T, r *Resolver, n int, tr *testRegistry, repo, ref string) {
	t.Helper()
	for {
		r.mu.Lock()
		waiting := 0
		for _, f := range r.flights {
			waiting += f.waiters
		}
		r.mu.Unlock()
		if waiting >= n || tr.manifestGets(repo, ref) > 1 {
			return
		}
		if t.Context().Err() != nil {
			t.Fatal("test ended while waiting")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestConcurrentResolutionsShareOneRoundTrip(t *testing.T) {
	tr := startRegistry(t)
	img := imageFor(t, amd64)
	tr.pushImage(t, "app:1", img)
	release, _ := blockManifest(tr, "app", "1")
	r := newTestResolver(t, tr)

	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	digests := make([]v1.Hash, n)
	for i := range n {
		wg.Go(func() {
			res, err := r.Resolve(t.Context(), testRegistryName+"/app:1", Options{})
			errs[i] = err
			if err == nil {
				digests[i] = res.Digest
			}
		})
	}
	waitForWaiters(t, r, n-1, tr, "app", "1")
	close(release)
	wg.Wait()
	for i := range n {
		if errs[i] != nil || digests[i] != digestOf(t, img) {
			t.Errorf("resolution %d: %s, %v", i, digests[i], errs[i])
		}
	}
	if got := tr.manifestGets("app", "1"); got != 1 {
		t.Errorf("%d manifest GETs for %d concurrent resolutions, want 1", got, n)
	}
}

func TestWaitersOutliveTheFirstCallersCancellation(t *testing.T) {
	tr := startRegistry(t)
	img := imageFor(t, amd64)
	tr.pushImage(t, "app:1", img)
	release, arrived := blockManifest(tr, "app", "1")
	r := newTestResolver(t, tr)

	ctx, cancel := context.WithCancel(t.Context())
	firstDone := make(chan error, 1)
	go func() {
		_, err := r.Resolve(ctx, testRegistryName+"/app:1", Options{})
		firstDone <- err
	}()
	<-arrived
	type outcome struct {
		res *Result
		err error
	}
	secondDone := make(chan outcome, 1)
	go func() {
		res, err := r.Resolve(t.Context(), testRegistryName+"/app:1", Options{})
		secondDone <- outcome{res, err}
	}()
	waitForWaiters(t, r, 1, tr, "app", "1")
	cancel()
	if err := <-firstDone; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled resolution: %v, want context.Canceled", err)
	}
	select {
	case <-arrived: // the waiter asks again itself
		close(release)
		if got := <-secondDone; got.err != nil || got.res.Digest != digestOf(t, img) {
			t.Errorf("waiter: %v, %v; want the digest", got.res, got.err)
		}
	case got := <-secondDone:
		t.Errorf("waiter: %v, %v; want the digest: another caller's cancellation is not a failure", got.res, got.err)
	}
}

func TestCacheIsolatesCredentials(t *testing.T) {
	tr := startRegistry(t)
	tr.requireBasicAuth("team-a", "a-secret")
	tr.pushImage(t, "private/app:1", imageFor(t, amd64))
	r := newTestResolver(t, tr)
	ref := testRegistryName + "/private/app:1"
	teamA := Options{PullSecrets: [][]byte{dockerConfigJSON(testRegistryName, "team-a", "a-secret")}}

	if _, err := r.Resolve(t.Context(), ref, teamA); err != nil {
		t.Fatal(err)
	}
	for name, opts := range map[string]Options{
		"no credentials":    {},
		"other credentials": {PullSecrets: [][]byte{dockerConfigJSON(testRegistryName, "team-b", "b-secret")}},
		"other registry's":  {PullSecrets: [][]byte{dockerConfigJSON("other.test", "team-a", "a-secret")}},
	} {
		if _, err := r.Resolve(t.Context(), ref, opts); Reason(err) != v1alpha1.ReasonUnauthorized {
			t.Errorf("%s, after a resolution with team A's: Reason(%v) = %q, want Unauthorized", name, err, Reason(err))
		}
	}
	gets := tr.manifestGets("private/app", "1")
	if _, err := r.Resolve(t.Context(), ref, teamA); err != nil {
		t.Fatal(err)
	}
	if tr.manifestGets("private/app", "1") != gets {
		t.Error("the same credentials again went to the registry: the cache should have answered")
	}
}

func TestResolveMalformedInput(t *testing.T) {
	tr := startRegistry(t)
	r := newTestResolver(t, tr)
	tests := []struct {
		ref, platform string
		want          string
	}{
		{ref: "", want: "not a reference"},
		{ref: "registry.test/App:1", want: "not a reference"},
		{ref: "registry.test/app:", want: "not a reference"},
		{ref: "registry.test/app@sha256:abc", want: "not a reference"},
		{ref: "registry.test/app@@sha256:" + strings.Repeat("a", 64), want: "not a reference"},
		{ref: "registry.test/-app:1", want: "not a reference"},
		{ref: "registry.test//app:1", want: "not a reference"},
		{ref: "registry.test/app/:1", want: "not a reference"},
		{ref: "https://registry.test/app:1", want: "not a reference"},
		{ref: "registry.test:99999/app:1", want: "not a reference"},
		{ref: "registry.test/app:" + strings.Repeat("t", 129), want: "not a reference"},
		{ref: "registry.test/app:1", platform: "linux", want: "not a platform"},
		{ref: "registry.test/app:1", platform: "Linux/AMD64", want: "not a platform"},
		{ref: "registry.test/app:1", platform: "linux/arm64/v8/x", want: "not a platform"},
	}
	for _, tt := range tests {
		opts := Options{}
		if tt.platform != "" {
			opts.Platforms = []string{tt.platform}
		}
		_, err := r.Resolve(t.Context(), tt.ref, opts)
		if err == nil || !strings.Contains(err.Error(), tt.want) || Reason(err) != v1alpha1.ReasonResolveFailed {
			t.Errorf("Resolve(%q, %q) = %v (%q), want ResolveFailed %q", tt.ref, tt.platform, err, Reason(err), tt.want)
		}
		if tt.want == "not a reference" && !errors.Is(err, ErrNotReference) {
			t.Errorf("Resolve(%q): %v is not ErrNotReference", tt.ref, err)
		}
	}
	if n := tr.total(); n != 0 {
		t.Errorf("%d requests reached the registry for malformed input", n)
	}
	if _, err := r.Resolve(t.Context(), "registry.test/app:1", Options{PullSecrets: [][]byte{[]byte("not json")}}); err == nil || !strings.Contains(err.Error(), "pull secret 1") {
		t.Errorf("malformed pull secret: %v, want an error naming it", err)
	}
}

func TestPlainHTTPOnlyForInsecureRegistries(t *testing.T) {
	tr := startRegistry(t)
	tr.pushImage(t, "app:1", imageFor(t, amd64))

	if _, err := New(WithEndpoints(map[string]string{testRegistryName: "http://" + tr.host})); err == nil || !strings.Contains(err.Error(), "insecure") {
		t.Errorf("New with a plain HTTP endpoint for a registry not listed as insecure: %v, want an error", err)
	}

	// A loopback registry, which go-containerregistry would reach over HTTP by itself.
	secure := newTestResolver(t, tr)
	if _, err := secure.Resolve(t.Context(), tr.host+"/app:1", Options{}); Reason(err) != v1alpha1.ReasonResolveFailed || !strings.Contains(err.Error(), "insecure") {
		t.Errorf("plain HTTP to a registry not listed as insecure: %v, want it refused", err)
	}
	insecure := newTestResolver(t, tr, WithInsecure(tr.host))
	if _, err := insecure.Resolve(t.Context(), tr.host+"/app:1", Options{}); err != nil {
		t.Errorf("plain HTTP to a registry listed as insecure: %v", err)
	}
}

func TestMetrics(t *testing.T) {
	tr := startRegistry(t)
	tr.pushImage(t, "app:1", imageFor(t, amd64))
	reg := prometheus.NewRegistry()
	r := newTestResolver(t, tr, WithRegisterer(reg))
	newTestResolver(t, tr, WithRegisterer(reg)) // a second resolver shares the collectors

	for _, ref := range []string{"app:1", "app:1", "missing:1"} {
		_, _ = r.Resolve(t.Context(), testRegistryName+"/"+ref, Options{})
	}
	for _, c := range []struct {
		collector prometheus.Collector
		label     string
		want      float64
	}{
		{r.metrics.resolutions, resultOK, 2},
		{r.metrics.resolutions, resultNotFound, 1},
		{r.metrics.resolutions, resultFailed, 0},
		{r.metrics.cache, cacheHit, 1},
		{r.metrics.cache, cacheMiss, 2},
	} {
		vec, _ := c.collector.(*prometheus.CounterVec)
		if got := testutil.ToFloat64(vec.WithLabelValues(c.label)); got != c.want {
			t.Errorf("%s = %v, want %v", c.label, got, c.want)
		}
	}
	if n, err := testutil.GatherAndCount(reg, "shoal_controller_resolve_duration_seconds"); err != nil || n != 1 {
		t.Errorf("duration histogram: %d series, %v", n, err)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == "shoal_controller_resolve_duration_seconds" {
			if got := f.GetMetric()[0].GetHistogram().GetSampleCount(); got != 2 {
				t.Errorf("duration observed %d times, want 2 (the registry round trips)", got)
			}
		}
	}
}

// TestReason classifies registry answers by status, then by error code, and the path they
// answer: the ping and the token realm are no content that could be missing.
func TestReason(t *testing.T) {
	request := func(path string) *http.Request { return &http.Request{URL: &url.URL{Path: path}} }
	manifest := request("/v2/app/manifests/1")
	code := func(c transport.ErrorCode) []transport.Diagnostic { return []transport.Diagnostic{{Code: c}} }
	tests := []struct {
		name string
		err  error
		want v1alpha1.FailureReason
	}{
		{"nil", nil, ""},
		{"not from a registry", errors.New("dial tcp: connection refused"), v1alpha1.ReasonResolveFailed},
		{"401", &transport.Error{StatusCode: 401, Request: manifest}, v1alpha1.ReasonUnauthorized},
		{"403", &transport.Error{StatusCode: 403, Request: manifest}, v1alpha1.ReasonUnauthorized},
		{"401 from the token realm", &transport.Error{StatusCode: 401, Request: request("/token")}, v1alpha1.ReasonUnauthorized},
		{"404", &transport.Error{StatusCode: 404, Request: manifest}, v1alpha1.ReasonNotFound},
		{"MANIFEST_UNKNOWN", &transport.Error{StatusCode: 400, Errors: code(transport.ManifestUnknownErrorCode), Request: manifest}, v1alpha1.ReasonNotFound},
		{"NAME_UNKNOWN", &transport.Error{StatusCode: 400, Errors: code(transport.NameUnknownErrorCode), Request: manifest}, v1alpha1.ReasonNotFound},
		{"DENIED", &transport.Error{StatusCode: 400, Errors: code(transport.DeniedErrorCode), Request: manifest}, v1alpha1.ReasonUnauthorized},
		{"404 from the ping", &transport.Error{StatusCode: 404, Request: request("/v2/")}, v1alpha1.ReasonResolveFailed},
		{"404 from the token realm", &transport.Error{StatusCode: 404, Request: request("/token")}, v1alpha1.ReasonResolveFailed},
		{"500", &transport.Error{StatusCode: 500, Request: manifest}, v1alpha1.ReasonResolveFailed},
		{"wrapped", fmt.Errorf("get manifest: %w", &transport.Error{StatusCode: 404, Request: manifest}), v1alpha1.ReasonNotFound},
		{"Error", &Error{Reason: v1alpha1.ReasonPlatformUnavailable, Err: errors.New("no arm64")}, v1alpha1.ReasonPlatformUnavailable},
	}
	for _, tt := range tests {
		if got := Reason(tt.err); got != tt.want {
			t.Errorf("%s: Reason(%v) = %q, want %q", tt.name, tt.err, got, tt.want)
		}
	}
}
