package harness

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func TestMain(m *testing.M) { os.Exit(IsolateNetwork(m)) }

// TestIsolated checks that the tests really run in a namespace of their own: only lo
// exists, and it is up.
func TestIsolated(t *testing.T) {
	RequireIsolation(t)
	ifaces, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, i := range ifaces {
		names = append(names, i.Name)
		if i.Name == "lo" && i.Flags&net.FlagUp == 0 {
			t.Errorf("lo is down in the test namespace")
		}
	}
	if len(names) != 1 || names[0] != "lo" {
		t.Errorf("interfaces in the test namespace = %v, want only lo", names)
	}
	if !InIsolatedNetwork() {
		t.Errorf("InIsolatedNetwork() = false inside the re-executed test binary")
	}
}

// TestDirectPull proves the harness without Shoal: containerd pulls a multi-layer image and
// a multi-platform index through CRI from the registry named by a hosts.toml, the access log
// shows every blob fetched once by containerd, and RemoveImage drops the content.
func TestDirectPull(t *testing.T) {
	RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()

	reg, err := StartRegistry(ctx, dir+"/registry")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeOrLog(t, reg.Close) })
	hostsDir := dir + "/certs.d"
	if _, err := WriteDirectHosts(hostsDir, "registry.test", reg.URL()); err != nil {
		t.Fatal(err)
	}
	ctd, err := StartContainerd(ctx, dir+"/containerd", hostsDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeOrLog(t, ctd.Close) })

	img, err := PushImage(ctx, reg.Host(), "test/app:v1", ImageSpec{Layers: 3, LayerSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	arm64 := v1.Platform{OS: "linux", Architecture: "arm64"}
	idx, err := PushIndex(ctx, reg.Host(), "test/multi:v1", ImageSpec{Layers: 2, LayerSize: 256 << 10}, HostPlatform(), arm64)
	if err != nil {
		t.Fatal(err)
	}

	if got := ctd.Snapshotter(); got != "overlayfs" {
		t.Logf("containerd unpacks with the %s snapshotter (overlayfs unavailable here)", got)
	}
	cri := ctd.CRI()
	for _, ref := range []string{img.Name("registry.test"), idx.Name("registry.test")} {
		if _, err := cri.PullImage(ctx, ref); err != nil {
			t.Fatalf("%v\ncontainerd log:\n%s", err, ctd.proc.logTail())
		}
		st, err := cri.ImageStatus(ctx, ref)
		if err != nil || st == nil {
			t.Fatalf("ImageStatus(%s) = %v, %v; want the pulled image", ref, st, err)
		}
	}

	if err := reg.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	gets, err := reg.BlobGETsWhere(func(r Request) bool { return strings.HasPrefix(r.UserAgent, "containerd/") })
	if err != nil {
		t.Fatal(err)
	}
	host := idx.Images[HostPlatform().String()]
	for _, b := range append(img.Blobs(), host.Blobs()...) {
		if gets[b] != 1 {
			t.Errorf("registry served blob %s to containerd %d times, want 1", b, gets[b])
		}
		if !ctd.HasContent(b) {
			t.Errorf("containerd content store lacks %s after the pull", b)
		}
	}
	for _, b := range idx.Images[arm64.String()].Blobs() {
		if gets[b] != 0 {
			t.Errorf("registry served arm64 blob %s %d times, want 0", b, gets[b])
		}
	}
	manifests, err := reg.CountRequests("", regexp.MustCompile(`^/v2/test/(app|multi)/manifests/`))
	if err != nil || manifests == 0 {
		t.Errorf("registry logged %d manifest requests (err %v), want some", manifests, err)
	}

	for _, ref := range []string{img.Name("registry.test"), idx.Name("registry.test")} {
		if err := cri.RemoveImage(ctx, ref); err != nil {
			t.Fatal(err)
		}
		if st, err := cri.ImageStatus(ctx, ref); err != nil || st != nil {
			t.Errorf("ImageStatus(%s) after RemoveImage = %v, %v; want nil", ref, st, err)
		}
	}
	// CRI RemoveImage deletes the last reference synchronously, which runs containerd's
	// garbage collection: the next pull has to fetch every blob again.
	for _, b := range append(img.Blobs(), host.Blobs()...) {
		if ctd.HasContent(b) {
			t.Errorf("containerd still holds %s after RemoveImage", b)
		}
	}
}

func TestMetricsValue(t *testing.T) {
	const scrape = `# TYPE shoal_mirror_requests_total counter
shoal_mirror_requests_total{kind="blob",result="ok",source="local"} 4
shoal_mirror_requests_total{kind="blob",result="ok",source="upstream"} 3
shoal_mirror_requests_total{kind="manifest",result="ok",source="upstream"} 2
# TYPE shoal_store_bytes gauge
shoal_store_bytes 1024
`
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(scrape))
	if err != nil {
		t.Fatal(err)
	}
	m := Metrics(fams)
	tests := []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"shoal_mirror_requests_total", nil, 9},
		{"shoal_mirror_requests_total", map[string]string{"kind": "blob"}, 7},
		{"shoal_mirror_requests_total", map[string]string{"kind": "blob", "source": "local"}, 4},
		{"shoal_mirror_requests_total", map[string]string{"result": "error"}, 0},
		{"shoal_store_bytes", nil, 1024},
		{"shoal_absent_total", nil, 0},
	}
	for _, tt := range tests {
		if got := m.Value(tt.name, tt.labels); got != tt.want {
			t.Errorf("Value(%s, %v) = %v, want %v", tt.name, tt.labels, got, tt.want)
		}
	}
}

