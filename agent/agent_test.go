package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func validConfig(t *testing.T) Config {
	return Config{
		MirrorAddr:        "127.0.0.1:0",
		DataDir:           t.TempDir(),
		MirrorRegistries:  []string{"registry.test"},
		RegistryEndpoints: map[string]string{"registry.test": "http://127.0.0.1:5000"},
		DefaultRegistry:   "docker.io",
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name      string
		mutate    func(*Config)
		wantField string // "" = valid
	}{
		{"valid", func(*Config) {}, ""},
		{"all registries", func(c *Config) { c.MirrorRegistries = []string{"*"} }, ""},
		{"bad mirror addr", func(c *Config) { c.MirrorAddr = "5001" }, "MirrorAddr"},
		{"no data dir", func(c *Config) { c.DataDir = "" }, "DataDir"},
		{"negative cache", func(c *Config) { c.CacheSize = -1 }, "CacheSize"},
		{"no registries", func(c *Config) { c.MirrorRegistries = nil }, "MirrorRegistries"},
		{"path trick registry", func(c *Config) { c.MirrorRegistries = []string{"../etc"} }, "MirrorRegistries"},
		{"bad endpoint registry", func(c *Config) { c.RegistryEndpoints = map[string]string{"a/b": "http://x"} }, "RegistryEndpoints"},
		{"bad endpoint URL", func(c *Config) { c.RegistryEndpoints = map[string]string{"r.test": "ftp://x/y?z"} }, "RegistryEndpoints"},
		{"bad default registry", func(c *Config) { c.DefaultRegistry = "http://docker.io" }, "DefaultRegistry"},
		{"peers without own address", func(c *Config) { c.Swarm.Peers = []netip.AddrPort{netip.MustParseAddrPort("10.0.0.1:7070")} }, "Swarm.Peers"},
		{"negative min segments", func(c *Config) { c.Swarm.MinSegments = -1 }, "Swarm.MinSegments"},
		{"negative upload rate", func(c *Config) { c.Swarm.MaxUploadRate = -1 }, "Swarm.MaxUploadRate"},
		{"negative download rate", func(c *Config) { c.Swarm.MaxDownloadRate = -1 }, "Swarm.MaxDownloadRate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := validConfig(t)
			tt.mutate(&cfg)
			err := cfg.Validate()
			if tt.wantField == "" {
				if err != nil {
					t.Fatalf("Validate() = %v", err)
				}
				return
			}
			var field *FieldError
			if !errors.As(err, &field) || field.Field != tt.wantField || !strings.HasPrefix(err.Error(), tt.wantField+": ") {
				t.Fatalf("Validate() = %v, want a FieldError for %s", err, tt.wantField)
			}
		})
	}
}

// TestPprofOnlyWhenAsked: the ops endpoint serves Go's profiles with Pprof and not without.
func TestPprofOnlyWhenAsked(t *testing.T) {
	var ready atomic.Bool
	for _, profiles := range []bool{false, true} {
		srv := httptest.NewServer(opsHandler(prometheus.NewRegistry(), &ready, newLiveness(slog.New(slog.DiscardHandler)), nil, profiles))
		want := http.StatusNotFound
		if profiles {
			want = http.StatusOK
		}
		for _, path := range []string{"/debug/pprof/", "/debug/pprof/goroutine?debug=1", "/debug/pprof/profile?seconds=1", "/debug/pprof/cmdline"} {
			resp, err := http.Get(srv.URL + path)
			if err != nil {
				t.Fatal(err)
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode != want {
				t.Errorf("Pprof %v: GET %s = %d, want %d", profiles, path, resp.StatusCode, want)
			}
		}
		srv.Close()
	}
}

func TestEndpointResolution(t *testing.T) {
	hostsDir := t.TempDir()
	userFile := filepath.Join(hostsDir, "mirror.test", "hosts.toml")
	if err := os.MkdirAll(filepath.Dir(userFile), 0o755); err != nil {
		t.Fatal(err)
	}
	user := "server = \"http://127.0.0.1:7000\"\n\n[host.\"http://127.0.0.1:7000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
	if err := os.WriteFile(userFile, []byte(user), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := validConfig(t)
	cfg.ContainerdHostsDir = hostsDir
	r := newEndpointResolver(cfg)
	tests := map[string]string{
		"registry.test": "http://127.0.0.1:5000",        // --registry-endpoint
		"mirror.test":   "http://127.0.0.1:7000",        // the node's existing hosts.toml
		"docker.io":     "https://registry-1.docker.io", // usual endpoint
		"ghcr.io":       "https://ghcr.io",
	}
	for registry, want := range tests {
		endpoint, err := r.resolve(registry)
		if err != nil || endpoint.String() != want {
			t.Errorf("resolve(%s) = %v, %v; want %s", registry, endpoint, err, want)
		}
	}
	if got := r.server("*"); got != "" {
		t.Errorf(`server("*") = %q, want "" (containerd uses the image's registry)`, got)
	}
}

// TestRunServesAndStops runs the whole agent in-process: the mirror and ops endpoints answer,
// hosts.toml is written, and cancelling the context stops it.
func TestRunServesAndStops(t *testing.T) {
	cfg := validConfig(t)
	ports := freePorts(t, 2)
	cfg.MirrorAddr, cfg.MetricsAddr = ports[0], ports[1]
	cfg.ContainerdHostsDir = t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg) }()

	waitFor(t, "http://"+cfg.MetricsAddr+"/readyz", http.StatusOK)
	waitFor(t, "http://"+cfg.MirrorAddr+"/v2/", http.StatusOK)
	waitFor(t, "http://"+cfg.MirrorAddr+"/v2/a/blobs/sha256:abc?ns=registry.test", http.StatusBadRequest)
	// A registry that is not mirrored is refused without any upstream contact.
	waitFor(t, "http://"+cfg.MirrorAddr+"/v2/a/manifests/latest?ns=other.test", http.StatusNotFound)
	body := get(t, "http://"+cfg.MetricsAddr+"/metrics")
	for _, metric := range []string{"shoal_mirror_requests_total", "shoal_store_bytes", "go_goroutines"} {
		if !strings.Contains(body, metric) {
			t.Errorf("/metrics lacks %s", metric)
		}
	}
	hosts, err := os.ReadFile(filepath.Join(cfg.ContainerdHostsDir, "registry.test", "hosts.toml"))
	if err != nil || !strings.Contains(string(hosts), "http://"+cfg.MirrorAddr) {
		t.Fatalf("hosts.toml not written for the mirror: %v\n%s", err, hosts)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run returned %v after cancel", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not stop after cancel")
	}
}

