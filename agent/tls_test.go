package agent

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/shoal-dev/shoal/agent/upstream"
)

// TestEndpointTLSSettings: the upstream client gets the TLS settings of the user's hosts.toml
// for the endpoint it uses, whether the endpoint comes from that file or from
// --registry-endpoint, and none for an endpoint the file does not list.
func TestEndpointTLSSettings(t *testing.T) {
	hostsDir := t.TempDir()
	regDir := filepath.Join(hostsDir, "registry.test")
	if err := os.MkdirAll(regDir, 0o755); err != nil {
		t.Fatal(err)
	}
	user := "server = \"https://upstream.test:5000\"\nca = \"ca.pem\"\nclient = [[\"c.cert\", \"c.key\"], \"both.pem\"]\nskip_verify = true\n"
	if err := os.WriteFile(filepath.Join(regDir, "hosts.toml"), []byte(user), 0o644); err != nil {
		t.Fatal(err)
	}
	want := upstream.TLSSettings{
		CAFiles: []string{filepath.Join(regDir, "ca.pem")},
		ClientCerts: []upstream.ClientCert{
			{CertFile: filepath.Join(regDir, "c.cert"), KeyFile: filepath.Join(regDir, "c.key")},
			{CertFile: filepath.Join(regDir, "both.pem")},
		},
		SkipVerify: true,
		Source:     filepath.Join(regDir, "hosts.toml"),
	}
	tests := []struct {
		name      string
		endpoints map[string]string // --registry-endpoint
		want      upstream.TLSSettings
	}{
		{"endpoint from the hosts.toml", nil, want},
		{"the same endpoint given with --registry-endpoint", map[string]string{"registry.test": "https://upstream.test:5000"}, want},
		{"an endpoint the hosts.toml does not list", map[string]string{"registry.test": "https://other.test:5000"}, upstream.TLSSettings{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := validConfig(t)
			cfg.ContainerdHostsDir, cfg.RegistryEndpoints = hostsDir, tt.endpoints
			r := newEndpointResolver(cfg)
			endpoint, err := r.resolve("registry.test")
			if err != nil {
				t.Fatal(err)
			}
			got, err := r.tls("registry.test", endpoint)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("tls(registry.test, %s) =\n  %+v\nwant\n  %+v", endpoint, got, tt.want)
			}
		})
	}

	cfg := validConfig(t) // no hosts directory: nothing to read
	if got, err := newEndpointResolver(cfg).tls("registry.test", upstream.Endpoint{Scheme: "https", Host: "upstream.test:5000"}); err != nil || !reflect.DeepEqual(got, upstream.TLSSettings{}) {
		t.Errorf("without a hosts directory: tls = %+v, %v; want none", got, err)
	}
}

// TestTLSConfigurationErrors: an unusable RegistryCAFile stops the agent before it starts
// anything; a CA file a hosts.toml names but that is missing is reported at start, naming the
// registry and the file.
func TestTLSConfigurationErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing-ca.pem")
	cfg := validConfig(t)
	cfg.RegistryCAFile = missing
	err := Run(context.Background(), cfg)
	var field *FieldError
	if !errors.As(err, &field) || field.Field != "RegistryCAFile" || !strings.Contains(err.Error(), missing) {
		t.Errorf("Run with a missing RegistryCAFile = %v, want a FieldError naming the field and the file", err)
	}
	if entries, _ := os.ReadDir(cfg.DataDir); len(entries) != 0 {
		t.Errorf("the agent touched its data directory before refusing to start")
	}

	hostsDir := t.TempDir()
	regDir := filepath.Join(hostsDir, "registry.test")
	if err := os.MkdirAll(regDir, 0o755); err != nil {
		t.Fatal(err)
	}
	user := "server = \"https://upstream.test\"\nca = \"gone.pem\"\n"
	if err := os.WriteFile(filepath.Join(regDir, "hosts.toml"), []byte(user), 0o644); err != nil {
		t.Fatal(err)
	}
	// A busy mirror address stops Run right after its start-up checks.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cfg = validConfig(t)
	cfg.MirrorAddr, cfg.ContainerdHostsDir, cfg.RegistryEndpoints = l.Addr().String(), hostsDir, nil
	var logs bytes.Buffer
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	if err := Run(context.Background(), cfg); err == nil {
		t.Fatal("Run on a busy address succeeded")
	}
	warned := false
	for _, line := range strings.Split(logs.String(), "\n") {
		if strings.Contains(line, "level=WARN") && strings.Contains(line, "registry=registry.test") &&
			strings.Contains(line, filepath.Join(regDir, "gone.pem")) {
			warned = true
		}
	}
	if !warned {
		t.Errorf("no warning naming registry.test and its missing CA file; logs:\n%s", logs.String())
	}
}
