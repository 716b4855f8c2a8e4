package depcheck_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shoal-dev/shoal/internal/depcheck"
)

const module = "github.com/shoal-dev/shoal"

// m turns a path inside the module into an import path pattern.
func m(path string) string { return module + "/" + path }

// rules is Shoal's package layering. Add a rule when a boundary is decided; a rule whose
// package pattern matches nothing fails the test, so rules follow packages that move.
var rules = []depcheck.Rule{
	{
		Why: "anacrolix/torrent is reached from one adapter package only, so that an upgrade " +
			"touches one place (STYLE.md)",
		Packages:      []string{m("...")},
		Except:        []string{m("agent/torrent")},
		MustNotImport: []string{"github.com/anacrolix/torrent/..."},
		Tests:         true,
	},
	{
		Why: "the segment plan is a wire contract of its own: the BitTorrent client's encoding " +
			"of a segment's info is swarm's business, and a torrent upgrade must not change how blobs are cut",
		Packages:        []string{m("agent/plan")},
		MustNotDependOn: []string{m("agent/torrent/..."), "github.com/anacrolix/torrent/..."},
	},
	{
		Why: "the mirror serves from the store, upstream and peers through interfaces that " +
			"agent wires up: it knows nothing of the BitTorrent client or of hosts.toml",
		Packages: []string{m("agent/mirror/...")},
		MustNotDependOn: []string{
			m("agent/swarm/..."), m("agent/torrent/..."), "github.com/anacrolix/torrent/...",
			m("agent/hostconfig/..."),
		},
	},
	{
		Why: "the API types are imported by clients of Shoal's API: they need apimachinery and " +
			"k8s.io/api, never a client library or the rest of Shoal",
		Packages: []string{m("api/...")},
		MustNotDependOn: []string{
			"k8s.io/client-go/...", "sigs.k8s.io/controller-runtime/...",
			m("agent/..."), m("internal/..."), m("cmd/..."), m("controllers/..."),
		},
	},
	{
		Why: "the data path (mirror, store, swarm, upstream) works without the API server: " +
			"Kubernetes clients live in the packages that talk to it",
		Packages:        []string{m("agent/...")},
		Except:          []string{m("agent/kubecreds"), m("agent/kubemembers"), m("agent/kubeseeds"), m("agent/nodecache")},
		MustNotDependOn: []string{"k8s.io/client-go/...", "sigs.k8s.io/controller-runtime/..."},
	},
	{
		Why:             "the controller talks to agents only through the API server: it links none of their code",
		Packages:        []string{m("controllers/...")},
		MustNotDependOn: []string{m("agent/...")},
	},
	{
		Why:             "the store holds verified blobs and knows nothing of where they come from",
		Packages:        []string{m("agent/store/...")},
		MustNotDependOn: []string{m("agent/upstream/..."), m("agent/mirror/..."), m("agent/swarm/..."), m("agent/torrent/...")},
	},
	{
		Why:             "internal/ holds helpers that the agent, the commands and the tests share: it depends on none of them",
		Packages:        []string{m("internal/...")},
		MustNotDependOn: []string{m("agent/..."), m("cmd/..."), m("test/..."), m("hack/...")},
	},
	{
		Why:             "what ships (agent/, internal/, cmd/) does not depend on test or development tooling",
		Packages:        []string{m("agent/..."), m("internal/..."), m("cmd/...")},
		MustNotDependOn: []string{m("test/..."), m("hack/...")},
	},
	{
		// Direct imports only: cmd/shoal links testing through anacrolix/torrent itself.
		Why:           "the testing package belongs in _test.go files, not in what ships",
		Packages:      []string{m("agent/..."), m("internal/..."), m("cmd/...")},
		Except:        conformanceSuites,
		MustNotImport: []string{"testing"},
	},
	{
		Why:             "conformance suites are for tests: nothing that ships links them",
		Packages:        []string{m("agent/..."), m("internal/..."), m("cmd/...")},
		Except:          conformanceSuites,
		MustNotDependOn: conformanceSuites,
	},
	{
		Why: "development commands do not link the testing package: the test libraries they use " +
			"(test/harness, test/testbed) keep testing out of their non-test files",
		Packages:        []string{m("hack/...")},
		Commands:        true,
		MustNotDependOn: []string{"testing"},
	},
}

// pure are the packages that hold what every agent must compute alike, across nodes and adjacent
// releases: the segment plan and the control protocol's messages, rendezvous hashing. They
// import nothing of the module but mayImport, so that no change elsewhere can change what goes
// on the wire.
var pure = struct{ packages, mayImport []string }{
	packages:  []string{m("agent/plan"), m("agent/rendezvous")},
	mayImport: []string{m("internal/oci")},
}

// pureRule is the rule for pure: its forbidden imports are every package of the module in g
// but pure.mayImport, so that a package added later is forbidden too.
func pureRule(g depcheck.Graph) depcheck.Rule {
	r := depcheck.Rule{
		Why: "the plan, the control messages and rendezvous hashing are wire contracts: " +
			"they import nothing of the module but " + strings.Join(pure.mayImport, ", "),
		Packages: pure.packages,
	}
	for path := range g {
		if depcheck.Match(m("..."), path) && !slices.Contains(pure.mayImport, path) {
			r.MustNotImport = append(r.MustNotImport, path)
		}
	}
	slices.Sort(r.MustNotImport)
	return r
}

// conformanceSuites are the packages that check an interface's implementations and fakes
// alike; they are test code in their own package so that every implementation's tests can
// import them.
var conformanceSuites = []string{
	m("agent/membership/membershiptest"),
	m("agent/store/storetest"),
	m("agent/upstream/upstreamtest"),
}

// TestModuleRules checks every package of the module against rules.
func TestModuleRules(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	g, err := depcheck.Load(ctx, ".", m("..."))
	if err != nil {
		t.Fatal(err)
	}
	violations, err := depcheck.Check(g, append(slices.Clone(rules), pureRule(g)))
	if err != nil {
		t.Error(err)
	}
	for _, v := range violations {
		t.Error(v)
	}
}
