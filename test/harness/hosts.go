package harness

import (
	"fmt"
	"os"
	"path/filepath"
)

// WriteDirectHosts writes hostsDir/<registry>/hosts.toml sending containerd straight to
// upstreamURL (e.g. "http://127.0.0.1:5000") for images named registry/..., with no mirror:
// the baseline without Shoal, and a stand-in for a user's own hosts.toml. It returns the
// file's path. The [host] table is required: containerd 1.6 ignores a file with only server.
func WriteDirectHosts(hostsDir, registry, upstreamURL string) (string, error) {
	dir := filepath.Join(hostsDir, registry)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create hosts dir for %s: %w", registry, err)
	}
	path := filepath.Join(dir, "hosts.toml")
	content := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", upstreamURL, upstreamURL)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		return "", fmt.Errorf("write %s: %w", path, err)
	}
	return path, nil
}

// HostsFile is the path of registry's hosts.toml under hostsDir.
func HostsFile(hostsDir, registry string) string {
	return filepath.Join(hostsDir, registry, "hosts.toml")
}
