package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
)

// conformanceRepo is the repository the conformance suite pulls from (its OCI_REPO1).
const conformanceRepo = "conformance/repo1"

// conformanceSuite is the name of the suite's root test. conformanceGroups are the groups of
// tests under it that run with push switched off: the API version check, HEAD and GET of every
// tag, manifest and blob given as read-only data, GETs of missing manifests, and a GET by a
// malformed digest.
const conformanceSuite = "OCI Conformance Test"

var conformanceGroups = []string{"ping", "read-only", "missing-manifest", "invalid-digest-format"}

// TestOCIConformancePull runs the OCI distribution-spec conformance suite against the agent's
// mirror address, pull APIs only, and fails unless every pull test passes. The suite sends no
// ?ns=, so the agent's --default-registry names the test registry; the content the pull tests
// read (an image and a two-platform index) is pushed to the registry first and handed to the
// suite as read-only data. Push, delete, tag listing and referrers are switched off: the mirror
// answers them with 405 or 404 by design.
func TestOCIConformancePull(t *testing.T) {
	harness.RequireIsolation(t)
	bin := conformanceBinary(t)
	e := newEnv(t)
	cfg := e.agentConfig()
	cfg.HostsDir = "" // no containerd here
	cfg.ExtraArgs = append(cfg.ExtraArgs, "--default-registry", registryName)
	agent := e.startAgent(cfg)

	img, err := harness.PushImage(e.ctx, e.reg.Host(), conformanceRepo+":image", harness.ImageSpec{Layers: 2, LayerSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	idx, err := harness.PushIndex(e.ctx, e.reg.Host(), conformanceRepo+":index", harness.ImageSpec{Layers: 1, LayerSize: 64 << 10},
		v1.Platform{OS: "linux", Architecture: "amd64"}, v1.Platform{OS: "linux", Architecture: "arm64"})
	if err != nil {
		t.Fatal(err)
	}
	tags := []string{img.Tag, idx.Tag}
	manifests, blobs := []string{img.Digest.String(), idx.Digest.String()}, hashStrings(img.Blobs())
	for _, child := range idx.Images {
		manifests = append(manifests, child.Digest.String())
		blobs = append(blobs, hashStrings(child.Blobs())...)
	}

	results := filepath.Join(e.dir, "conformance")
	t.Cleanup(func() {
		if t.Failed() {
			keepResults(t, results)
		}
	})
	env := []string{
		"OCI_REGISTRY=" + agent.MirrorAddr(),
		"OCI_TLS=disabled",
		"OCI_VERSION=1.1",
		"OCI_REPO1=" + conformanceRepo,
		"OCI_REPO2=conformance/repo2",
		"OCI_API_PUSH=false",
		"OCI_API_BLOBS_DELETE=false",
		"OCI_API_MANIFESTS_DELETE=false",
		"OCI_API_TAGS_DELETE=false",
		"OCI_API_TAGS_LIST=false",
		"OCI_API_REFERRER=false",
		"OCI_RO_DATA_TAGS=" + strings.Join(tags, " "),
		"OCI_RO_DATA_MANIFESTS=" + strings.Join(manifests, " "),
		"OCI_RO_DATA_BLOBS=" + strings.Join(blobs, " "),
	}
	// One run per group (OCI_FILTER_TEST takes one): with push switched off, the suite's blob
	// API group, which is all push tests, leaves a status behind that crashes it after its
	// report, so that group is left out.
	var report conformanceReport
	for _, group := range conformanceGroups {
		r, err := runConformance(e.ctx, bin, filepath.Join(results, group),
			append(env, "OCI_FILTER_TEST="+conformanceSuite+"/"+group))
		if err != nil {
			t.Fatal(err)
		}
		report.add(r)
	}

	// Every test that was not switched off is a pull test; each must pass.
	ran := report.counts["Total"] - report.counts["Disabled"]
	t.Logf("OCI conformance (pull): %d of %d specs passed (%d failed, %d errors, %d skipped; %d disabled: push, delete, tag listing, referrers)",
		report.counts["Pass"], ran, report.counts["FAIL"], report.counts["Error"], report.counts["Skip"], report.counts["Disabled"])
	if report.counts["Pass"] != ran {
		for _, tc := range report.tests {
			if tc.status != "Pass" && tc.status != "Disabled" {
				t.Errorf("%s: %s%s", tc.name, tc.status, tc.errors)
			}
		}
		t.Fatalf("%d of %d pull specs passed, want all (the suite's output is in the kept reports)", report.counts["Pass"], ran)
	}
	// The suite must have exercised every pull API on every piece of content, or a broken
	// configuration could pass by testing nothing.
	want := map[string]int{
		"manifest-head-by-tag": len(tags), "manifest-by-tag": len(tags),
		"manifest-head-by-digest": len(manifests), "manifest-by-digest": len(manifests),
		"blob-head": len(blobs), "blob-get": len(blobs),
		"ping": 1, "by-digest": 1, "by-tag": 1, "manifest-get": 1,
	}
	got := map[string]int{}
	for _, tc := range report.tests {
		if tc.status == "Pass" {
			got[path.Base(tc.name)]++
		}
	}
	for name, n := range want {
		if got[name] != n {
			t.Errorf("%d %s tests passed, want %d", got[name], name, n)
		}
	}

	// The v1.1 suite also asked for a manifest under a reference that cannot be a tag and wanted
	// 404 (its successor dropped that test); the agent answers without asking upstream.
	for _, method := range []string{http.MethodHead, http.MethodGet} {
		u := "http://" + agent.MirrorAddr() + "/v2/" + conformanceRepo + "/manifests/.INVALID_MANIFEST_NAME"
		if status := httpStatus(t, e.ctx, method, u); status != http.StatusNotFound {
			t.Errorf("%s %s: %d, want 404", method, u, status)
		}
	}
	if err := e.reg.Sync(e.ctx); err != nil {
		t.Fatal(err)
	}
	requests, err := e.reg.Requests()
	if err != nil {
		t.Fatal(err)
	}
	for _, req := range requests {
		if strings.Contains(req.Path, "INVALID_MANIFEST_NAME") {
			t.Errorf("the registry was asked %s %s: a malformed tag must be answered by the agent", req.Method, req.Path)
		}
	}
}

// conformanceBinary is the suite's binary, built by hack/install-deps.sh. Without it the test
// skips, unless SHOAL_E2E=1 (make e2e), where it fails.
func conformanceBinary(t *testing.T) string {
	t.Helper()
	cache := os.Getenv("SHOAL_CACHE")
	if cache == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			t.Fatal(err)
		}
		cache = filepath.Join(home, ".cache", "shoal")
	}
	bin := filepath.Join(cache, "bin", "oci-conformance")
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv(harness.RequireIsolationEnv) == "1" {
			t.Fatalf("OCI conformance suite missing (%v): run make deps", err)
		}
		t.Skipf("OCI conformance suite missing (%v): run make deps, or set %s=1 to make this a failure", err, harness.RequireIsolationEnv)
	}
	return bin
}

