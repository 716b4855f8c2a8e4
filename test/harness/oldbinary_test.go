package harness

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestSplitKnownFlags(t *testing.T) {
	known := map[string]bool{"data-dir": true, "containerd-config": true, "pprof": true, "peers": true}
	for _, tc := range []struct {
		name          string
		args          []string
		kept, dropped []string
	}{
		{"all known", []string{"--data-dir", "/d", "--pprof", "--peers=a,b"}, []string{"--data-dir", "/d", "--pprof", "--peers=a,b"}, nil},
		{"unknown with a separate value", []string{"--data-dir", "/d", "--swarm-min-segments", "16", "--pprof"},
			[]string{"--data-dir", "/d", "--pprof"}, []string{"--swarm-min-segments", "16"}},
		{"unknown with an inline value", []string{"--swarm-min-segments=16", "--data-dir", "/d"},
			[]string{"--data-dir", "/d"}, []string{"--swarm-min-segments=16"}},
		{"unknown switch before a flag", []string{"--fault-injection", "--data-dir", "/d"},
			[]string{"--data-dir", "/d"}, []string{"--fault-injection"}},
		{"unknown last", []string{"--pprof", "--new-flag"}, []string{"--pprof"}, []string{"--new-flag"}},
		{"empty value kept with its flag", []string{"--containerd-config", "", "--new", "x"},
			[]string{"--containerd-config", ""}, []string{"--new", "x"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kept, dropped := splitKnownFlags(tc.args, known)
			if !slices.Equal(kept, tc.kept) || !slices.Equal(dropped, tc.dropped) {
				t.Errorf("splitKnownFlags(%q) = %q, %q; want %q, %q", tc.args, kept, dropped, tc.kept, tc.dropped)
			}
		})
	}
}

func TestParseHelpFlags(t *testing.T) {
	help := `Run the node agent. It serves --mirror-addr and more.

Usage:
  shoal agent [flags]

Flags:
      --cache-size string                    content store limit (default "50Gi")
  -h, --help                                 help for agent
      --pprof                                also serve Go's profiles
      --swarm-ramp-segments int              blobs start with this many segments
`
	got := parseHelpFlags([]byte(help))
	want := map[string]bool{"cache-size": true, "help": true, "pprof": true, "swarm-ramp-segments": true}
	if len(got) != len(want) {
		t.Errorf("parseHelpFlags = %v, want %v", got, want)
	}
	for name := range want {
		if !got[name] {
			t.Errorf("parseHelpFlags lacks --%s: %v", name, got)
		}
	}
}

// TestBuildShoalAt builds ./cmd/shoal of a tiny repository's first commit, after a second one
// changed it: the binary is the first commit's, and a second call reuses it.
func TestBuildShoalAt(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	repo := t.TempDir()
	first := commitTinyModule(t, repo, "first")
	commitTinyModule(t, repo, "second")
	cache := t.TempDir()

	bin, err := BuildShoalAt(ctx, repo, first[:7], cache)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(cache, first, "shoal"); bin != want {
		t.Errorf("binary at %s, want %s", bin, want)
	}
	out, err := exec.CommandContext(ctx, bin).CombinedOutput()
	if err != nil {
		t.Fatalf("run %s: %v\n%s", bin, err, out)
	}
	if got := strings.TrimSpace(string(out)); got != "first "+first {
		t.Errorf("the binary says %q, want the first commit's program with its hash %q", got, "first "+first)
	}
	// A second call must not build again: make the cached binary recognisable.
	if err := os.WriteFile(bin, []byte("cached"), 0o755); err != nil {
		t.Fatal(err)
	}
	if again, err := BuildShoalAt(ctx, repo, first, cache); err != nil || again != bin {
		t.Fatalf("second call = %s, %v; want %s", again, err, bin)
	}
	if data, err := os.ReadFile(bin); err != nil || string(data) != "cached" {
		t.Errorf("the second call rebuilt the binary (%v)", err)
	}
	if out, err := exec.CommandContext(ctx, "git", "-C", repo, "status", "--porcelain").Output(); err != nil || len(out) != 0 {
		t.Errorf("the repository's working tree changed: %q, %v", out, err)
	}
}

// TestBuildShoalAtUnavailableCommit: a commit the repository lacks, as in a shallow clone, is
// ErrCommitUnavailable with the reason.
func TestBuildShoalAtUnavailableCommit(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	repo := t.TempDir()
	first := commitTinyModule(t, repo, "first")
	commitTinyModule(t, repo, "second")
	shallow := filepath.Join(t.TempDir(), "shallow")
	git(t, "", "clone", "--quiet", "--depth", "1", "file://"+repo, shallow)

	for _, tc := range []struct {
		name, repo, commit, reason string
	}{
		{"shallow clone", shallow, first, "shallow clone"},
		{"unknown commit", repo, strings.Repeat("0", 40), "has no commit"},
		{"no repository", t.TempDir(), first, "no git repository"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := BuildShoalAt(ctx, tc.repo, tc.commit, t.TempDir())
			if !errors.Is(err, ErrCommitUnavailable) || !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("BuildShoalAt = %v; want ErrCommitUnavailable saying %q", err, tc.reason)
			}
		})
	}
}

// commitTinyModule writes a module whose ./cmd/shoal prints word and its main.version, commits
// it in the repository at dir (created on the first call) and returns the commit's hash.
func commitTinyModule(t *testing.T, dir, word string) string {
	t.Helper()
	if _, err := os.Stat(filepath.Join(dir, ".git")); err != nil {
		git(t, dir, "init", "--quiet")
	}
	files := map[string]string{
		"go.mod":            "module example.test/tiny\n\ngo 1.22\n",
		"cmd/shoal/main.go": "package main\n\nvar version = \"dev\"\n\nfunc main() { println(\"" + word + "\", version) }\n",
	}
	for name, content := range files {
		path := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	git(t, dir, "add", ".")
	git(t, dir, "-c", "user.name=test", "-c", "user.email=test@example.test", "commit", "--quiet", "-m", word)
	return git(t, dir, "rev-parse", "HEAD")
}

func git(t *testing.T, dir string, args ...string) string {
	t.Helper()
	if dir != "" {
		args = append([]string{"-C", dir}, args...)
	}
	out, err := exec.Command("git", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("git %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}
