package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
)

// ErrCommitUnavailable means the repository does not hold the commit BuildShoalAt was asked
// for: a shallow clone, or a source tree without git history.
var ErrCommitUnavailable = errors.New("commit not in the repository's history")

// CacheDir is where heavy test artefacts are kept between runs: $SHOAL_CACHE, default
// ~/.cache/shoal, as for hack/install-deps.sh and the Makefile.
func CacheDir() (string, error) {
	if dir := os.Getenv("SHOAL_CACHE"); dir != "" {
		return dir, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("shoal cache directory: %w (set SHOAL_CACHE)", err)
	}
	return filepath.Join(home, ".cache", "shoal"), nil
}

// commitPattern is what BuildShoalAt accepts as a commit: a hash, full or abbreviated, so that
// the name can neither be taken for a git option nor escape the cache directory.
var commitPattern = regexp.MustCompile(`^[0-9a-f]{7,40}$`)

// BuildShoalAt builds ./cmd/shoal as it was at commit of the git repository at moduleDir and
// returns the binary's path, cacheDir/<full commit>/shoal (cacheDir: e.g. CacheDir()/old). It
// is built on the first call only (statically, -trimpath, with main.version set to the full
// commit) and reused after, by any process: the binary appears under its final name only once
// complete.
//
// The commit's tree is exported with git archive into a temporary directory that is removed
// after the build, so the repository, its index and its working tree are left as they are
// (other work may be going on in them). The build reads the commit's own go.mod; inside
// RunIsolated's namespace there is no module proxy to reach, so it runs with GOPROXY=off and
// needs the commit's modules in the module cache already, as they are when its go.sum is the
// checkout's and the checkout's modules were downloaded.
//
// A repository that does not hold commit (a shallow clone) gives an error wrapping
// ErrCommitUnavailable that says so.
func BuildShoalAt(ctx context.Context, moduleDir, commit, cacheDir string) (string, error) {
	if !commitPattern.MatchString(commit) {
		return "", fmt.Errorf("build shoal at %q: want a commit hash of 7 to 40 hex digits", commit)
	}
	full, err := resolveCommit(ctx, moduleDir, commit)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cacheDir, full)
	bin := filepath.Join(dir, "shoal")
	if fi, err := os.Stat(bin); err == nil && fi.Mode().IsRegular() {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("build shoal at %s: %w", full, err)
	}
	src, err := os.MkdirTemp("", "shoal-src-"+full[:12]+"-")
	if err != nil {
		return "", fmt.Errorf("build shoal at %s: %w", full, err)
	}
	defer os.RemoveAll(src)
	if err := exportCommit(ctx, moduleDir, full, src); err != nil {
		return "", err
	}
	// Build beside the final name and rename, so that a concurrent or interrupted build never
	// leaves a partial binary where the next call would take it for a complete one.
	out, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return "", fmt.Errorf("build shoal at %s: %w", full, err)
	}
	defer os.RemoveAll(out)
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-mod=readonly", "-buildvcs=false",
		"-ldflags", "-X main.version="+full, "-o", filepath.Join(out, "shoal"), "./cmd/shoal")
	cmd.Dir = src
	// GOWORK and GOTOOLCHAIN: the commit's module alone, with the installed Go, never a
	// workspace of the checkout or a toolchain download.
	cmd.Env = append(ChildEnv(), "CGO_ENABLED=0", "GOWORK=off", "GOTOOLCHAIN=local")
	hint := ""
	if InIsolatedNetwork() {
		cmd.Env = append(cmd.Env, "GOPROXY=off")
		hint = fmt.Sprintf("\n(built inside the isolated network namespace, from the module cache only: if a module is missing, run `go mod download` in a checkout of %s first)", full)
	}
	if output, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/shoal at %s: %w\n%s%s", full, err, output, hint)
	}
	if err := os.Rename(filepath.Join(out, "shoal"), bin); err != nil {
		return "", fmt.Errorf("build shoal at %s: %w", full, err)
	}
	return bin, nil
}

// BuildShoalAtFirst is a BeforeIsolation hook that builds ./cmd/shoal at commit into
// CacheDir()/old (see BuildShoalAt) while the module proxy is still reachable, so that the build
// the test asks for inside the isolated namespace finds it cached: an older commit may need
// module versions this checkout's module cache does not hold. A failure here is not reported:
// the test that needs the binary builds it again and says why it cannot.
func BuildShoalAtFirst(commit string) IsolateOption {
	return BeforeIsolation(func(ctx context.Context, _ string) ([]string, error) {
		mod, err := ModuleDir(ctx)
		if err != nil {
			return nil, nil
		}
		cache, err := CacheDir()
		if err != nil {
			return nil, nil
		}
		_, _ = BuildShoalAt(ctx, mod, commit, filepath.Join(cache, "old"))
		return nil, nil
	})
}

