package resolve

import (
	"encoding/base64"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// testRegistryName is the registry name references use in tests; WithEndpoints sends it to
// the in-process registry on loopback.
const testRegistryName = "registry.test"

// testRegistry is go-containerregistry's in-process registry on a loopback port, behind a
// handler that counts requests, may demand Basic authentication and may answer for it.
type testRegistry struct {
	host string // 127.0.0.1:port

	mu       sync.Mutex
	requests map[string]int // by "METHOD /path"
	user     string         // Basic authentication demanded when not ""
	password string
	hook     func(w http.ResponseWriter, r *http.Request) bool // answers instead when it returns true
}

func startRegistry(t *testing.T) *testRegistry {
	t.Helper()
	tr := &testRegistry{requests: map[string]int{}}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tr.mu.Lock()
		tr.requests[r.Method+" "+r.URL.Path]++
		user, password, hook := tr.user, tr.password, tr.hook
		tr.mu.Unlock()
		if user != "" {
			if u, p, ok := r.BasicAuth(); !ok || u != user || p != password {
				w.Header().Set("WWW-Authenticate", `Basic realm="registry.test"`)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusUnauthorized)
				_, _ = io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
				return
			}
		}
		if hook != nil && hook(w, r) {
			return
		}
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	tr.host = strings.TrimPrefix(srv.URL, "http://")
	return tr
}

// requireBasicAuth makes the registry refuse any request without these credentials.
func (tr *testRegistry) requireBasicAuth(user, password string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.user, tr.password = user, password
}

// setHook makes hook see every request (after authentication) first.
func (tr *testRegistry) setHook(hook func(w http.ResponseWriter, r *http.Request) bool) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.hook = hook
}

// count returns how many requests of method for path ("/v2/team/app/manifests/1.4") arrived.
func (tr *testRegistry) count(method, path string) int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.requests[method+" "+path]
}

// countPrefix returns how many requests of method for paths starting with prefix arrived.
func (tr *testRegistry) countPrefix(method, prefix string) int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	n := 0
	for k, v := range tr.requests {
		if strings.HasPrefix(k, method+" "+prefix) {
			n += v
		}
	}
	return n
}

func (tr *testRegistry) total() int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	n := 0
	for _, v := range tr.requests {
		n += v
	}
	return n
}

// manifestGets counts the GETs of repo's manifest by tag or digest.
func (tr *testRegistry) manifestGets(repo, reference string) int {
	return tr.count(http.MethodGet, "/v2/"+repo+"/manifests/"+reference)
}

// pushOptions are the options to push to the registry directly at its loopback address.
func (tr *testRegistry) pushOptions() []remote.Option {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.user == "" {
		return nil
	}
	return []remote.Option{remote.WithAuth(&authn.Basic{Username: tr.user, Password: tr.password})}
}

func (tr *testRegistry) ref(t *testing.T, repoAndRef string) name.Reference {
	t.Helper()
	ref, err := name.ParseReference(tr.host + "/" + repoAndRef)
	if err != nil {
		t.Fatal(err)
	}
	return ref
}

func (tr *testRegistry) pushImage(t *testing.T, repoAndRef string, img v1.Image) {
	t.Helper()
	if err := remote.Write(tr.ref(t, repoAndRef), img, tr.pushOptions()...); err != nil {
		t.Fatalf("push %s: %v", repoAndRef, err)
	}
}

func (tr *testRegistry) pushIndex(t *testing.T, repoAndRef string, idx v1.ImageIndex) {
	t.Helper()
	if err := remote.WriteIndex(tr.ref(t, repoAndRef), idx, tr.pushOptions()...); err != nil {
		t.Fatalf("push %s: %v", repoAndRef, err)
	}
}