// conformanceReport is what the suite printed: each test with its status and errors, and the
// number of results by status (Pass, FAIL, Error, Skip, Disabled, Total).
type conformanceReport struct {
	tests  []conformanceTest
	counts map[string]int
}

type conformanceTest struct {
	name   string // e.g. "OCI Conformance Test/read-only/pull/blob-get"
	status string // Pass, FAIL, Error, Skip or Disabled
	errors string // one "\n - error" line per error
}

func (r *conformanceReport) add(o *conformanceReport) {
	r.tests = append(r.tests, o.tests...)
	if r.counts == nil {
		r.counts = map[string]int{}
	}
	for k, v := range o.counts {
		r.counts[k] += v
	}
}

var (
	// A test in the report's tree: its full name, then its status.
	reportTest = regexp.MustCompile(`^\s*(` + regexp.QuoteMeta(conformanceSuite) + `/.*): (\w+)$`)
	// An error of the test above.
	reportError = regexp.MustCompile(`^\s* - (.*)$`)
	// A count in the summary, e.g. "  Pass..........: 12".
	reportCount = regexp.MustCompile(`^\s+(\w+)\.+:\s+(\d+)$`)
)

// runConformance runs the suite with env (and nothing else of this process's environment) in
// an empty directory, so that no oci-conformance.yaml lying around changes its settings, and
// reads the report it prints. Its output goes to resultsDir/output.txt; the files it would
// write there (results.yaml, junit.xml, report.html) need a status for every API, which a
// pull-only run does not give, so it writes none of them and its exit status says nothing.
func runConformance(ctx context.Context, bin, resultsDir string, env []string) (*conformanceReport, error) {
	work := filepath.Join(resultsDir, "cwd")
	if err := os.MkdirAll(work, 0o755); err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, bin)
	cmd.Dir = work
	cmd.Env = append([]string{"HOME=" + work, "OCI_RESULTS_DIR=" + resultsDir, "OCI_LOG=warn"}, env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	runErr := cmd.Run()
	if err := os.WriteFile(filepath.Join(resultsDir, "output.txt"), out.Bytes(), 0o644); err != nil {
		return nil, err
	}
	var exitErr *exec.ExitError
	if runErr != nil && !errors.As(runErr, &exitErr) {
		return nil, fmt.Errorf("run %s: %w\n%s", bin, runErr, out.String())
	}
	r, err := parseConformanceReport(out.Bytes())
	if err != nil {
		return nil, fmt.Errorf("conformance suite output in %s (exit status %d): %w\n%s", resultsDir, cmd.ProcessState.ExitCode(), err, out.String())
	}
	return r, nil
}