func TestRunRefusesBusyAddress(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cfg := validConfig(t)
	cfg.MirrorAddr = l.Addr().String()
	err = Run(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "listen for the mirror") {
		t.Fatalf("Run on a busy address = %v", err)
	}
}

// TestWarnsWhenDefaultRegistryIsNotMirrored: requests without ?ns= go to --default-registry,
// which the mirror refuses unless it mirrors it; the agent says so when it starts.
func TestWarnsWhenDefaultRegistryIsNotMirrored(t *testing.T) {
	tests := []struct {
		name            string
		mirrors         []string
		defaultRegistry string
		warn            bool
	}{
		{"not mirrored", []string{"registry.test"}, "docker.io", true},
		{"mirrored", []string{"registry.test", "docker.io"}, "docker.io", false},
		{"every registry mirrored", []string{"*"}, "docker.io", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A busy mirror address stops Run right after its start-up checks.
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			cfg := validConfig(t)
			cfg.MirrorAddr = l.Addr().String()
			cfg.MirrorRegistries, cfg.DefaultRegistry = tt.mirrors, tt.defaultRegistry
			var logs bytes.Buffer
			cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			if err := Run(context.Background(), cfg); err == nil {
				t.Fatal("Run on a busy address succeeded")
			}
			warned := false
			for _, line := range strings.Split(logs.String(), "\n") {
				if strings.Contains(line, "level=WARN") && strings.Contains(line, "default_registry="+tt.defaultRegistry) {
					warned = true
				}
			}
			if warned != tt.warn {
				t.Errorf("--default-registry %s with --mirror-registries %v: warned %v, want %v; logs:\n%s",
					tt.defaultRegistry, tt.mirrors, warned, tt.warn, logs.String())
			}
		})
	}
}

func freePorts(t *testing.T, n int) []string {
	t.Helper()
	var addrs []string
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, l.Addr().String())
		defer l.Close()
	}
	return addrs
}

func waitFor(t *testing.T, url string, status int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		resp, err := http.Get(url)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == status {
				return
			}
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		last = err
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("GET %s never answered %d: %v", url, status, last)
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestHostsConfigWrittenAgain: when something else rebuilds containerd's hosts directory (k3s
// deletes what it did not write and writes its own file from registries.yaml when it starts),
// the agent writes its entry again, merged into the new file, and counts it.
func TestHostsConfigWrittenAgain(t *testing.T) {
	cfg := validConfig(t)
	ports := freePorts(t, 2)
	cfg.MirrorAddr, cfg.MetricsAddr = ports[0], ports[1]
	cfg.ContainerdHostsDir = t.TempDir()
	cfg.HostsRecheck = 50 * time.Millisecond
	stop := startAgent(t, cfg)
	defer func() {
		if err := stop(); err != nil {
			t.Error(err)
		}
	}()
	dir := filepath.Join(cfg.ContainerdHostsDir, "registry.test")
	path := filepath.Join(dir, "hosts.toml")
	if err := os.RemoveAll(cfg.ContainerdHostsDir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	const k3s = "# File generated by k3s. DO NOT EDIT.\nserver = \"https://registry.test\"\n\n[host.\"https://registry.test\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
	if err := os.WriteFile(path, []byte(k3s), 0o644); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		hosts, _ := os.ReadFile(path)
		if strings.Contains(string(hosts), "http://"+cfg.MirrorAddr) && strings.Contains(string(hosts), "https://registry.test") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("hosts.toml not written again within 10s:\n%s", hosts)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if backup, err := os.ReadFile(filepath.Join(dir, "hosts.toml.shoal-backup")); err != nil || string(backup) != k3s {
		t.Errorf("the rebuilt file was not kept as the user's (backup %q, %v)", backup, err)
	}
	// At least once: a check may also land between the removal and the new file. The count
	// comes just after the write, so it is waited for like the file.
	for {
		body := get(t, "http://"+cfg.MetricsAddr+"/metrics")
		if strings.Contains(body, "shoal_hostconfig_rewrites_total") && !strings.Contains(body, "shoal_hostconfig_rewrites_total 0") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("shoal_hostconfig_rewrites_total did not count the rewrite:\n%s", grepLines(body, "shoal_hostconfig"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func grepLines(text, substr string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