// pushArtifact pushes an OCI artifact manifest with the given config and layers, and returns
// the manifest.
func (tr *testRegistry) pushArtifact(t *testing.T, repoAndRef, artifactType string, config v1.Layer, layers ...v1.Layer) (v1.Manifest, []byte) {
	t.Helper()
	ref := tr.ref(t, repoAndRef)
	m := v1.Manifest{SchemaVersion: 2, MediaType: types.OCIManifestSchema1, ArtifactType: artifactType}
	for i, l := range append([]v1.Layer{config}, layers...) {
		if err := remote.WriteLayer(ref.Context(), l, tr.pushOptions()...); err != nil {
			t.Fatal(err)
		}
		d, err := partialDescriptor(l)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			m.Config = d
		} else {
			m.Layers = append(m.Layers, d)
		}
	}
	raw := mustJSON(t, m)
	if err := remote.Put(ref, rawManifest{raw: raw, mediaType: types.OCIManifestSchema1}, tr.pushOptions()...); err != nil {
		t.Fatal(err)
	}
	return m, raw
}

func partialDescriptor(l v1.Layer) (v1.Descriptor, error) {
	d, err := l.Digest()
	if err != nil {
		return v1.Descriptor{}, err
	}
	size, err := l.Size()
	if err != nil {
		return v1.Descriptor{}, err
	}
	mt, err := l.MediaType()
	if err != nil {
		return v1.Descriptor{}, err
	}
	return v1.Descriptor{Digest: d, Size: size, MediaType: mt}, nil
}

type rawManifest struct {
	raw       []byte
	mediaType types.MediaType
}

func (m rawManifest) RawManifest() ([]byte, error)        { return m.raw, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return m.mediaType, nil }

// imageFor returns a small random image whose config names platform p.
func imageFor(t *testing.T, p v1.Platform) v1.Image {
	t.Helper()
	img, err := random.Image(512, 2)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Variant = p.OS, p.Architecture, p.Variant
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// indexOf returns an OCI index of one image per platform, in order, plus a build attestation.
func indexOf(t *testing.T, platforms ...v1.Platform) (v1.ImageIndex, []v1.Image) {
	t.Helper()
	var adds []mutate.IndexAddendum
	var imgs []v1.Image
	for _, p := range platforms {
		img := imageFor(t, p)
		imgs = append(imgs, img)
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &p}})
	}
	attestation, err := random.Image(64, 1)
	if err != nil {
		t.Fatal(err)
	}
	adds = append(adds, mutate.IndexAddendum{Add: attestation, Descriptor: v1.Descriptor{
		Platform:    &v1.Platform{OS: "unknown", Architecture: "unknown"},
		Annotations: map[string]string{"vnd.docker.reference.type": "attestation-manifest"},
	}})
	return mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex), adds...), imgs
}

// wantManifest is what Resolve must say of img.
func wantManifest(t *testing.T, img v1.Image, p *v1.Platform) Manifest {
	t.Helper()
	raw, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	mt, err := img.MediaType()
	if err != nil {
		t.Fatal(err)
	}
	want := Manifest{Digest: d, MediaType: mt, ArtifactType: string(m.Config.MediaType), Platform: p,
		Size: int64(len(raw)) + m.Config.Size, Blobs: append([]v1.Descriptor{m.Config}, m.Layers...)}
	for _, l := range m.Layers {
		want.Size += l.Size
	}
	return want
}

func digestOf(t *testing.T, d interface{ Digest() (v1.Hash, error) }) v1.Hash {
	t.Helper()
	h, err := d.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// newTestResolver returns a Resolver that sends registry.test to tr, with its own transport.
func newTestResolver(t *testing.T, tr *testRegistry, opts ...ResolverOption) *Resolver {
	t.Helper()
	transport := remote.DefaultTransport.(*http.Transport).Clone() //nolint:errcheck // a test: a panic says it
	t.Cleanup(transport.CloseIdleConnections)
	base := []ResolverOption{
		WithEndpoints(map[string]string{testRegistryName: "http://" + tr.host}),
		WithInsecure(testRegistryName),
		WithTransport(transport),
	}
	r, err := New(append(base, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// dockerConfigJSON is a .dockerconfigjson with one entry.
func dockerConfigJSON(registry, user, password string) []byte {
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	return fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, registry, auth)
}

// dockerCfg is a legacy .dockercfg with one entry.
func dockerCfg(registry, user, password string) []byte {
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	return fmt.Appendf(nil, `{%q:{"auth":%q,"email":"ci@example.invalid"}}`, registry, auth)
}

// fakeClock is a clock that moves only when told.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}