// parseConformanceReport reads the report the suite prints: "Test results", the tree of tests
// with their statuses and errors, "Configuration:", then after "OCI Conformance Result:" the
// counts by status.
func parseConformanceReport(out []byte) (*conformanceReport, error) {
	r := &conformanceReport{counts: map[string]int{}}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "Test results", line == "Configuration:", strings.HasPrefix(line, "OCI Conformance Result:"):
			section = line
			continue
		case line == "":
			if section != "Configuration:" {
				section = ""
			}
			continue
		}
		switch section {
		case "Test results":
			if m := reportTest.FindStringSubmatch(line); m != nil {
				r.tests = append(r.tests, conformanceTest{name: m[1], status: m[2]})
			} else if m := reportError.FindStringSubmatch(line); m != nil && len(r.tests) > 0 {
				r.tests[len(r.tests)-1].errors += "\n - " + m[1]
			}
		case "Configuration:":
		default:
			if strings.HasPrefix(section, "OCI Conformance Result:") {
				if m := reportCount.FindStringSubmatch(line); m != nil {
					r.counts[m[1]], _ = strconv.Atoi(m[2])
				}
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	// Only the leaves are tests; the others are groups.
	leaves := r.tests[:0]
	for i, tc := range r.tests {
		if i+1 == len(r.tests) || !strings.HasPrefix(r.tests[i+1].name, tc.name+"/") {
			leaves = append(leaves, tc)
		}
	}
	r.tests = leaves
	switch {
	case len(r.tests) == 0:
		return nil, errors.New("no test results")
	case r.counts["Total"] == 0:
		return nil, errors.New("no result counts")
	}
	return r, nil
}

// keepResults copies the suite's output out of the test's directory, which is removed when the
// test ends.
func keepResults(t *testing.T, dir string) {
	kept, err := os.MkdirTemp("", "shoal-oci-conformance-")
	if err == nil {
		err = os.CopyFS(kept, os.DirFS(dir))
	}
	if err != nil {
		t.Logf("keep the conformance suite's output: %v", err)
		return
	}
	t.Logf("the conformance suite's output is kept in %s", kept)
}

func httpStatus(t *testing.T, ctx context.Context, method, url string) int {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func hashStrings(hs []v1.Hash) []string {
	s := make([]string, len(hs))
	for i, h := range hs {
		s[i] = h.String()
	}
	return s
}
