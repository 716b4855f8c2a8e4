package hostconfig

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/remotes/docker/config"
)

// FuzzRenderMerged checks that whenever Shoal accepts a user file for merging, containerd's
// own parser (go-toml v1, while Shoal checks with v2) reads the result with the mirror first.
func FuzzRenderMerged(f *testing.F) {
	f.Add(userFile)
	f.Add("server = \"https://upstream.test\"\n")
	f.Add("# c\n[host.\"https://a.test\"]\n  capabilities = [\"pull\"]\n")
	f.Add("x = '''\n[host.\"https://fake.test\"]\n'''\n[host.'https://b.test']\n")
	f.Add("a = [\n  [1, 2],\n]\n[header]\n  k = \"v\"\n[host.\"https://a.test\".header]\n  k = \"v\"\n")
	f.Fuzz(func(t *testing.T, user string) {
		out, err := renderMerged(stateMerged, testMirror, DefaultDialTimeout, []byte(user))
		if err != nil {
			return
		}
		dir := t.TempDir()
		if err := os.Mkdir(filepath.Join(dir, "registry.test"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "registry.test", "hosts.toml"), out, 0o644); err != nil {
			t.Fatal(err)
		}
		hosts, err := config.ConfigureHosts(context.Background(), config.HostOptions{
			HostDir: config.HostDirFromRoot(dir),
		})("registry.test")
		if err != nil {
			// Settings containerd rejects later (missing ca files, bad capabilities) are the
			// user's, not a merge problem.
			return
		}
		if len(hosts) == 0 || hostList(hosts[:1])[0] != "http://127.0.0.1:5001/v2 pull,resolve" {
			t.Fatalf("containerd reads %q from:\n%s", hostList(hosts), out)
		}
		if !strings.HasPrefix(string(out), markerPrefix) {
			t.Fatalf("no marker:\n%s", out)
		}
	})
}
