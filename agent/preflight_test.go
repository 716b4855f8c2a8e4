package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCheckContainerd: the preflight compares containerd's config_path with the hosts directory
// as containerd names it (not where a containerized agent has it mounted), reports layers
// discarded, and reports a missing config file once.
func TestCheckContainerd(t *testing.T) {
	const v3 = "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\n%s  [plugins.\"io.containerd.cri.v1.images\".registry]\n    config_path = \"/etc/containerd/certs.d\"\n"
	tests := []struct {
		name    string
		config  string // "" = no file
		onHost  string
		reasons []string
	}{
		{"agent in a container, config_path on the host", fmt.Sprintf(v3, ""), "/etc/containerd/certs.d", nil},
		{"agent in a container, on-host path not given", fmt.Sprintf(v3, ""), "", []string{ReasonHostsNotRead}},
		{"another directory", fmt.Sprintf(v3, ""), "/var/lib/rancher/k3s/agent/etc/containerd/certs.d", []string{ReasonHostsNotRead}},
		{"layers discarded", fmt.Sprintf(v3, "  discard_unpacked_layers = true\n"), "/etc/containerd/certs.d", []string{ReasonDiscardUnpackedLayers}},
		{"no config file", "", "/etc/containerd/certs.d", []string{ReasonHostsNotRead}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "config.toml")
			if tt.config != "" {
				if err := os.WriteFile(path, []byte(tt.config), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			found := CheckContainerd(Config{ContainerdConfig: path, ContainerdHostsDir: "/host/certs.d", ContainerdHostsDirOnHost: tt.onHost})
			var reasons []string
			for _, f := range found {
				reasons = append(reasons, f.Reason)
				if f.Message == "" {
					t.Errorf("%s without a message", f.Reason)
				}
			}
			if len(reasons) != len(tt.reasons) || (len(reasons) > 0 && reasons[0] != tt.reasons[0]) {
				t.Errorf("reasons %v, want %v (findings %+v)", reasons, tt.reasons, found)
			}
		})
	}
	if found := CheckContainerd(Config{ContainerdHostsDir: "/host/certs.d"}); found != nil {
		t.Errorf("no config file to check, yet %+v", found)
	}

	// Another mirror in the node's own file for a mirrored registry: worth a note, not a fault.
	dir := t.TempDir()
	config := filepath.Join(dir, "config.toml")
	hosts := filepath.Join(dir, "certs.d")
	if err := os.WriteFile(config, []byte(fmt.Sprintf("version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = %q\n", hosts)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(hosts, "docker.io"), 0o755); err != nil {
		t.Fatal(err)
	}
	k3s := "server = \"https://registry-1.docker.io\"\n\n[host.\"https://10.0.0.5:6443/v2\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
	if err := os.WriteFile(filepath.Join(hosts, "docker.io", "hosts.toml"), []byte(k3s), 0o644); err != nil {
		t.Fatal(err)
	}
	found := CheckContainerd(Config{ContainerdConfig: config, ContainerdHostsDir: hosts, MirrorRegistries: []string{"docker.io", "*"}})
	if len(found) != 1 || found[0].Reason != ReasonAnotherMirror || !found[0].Info || !strings.Contains(found[0].Message, "https://10.0.0.5:6443/v2") {
		t.Errorf("findings %+v, want one note naming the other mirror", found)
	}
}