func TestAccessLogParsing(t *testing.T) {
	const log = `127.0.0.1 - - [21/Nov/2026:16:42:27 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
time="2026-11-21T16:42:27Z" level=info msg="not an access log line"
127.0.0.1 - - [21/Nov/2026:16:42:28 +0000] "GET /v2/test/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000001 HTTP/1.1" 200 5 "" "containerd/1.6.20~ds1"
127.0.0.1 - - [21/Nov/2026:16:42:28 +0000] "HEAD /v2/test/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000001 HTTP/1.1" 200 0 "" "containerd/1.6.20~ds1"
127.0.0.1 - - [21/Nov/2026:16:42:29 +0000] "GET /v2/test/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000001?x=1 HTTP/1.1" 404 - "" "go-containerregistry/v0.22.1"
`
	dir := t.TempDir()
	r := &Registry{accessLog: dir + "/access.log"}
	if err := os.WriteFile(r.accessLog, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	reqs, err := r.Requests()
	if err != nil {
		t.Fatal(err)
	}
	if len(reqs) != 4 {
		t.Fatalf("parsed %d requests, want 4: %+v", len(reqs), reqs)
	}
	if last := reqs[3]; last.Query != "x=1" || last.Status != 404 || last.Bytes != 0 || last.UserAgent != "go-containerregistry/v0.22.1" {
		t.Errorf("last request = %+v", last)
	}
	gets, err := r.BlobGETs()
	if err != nil {
		t.Fatal(err)
	}
	d := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("0", 63) + "1"}
	if len(gets) != 1 || gets[d] != 2 {
		t.Errorf("BlobGETs() = %v, want {%s: 2}", gets, d)
	}
	n, err := r.CountRequests("HEAD", regexp.MustCompile(`/blobs/`))
	if err != nil || n != 1 {
		t.Errorf("CountRequests(HEAD, /blobs/) = %d, %v; want 1", n, err)
	}
}

func closeOrLog(t *testing.T, closeFn func() error) {
	t.Helper()
	if err := closeFn(); err != nil {
		t.Logf("cleanup: %v", err)
	}
}

// TestPushArtifact: the registry keeps an artifact as PushArtifact describes it: the manifest
// under its digest with its artifactType, the empty config and a layer of the artifact's media
// type holding the blob.
func TestPushArtifact(t *testing.T) {
	RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	reg, err := StartRegistry(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeOrLog(t, reg.Close) })
	art, err := PushArtifact(ctx, reg.Host(), "models/m:v1", 1<<20, 7)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(reg.Host()+"/models/m:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Get(ref, remoteOptions(ctx)...)
	if err != nil {
		t.Fatal(err)
	}
	var m v1.Manifest
	if err := json.Unmarshal(desc.Manifest, &m); err != nil {
		t.Fatal(err)
	}
	if desc.Digest != art.Digest || m.ArtifactType != ArtifactType || m.Config.MediaType != emptyConfigMediaType ||
		m.Config.Digest != art.Config || len(m.Layers) != 1 || m.Layers[0].MediaType != ArtifactLayerType ||
		m.Layers[0].Digest != art.Layers[0] || m.Layers[0].Size != 1<<20 || art.Sizes[art.Layers[0]] != 1<<20 {
		t.Fatalf("registry has %s: %s; pushed %+v", desc.Digest, desc.Manifest, art)
	}
	layer, err := remote.Layer(ref.Context().Digest(art.Layers[0].String()), remoteOptions(ctx)...)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := layer.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	h, n, err := v1.SHA256(rc)
	if err != nil || h != art.Layers[0] || n != 1<<20 {
		t.Errorf("blob %s: %d bytes hashing to %s (%v)", art.Layers[0], n, h, err)
	}
}
