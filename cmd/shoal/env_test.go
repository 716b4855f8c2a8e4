package main

import (
	"bytes"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// testFlags is a flag set with one flag of each kind the commands use.
type testFlags struct {
	fs         *pflag.FlagSet
	addr       string
	size       int64
	timeout    time.Duration
	on         bool
	registries []string
	endpoints  map[string]string
}

func newTestFlags(t *testing.T, args ...string) *testFlags {
	t.Helper()
	f := &testFlags{fs: pflag.NewFlagSet("test", pflag.ContinueOnError)}
	f.fs.StringVar(&f.addr, "mirror-addr", "127.0.0.1:5001", "")
	f.fs.Var(newQuantityValue(&f.size, 50<<30), "cache-size", "")
	f.fs.DurationVar(&f.timeout, "manifest-timeout", 10*time.Second, "")
	f.fs.BoolVar(&f.on, "pprof", false, "")
	f.fs.StringSliceVar(&f.registries, "mirror-registries", []string{"docker.io"}, "")
	f.fs.Var(newEndpointsValue(&f.endpoints), "registry-endpoint", "")
	if err := f.fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	return f
}

func TestEnvName(t *testing.T) {
	for flag, want := range map[string]string{
		"mirror-addr":       "SHOAL_MIRROR_ADDR",
		"p2p-addr":          "SHOAL_P2P_ADDR",
		"registry-endpoint": "SHOAL_REGISTRY_ENDPOINT",
		"pprof":             "SHOAL_PPROF",
	} {
		if got := envName(flag); got != want {
			t.Errorf("envName(%q) = %q, want %q", flag, got, want)
		}
	}
}

func TestSetFlagsFromEnv(t *testing.T) {
	t.Run("flag from env", func(t *testing.T) {
		f := newTestFlags(t)
		err := setFlagsFromEnv(f.fs, []string{"SHOAL_MIRROR_ADDR=127.0.0.1:6001", "SHOAL_CACHE_SIZE=2Gi",
			"SHOAL_MANIFEST_TIMEOUT=3s", "SHOAL_PPROF=true", "OTHER=1"})
		if err != nil {
			t.Fatal(err)
		}
		if f.addr != "127.0.0.1:6001" || f.size != 2<<30 || f.timeout != 3*time.Second || !f.on {
			t.Errorf("flags = %q, %d, %v, %v; want the environment's values", f.addr, f.size, f.timeout, f.on)
		}
		if !f.fs.Changed("mirror-addr") {
			t.Error("a flag set from the environment is not marked as set")
		}
		if got := flagLabel(f.fs, "mirror-addr"); got != "SHOAL_MIRROR_ADDR (--mirror-addr)" {
			t.Errorf("flagLabel = %q, want the variable and the flag", got)
		}
	})
	t.Run("flag wins over env", func(t *testing.T) {
		f := newTestFlags(t, "--mirror-addr", "127.0.0.1:7001", "--mirror-registries", "a.test", "--registry-endpoint", "a.test=http://a")
		err := setFlagsFromEnv(f.fs, []string{"SHOAL_MIRROR_ADDR=127.0.0.1:6001", "SHOAL_MIRROR_REGISTRIES=b.test",
			"SHOAL_REGISTRY_ENDPOINT=b.test=http://b"})
		if err != nil {
			t.Fatal(err)
		}
		if f.addr != "127.0.0.1:7001" || !slices.Equal(f.registries, []string{"a.test"}) || len(f.endpoints) != 1 || f.endpoints["a.test"] != "http://a" {
			t.Errorf("flags = %q, %q, %v; want the command line's", f.addr, f.registries, f.endpoints)
		}
		if got := flagLabel(f.fs, "mirror-addr"); got != "--mirror-addr" {
			t.Errorf("flagLabel = %q, want the flag alone", got)
		}
	})
	t.Run("repeatable flag from env", func(t *testing.T) {
		f := newTestFlags(t)
		err := setFlagsFromEnv(f.fs, []string{
			"SHOAL_MIRROR_REGISTRIES=a.test, b.test",
			"SHOAL_REGISTRY_ENDPOINT=a.test=http://a,\n  b.test=http://b\n\n c.test=https://c\n",
		})
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"a.test", "b.test"}; !slices.Equal(f.registries, want) {
			t.Errorf("--mirror-registries = %q, want %q (the default replaced)", f.registries, want)
		}
		want := map[string]string{"a.test": "http://a", "b.test": "http://b", "c.test": "https://c"}
		if len(f.endpoints) != len(want) {
			t.Errorf("--registry-endpoint = %v, want %v", f.endpoints, want)
		}
		for r, u := range want {
			if f.endpoints[r] != u {
				t.Errorf("--registry-endpoint = %v, want %v", f.endpoints, want)
			}
		}
	})
	t.Run("empty list from env", func(t *testing.T) {
		f := newTestFlags(t)
		if err := setFlagsFromEnv(f.fs, []string{"SHOAL_MIRROR_REGISTRIES="}); err != nil {
			t.Fatal(err)
		}
		if len(f.registries) != 0 {
			t.Errorf("--mirror-registries = %q, want none", f.registries)
		}
	})
	t.Run("bad value from env names the variable", func(t *testing.T) {
		for _, kv := range []string{"SHOAL_CACHE_SIZE=50MB", "SHOAL_MANIFEST_TIMEOUT=soon", "SHOAL_PPROF=yes please",
			"SHOAL_REGISTRY_ENDPOINT=a.test=http://a,a.test=http://b"} {
			f := newTestFlags(t)
			err := setFlagsFromEnv(f.fs, []string{kv})
			name, _, _ := strings.Cut(kv, "=")
			if err == nil || !strings.Contains(err.Error(), name+" (--") {
				t.Errorf("%s: err = %v, want one naming %s", kv, err, name)
			}
		}
	})
}

