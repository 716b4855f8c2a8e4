package hostconfig

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
)

func TestCheckContainerdConfig(t *testing.T) {
	const certsDir = "/etc/containerd/certs.d"
	tests := []struct {
		name    string
		files   map[string]string // name → content; "config.toml" is the main file
		wantErr []string          // substrings of the error; nil means no error
		noDump  bool              // containerd 1.6 cannot check this case itself
	}{
		{
			name:  "version 2, config_path set",
			files: map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n"},
		},
		{
			name:  "trailing slash",
			files: map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d/\"\n"},
		},
		{
			name:  "list with Shoal's directory first",
			files: map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n"},
		},
		{
			name:    "list with Shoal's directory second",
			files:   map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/docker/certs.d:/etc/containerd/certs.d\"\n"},
			wantErr: []string{"before /etc/containerd/certs.d", "put /etc/containerd/certs.d first"},
		},
		{
			name:    "config_path missing",
			files:   map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors]\n"},
			wantErr: []string{"no registry config_path", `[plugins."io.containerd.grpc.v1.cri".registry]`, `config_path = "/etc/containerd/certs.d"`, "config.toml", "restart containerd"},
		},
		{
			name:    "config_path empty",
			files:   map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"\"\n"},
			wantErr: []string{"no registry config_path"},
		},
		{
			name:    "points elsewhere",
			files:   map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/docker/certs.d\"\n"},
			wantErr: []string{`"/etc/docker/certs.d"`, "not from /etc/containerd/certs.d", "--containerd-hosts-dir"},
		},
		{
			name:    "no CRI section",
			files:   map[string]string{"config.toml": "version = 2\nroot = \"/var/lib/containerd\"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n"},
			wantErr: []string{"no registry config_path", "config_path = \"/etc/containerd/certs.d\""},
		},
		{
			name:    "no plugins at all",
			files:   map[string]string{"config.toml": "version = 2\n"},
			wantErr: []string{"no registry config_path"},
		},
		{
			name:    "version 2 file using version 1 plugin names",
			files:   map[string]string{"config.toml": "version = 2\n[plugins.cri.registry]\n  config_path = \"/etc/containerd/certs.d\"\n"},
			wantErr: []string{`[plugins."io.containerd.grpc.v1.cri".registry]`},
		},
		{
			name:  "version 1 (no version line)",
			files: map[string]string{"config.toml": "[plugins.cri.registry]\n  config_path = \"/etc/containerd/certs.d\"\n"},
		},
		{
			name:    "version 1 without config_path names the version 1 section",
			files:   map[string]string{"config.toml": "[plugins.cri]\n  sandbox_image = \"x\"\n"},
			wantErr: []string{`[plugins."cri".registry]`},
		},
		{
			name:   "version 3 (containerd 2)",
			files:  map[string]string{"config.toml": "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '/etc/containerd/certs.d'\n"},
			noDump: true,
		},
		{
			// containerd 2.x reads /etc/containerd/certs.d:/etc/docker/certs.d when unset.
			name:   "version 3, config_path unset",
			files:  map[string]string{"config.toml": "version = 3\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n"},
			noDump: true,
		},
		{
			name:   "version 3, no CRI section at all",
			files:  map[string]string{"config.toml": "version = 3\n"},
			noDump: true,
		},
		{
			name: "set in an import",
			files: map[string]string{
				"config.toml":          "version = 2\nimports = [\"conf.d/registry.toml\"]\n",
				"conf.d/registry.toml": "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
			},
		},
		{
			name: "an import replaces the CRI section and drops config_path",
			files: map[string]string{
				"config.toml":     "version = 2\nimports = [\"IMPORTDIR/*.toml\"]\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
				"conf.d/cri.toml": "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause\"\n",
			},
			wantErr: []string{"no registry config_path", "conf.d/cri.toml"},
		},
		{
			name:    "malformed",
			files:   map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry\n"},
			wantErr: []string{"config.toml is not valid"},
		},
		{
			name:    "config_path of the wrong type",
			files:   map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = 1\n"},
			wantErr: []string{"not a string"},
		},
		{
			name:    "missing file",
			files:   map[string]string{},
			wantErr: []string{"does not exist", "version = 2", `config_path = "/etc/containerd/certs.d"`, `[plugins."io.containerd.grpc.v1.cri".registry]`},
		},
	}
	containerdBin, _ := exec.LookPath("containerd")
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, content := range tt.files {
				content = strings.ReplaceAll(content, "IMPORTDIR", filepath.Join(dir, "conf.d"))
				writeFile(t, filepath.Join(dir, name), content, 0o644)
			}
			configPath := filepath.Join(dir, "config.toml")
			err := CheckContainerdConfig(configPath, certsDir)
			if tt.wantErr == nil && err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if tt.wantErr != nil {
				if err == nil {
					t.Fatal("no error")
				}
				for _, want := range tt.wantErr {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("error %q does not contain %q", err, want)
					}
				}
			}
			// Cross-check with containerd 1.6 itself: it must see config_path starting with
			// certsDir exactly when the check passes.
			if containerdBin == "" || tt.noDump {
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			out, dumpErr := exec.CommandContext(ctx, containerdBin, "--config", configPath, "config", "dump").Output()
			var dumped struct {
				Plugins map[string]struct {
					Registry struct {
						ConfigPath string `toml:"config_path"`
					} `toml:"registry"`
				} `toml:"plugins"`
			}
			if dumpErr == nil {
				if err := toml.Unmarshal(out, &dumped); err != nil {
					t.Fatalf("parse containerd config dump: %v", err)
				}
			}
			roots := filepath.SplitList(dumped.Plugins["io.containerd.grpc.v1.cri"].Registry.ConfigPath)
			containerdOK := dumpErr == nil && len(roots) > 0 && filepath.Clean(roots[0]) == certsDir
			if containerdOK != (err == nil) {
				t.Errorf("containerd sees config_path %q (dump error %v), but the check says %v", roots, dumpErr, err)
			}
		})
	}
	if err := CheckContainerdConfig("", certsDir); err == nil {
		t.Error("no error for an empty config path")
	}
}