// resolveCommit returns the full hash of commit in the repository at dir, or an error wrapping
// ErrCommitUnavailable that says why the repository does not have it.
func resolveCommit(ctx context.Context, dir, commit string) (string, error) {
	out, err := gitOutput(ctx, dir, "rev-parse", "--verify", "--quiet", commit+"^{commit}")
	if err == nil {
		return out, nil
	}
	if shallow, serr := gitOutput(ctx, dir, "rev-parse", "--is-shallow-repository"); serr != nil {
		return "", fmt.Errorf("%w: %s has no git repository to take %s from (%w)", ErrCommitUnavailable, dir, commit, serr)
	} else if shallow == "true" {
		return "", fmt.Errorf("%w: %s is a shallow clone without %s (git fetch --unshallow fetches it)", ErrCommitUnavailable, dir, commit)
	}
	return "", fmt.Errorf("%w: the repository at %s has no commit %s", ErrCommitUnavailable, dir, commit)
}

// exportCommit writes the tree of commit into dst, as `git archive | tar -x` would.
func exportCommit(ctx context.Context, repo, commit, dst string) error {
	archive := exec.CommandContext(ctx, "git", "-C", repo, "archive", "--format=tar", commit)
	untar := exec.CommandContext(ctx, "tar", "-x", "-C", dst)
	var archiveErr, untarErr bytes.Buffer
	archive.Stderr, untar.Stderr = &archiveErr, &untarErr
	pipe, err := archive.StdoutPipe()
	if err != nil {
		return fmt.Errorf("export %s: %w", commit, err)
	}
	untar.Stdin = pipe
	if err := untar.Start(); err != nil {
		return fmt.Errorf("export %s: start tar: %w", commit, err)
	}
	errArchive := archive.Run()
	errUntar := untar.Wait()
	if errArchive != nil {
		return fmt.Errorf("git archive %s: %w: %s", commit, errArchive, bytes.TrimSpace(archiveErr.Bytes()))
	}
	if errUntar != nil {
		return fmt.Errorf("extract git archive of %s: %w: %s", commit, errUntar, bytes.TrimSpace(untarErr.Bytes()))
	}
	return nil
}

func gitOutput(ctx context.Context, dir string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "git", append([]string{"-C", dir}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return strings.TrimSpace(string(out)), nil
}

// AgentArgsFor returns the flags of args that binary's `shoal agent` knows (in order, with their
// values) and those it does not, so that an agent of an earlier release can be started with
// the arguments of this one: a flag added since would make it refuse to start.
//
// The known flags are read from `binary agent --help`. The value of a flag given as
// "--name value" is the next argument unless that starts with "-" (`shoal agent` takes no
// positional arguments, so any other argument after a flag is its value): give a flag that may
// be dropped a negative number as "--name=-1".
func AgentArgsFor(ctx context.Context, binary string, args []string) (kept, dropped []string, err error) {
	cmd := exec.CommandContext(ctx, binary, "agent", "--help")
	cmd.Env = ChildEnv()
	help, err := cmd.Output()
	if err != nil {
		return nil, nil, fmt.Errorf("%s agent --help: %w", binary, err)
	}
	known := parseHelpFlags(help)
	if len(known) == 0 {
		return nil, nil, fmt.Errorf("%s agent --help lists no flags:\n%s", binary, help)
	}
	kept, dropped = splitKnownFlags(args, known)
	return kept, dropped, nil
}

// helpFlag matches a flag line of a cobra help text: "  -h, --help ..." or "      --data-dir string ...".
var helpFlag = regexp.MustCompile(`^\s+(?:-[[:alnum:]], )?--([[:alnum:]][[:alnum:]-]*)`)

// parseHelpFlags returns the long flag names a cobra help text lists.
func parseHelpFlags(help []byte) map[string]bool {
	known := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(help))
	for sc.Scan() {
		if m := helpFlag.FindStringSubmatch(sc.Text()); m != nil {
			known[m[1]] = true
		}
	}
	return known
}

// splitKnownFlags splits args into the flags in known (with their values) and the others.
// Arguments that are not long flags, nor the value of one, are kept.
func splitKnownFlags(args []string, known map[string]bool) (kept, dropped []string) {
	for i := 0; i < len(args); i++ {
		arg := args[i]
		name, long := strings.CutPrefix(arg, "--")
		if !long || name == "" {
			kept = append(kept, arg)
			continue
		}
		name, _, inline := strings.Cut(name, "=")
		flag := []string{arg}
		if !inline && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
			i++
			flag = append(flag, args[i])
		}
		if known[name] {
			kept = append(kept, flag...)
		} else {
			dropped = append(dropped, flag...)
		}
	}
	return kept, dropped
}