// testCommands is a command tree like shoal's, with a flag on each subcommand.
func testCommands() (root, a, b *cobra.Command) {
	root = &cobra.Command{Use: "shoal"}
	a = &cobra.Command{Use: "a", Run: func(*cobra.Command, []string) {}}
	a.Flags().String("p2p-addr", "", "")
	a.Flags().String("log-format", "json", "")
	b = &cobra.Command{Use: "b", Run: func(*cobra.Command, []string) {}}
	b.Flags().String("containerd-hosts-dir", "", "")
	root.AddCommand(a, b)
	return root, a, b
}

func TestUnknownEnvIsWarned(t *testing.T) {
	root, a, b := testCommands()
	environ := []string{"SHOAL_P2P_ADR=10.0.0.1:7070", "SHOAL_CONTAINERD_HOSTS_DIR=/x", "SHOAL_P2P_ADDR=10.0.0.1:7070", "HOME=/root"}
	if got, want := unknownEnv(root, environ), []string{"SHOAL_P2P_ADR"}; !slices.Equal(got, want) {
		t.Errorf("unknownEnv = %q, want %q (a flag of another subcommand is known)", got, want)
	}
	for _, tt := range []struct {
		cmd    *cobra.Command
		format string // how the line starts: the subcommand's --log-format, else text
	}{{a, `{"time"`}, {b, "time="}} {
		var stderr bytes.Buffer
		root.SetErr(&stderr)
		if err := applyEnv(tt.cmd, environ); err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
		if len(lines) != 1 || !strings.HasPrefix(lines[0], tt.format) || !strings.Contains(lines[0], "WARN") || !strings.Contains(lines[0], "SHOAL_P2P_ADR") {
			t.Errorf("%s: stderr = %q, want one warning naming SHOAL_P2P_ADR, starting %s", tt.cmd.Name(), stderr.String(), tt.format)
		}
	}
	var stderr bytes.Buffer
	root.SetErr(&stderr)
	if err := applyEnv(b, []string{"SHOAL_CONTAINERD_HOSTS_DIR=/x"}); err != nil || stderr.Len() != 0 {
		t.Errorf("known variables only: err %v, stderr %q; want nothing", err, stderr.String())
	}
}

// TestEveryCommandReadsEnv runs shoal's own command tree (with cleanup's work replaced by a
// probe): the root applies the environment to whichever subcommand runs.
func TestEveryCommandReadsEnv(t *testing.T) {
	t.Setenv("SHOAL_CONTAINERD_HOSTS_DIR", "/from/env")
	root := newRootCommand()
	cleanup, _, err := root.Find([]string{"cleanup"})
	if err != nil {
		t.Fatal(err)
	}
	var got string
	cleanup.RunE = func(cmd *cobra.Command, _ []string) error {
		got, err = cmd.Flags().GetString("containerd-hosts-dir")
		return err
	}
	root.SetErr(&bytes.Buffer{})
	root.SetArgs([]string{"cleanup"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	if got != "/from/env" {
		t.Errorf("shoal cleanup with SHOAL_CONTAINERD_HOSTS_DIR=/from/env has --containerd-hosts-dir %q", got)
	}
}

// TestEnvNamesAreDistinct: no two flags of a command share a variable.
func TestEnvNamesAreDistinct(t *testing.T) {
	for _, cmd := range newRootCommand().Commands() {
		seen := map[string]string{}
		cmd.Flags().VisitAll(func(f *pflag.Flag) {
			name := envName(f.Name)
			if other, dup := seen[name]; dup {
				t.Errorf("%s: --%s and --%s are both set by %s", cmd.Name(), other, f.Name, name)
			}
			seen[name] = f.Name
		})
	}
}