func TestCheckContainerdConfigImportLoop(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.toml"), filepath.Join(dir, "b.toml")
	writeFile(t, a, "version = 2\nimports = [\"b.toml\"]\n", 0o644)
	writeFile(t, b, "imports = [\"a.toml\"]\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/x\"\n", 0o644)
	if err := CheckContainerdConfig(a, "/x"); err != nil {
		t.Errorf("import loop: %v", err)
	}
	if err := os.Remove(b); err != nil {
		t.Fatal(err)
	}
	if err := CheckContainerdConfig(a, "/x"); err == nil || !strings.Contains(err.Error(), "b.toml") {
		t.Errorf("missing import: %v, want an error naming b.toml", err)
	}
}

// TestCheckDiscardUnpackedLayers finds discard_unpacked_layers where each config version keeps
// it, also in an imported file, and only when it is true.
func TestCheckDiscardUnpackedLayers(t *testing.T) {
	tests := []struct {
		name    string
		files   map[string]string
		discard bool
	}{
		{"version 2, unset", map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n"}, false},
		{"version 2, false", map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  discard_unpacked_layers = false\n"}, false},
		{"version 2, true", map[string]string{"config.toml": "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  discard_unpacked_layers = true\n"}, true},
		{"version 3, true", map[string]string{"config.toml": "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\n  discard_unpacked_layers = true\n"}, true},
		{"version 3, in the wrong place", map[string]string{"config.toml": "version = 3\n[plugins.\"io.containerd.cri.v1.runtime\"]\n  discard_unpacked_layers = true\n"}, false},
		{"version 2, true in an import", map[string]string{
			"config.toml": "version = 2\nimports = [\"IMPORT\"]\n",
			"k3s.toml":    "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  discard_unpacked_layers = true\n",
		}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, content := range tt.files {
				content = strings.ReplaceAll(content, "IMPORT", filepath.Join(dir, "k3s.toml"))
				if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			err := CheckDiscardUnpackedLayers(filepath.Join(dir, "config.toml"))
			if tt.discard != (err != nil) {
				t.Fatalf("CheckDiscardUnpackedLayers = %v, want discard reported: %v", err, tt.discard)
			}
			if err != nil && !strings.Contains(err.Error(), "discard_unpacked_layers = true") {
				t.Errorf("error %q does not name the setting", err)
			}
		})
	}
}
