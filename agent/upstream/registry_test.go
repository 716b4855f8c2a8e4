package upstream_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// debianRegistryBinary is where Debian installs docker-registry, tried when it is not in PATH.
const debianRegistryBinary = "/usr/bin/docker-registry"

// startRegistry runs Debian's docker-registry (distribution 2.8) on a free loopback port with its
// storage in a temporary directory, waits until /v2/ answers, and returns its host:port. The
// process is killed when the test ends.
func startRegistry(t *testing.T) string {
	t.Helper()
	registryBinary, err := exec.LookPath("docker-registry")
	if err != nil {
		if _, statErr := os.Stat(debianRegistryBinary); statErr != nil {
			t.Fatalf("docker-registry is needed, in PATH or at %s (apt-get install docker-registry, or make deps): %v", debianRegistryBinary, err)
		}
		registryBinary = debianRegistryBinary
	}
	dir := t.TempDir()
	addr := freeAddr(t)
	config := fmt.Sprintf(`version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), addr)
	configPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(configPath, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "registry.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(registryBinary, "serve", configPath)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", registryBinary, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		_ = logFile.Close()
		if t.Failed() {
			if log, err := os.ReadFile(logPath); err == nil {
				lines := strings.Split(strings.TrimSpace(string(log)), "\n")
				t.Logf("registry log (last lines):\n%s", strings.Join(lines[max(0, len(lines)-20):], "\n"))
			}
		}
	})

	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := client.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return addr
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("registry on %s did not answer /v2/ within 15s (last error %v)", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// pushed is an image or index pushed to the test registry.
type pushed struct {
	repo      string
	tag       string
	digest    v1.Hash
	manifest  []byte
	mediaType types.MediaType
}

func pushImage(t *testing.T, host, repo, tag string, layers int64) (pushed, v1.Image) {
	t.Helper()
	img, err := random.Image(64<<10, layers)
	if err != nil {
		t.Fatal(err)
	}
	ref := mustRef(t, host, repo, tag)
	if err := remote.Write(ref, img, remote.WithContext(testContext(t))); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	p := pushed{repo: repo, tag: tag}
	p.digest, _ = img.Digest()
	p.manifest, _ = img.RawManifest()
	p.mediaType, _ = img.MediaType()
	return p, img
}

func pushIndex(t *testing.T, host, repo, tag string) pushed {
	t.Helper()
	idx, err := random.Index(16<<10, 1, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref := mustRef(t, host, repo, tag)
	if err := remote.WriteIndex(ref, idx, remote.WithContext(testContext(t))); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	p := pushed{repo: repo, tag: tag}
	p.digest, _ = idx.Digest()
	p.manifest, _ = idx.RawManifest()
	p.mediaType, _ = idx.MediaType()
	return p
}

func mustRef(t *testing.T, host, repo, tag string) name.Reference {
	t.Helper()
	ref, err := name.ParseReference(host+"/"+repo+":"+tag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	return ref
}

// layerBytes returns the compressed bytes and digest of an image's first layer.
func layerBytes(t *testing.T, img v1.Image) ([]byte, v1.Hash) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil || len(layers) == 0 {
		t.Fatalf("layers: %v", err)
	}
	rc, err := layers[0].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := layers[0].Digest()
	if len(b) == 0 {
		t.Fatal("empty layer")
	}
	return b, d
}

// testContext is a generous bound so that a broken test fails instead of hanging.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}
