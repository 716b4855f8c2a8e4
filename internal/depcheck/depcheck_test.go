package depcheck_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/shoal-dev/shoal/internal/depcheck"
)

// fakeGraph is a small module ex/ with a layering mistake or two.
func fakeGraph() depcheck.Graph {
	pkgs := []depcheck.Package{
		{ImportPath: "ex/cmd/tool", Name: "main", Imports: []string{"ex/lib", "fmt"}},
		{ImportPath: "ex/lib", Name: "lib", Imports: []string{"ex/mid", "fmt"}},
		{ImportPath: "ex/mid", Name: "mid", Imports: []string{"ex/bad", "ex/bad/sub"}},
		{ImportPath: "ex/bad", Name: "bad", Imports: []string{"ex/bad/sub", "testing"}},
		{ImportPath: "ex/bad/sub", Name: "sub"},
		{ImportPath: "ex/clean", Name: "clean", Imports: []string{"fmt"}, XTestImports: []string{"ex/bad"}},
		{ImportPath: "fmt", Name: "fmt"},
		{ImportPath: "testing", Name: "testing", Imports: []string{"fmt"}},
	}
	g := depcheck.Graph{}
	for i := range pkgs {
		g[pkgs[i].ImportPath] = &pkgs[i]
	}
	return g
}

func TestCheck(t *testing.T) {
	tests := []struct {
		name string
		rule depcheck.Rule
		want []string // violations as "package forbidden path..."
	}{
		{
			name: "direct import",
			rule: depcheck.Rule{Packages: []string{"ex/..."}, MustNotImport: []string{"testing"}},
			want: []string{"ex/bad testing: ex/bad testing"},
		},
		{
			name: "direct import, except",
			rule: depcheck.Rule{Packages: []string{"ex/..."}, Except: []string{"ex/bad/..."}, MustNotImport: []string{"testing"}},
		},
		{
			name: "a transitive dependency is not an import",
			rule: depcheck.Rule{Packages: []string{"ex/lib"}, MustNotImport: []string{"ex/bad/..."}},
		},
		{
			name: "imports of tests count only with Tests",
			rule: depcheck.Rule{Packages: []string{"ex/clean"}, MustNotImport: []string{"ex/bad"}},
		},
		{
			name: "imports of tests",
			rule: depcheck.Rule{Packages: []string{"ex/clean"}, MustNotImport: []string{"ex/bad"}, Tests: true},
			want: []string{"ex/clean ex/bad: ex/clean ex/bad (tests)"},
		},
		{
			name: "dependency, shortest path, not walked through",
			rule: depcheck.Rule{Packages: []string{"ex/cmd/...", "ex/lib"}, MustNotDependOn: []string{"ex/bad/..."}},
			want: []string{
				"ex/cmd/tool ex/bad: ex/cmd/tool ex/lib ex/mid ex/bad",
				"ex/cmd/tool ex/bad/sub: ex/cmd/tool ex/lib ex/mid ex/bad/sub",
				"ex/lib ex/bad: ex/lib ex/mid ex/bad",
				"ex/lib ex/bad/sub: ex/lib ex/mid ex/bad/sub",
			},
		},
		{
			name: "linked package, commands only",
			rule: depcheck.Rule{Packages: []string{"ex/..."}, Commands: true, MustNotDependOn: []string{"testing"}},
			want: []string{"ex/cmd/tool testing: ex/cmd/tool ex/lib ex/mid ex/bad testing"},
		},
		{
			name: "clean",
			rule: depcheck.Rule{Packages: []string{"ex/clean", "ex/bad/sub"}, MustNotDependOn: []string{"ex/bad", "testing"}, MustNotImport: []string{"ex/lib"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.rule.Why = "because"
			vs, err := depcheck.Check(fakeGraph(), []depcheck.Rule{tt.rule})
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, v := range vs {
				s := v.Package + " " + v.Forbidden + ": " + strings.Join(v.Path, " ")
				if v.InTests {
					s += " (tests)"
				}
				got = append(got, s)
				if !strings.HasSuffix(v.String(), ": because") || !strings.HasPrefix(v.String(), v.Package+" ") {
					t.Errorf("message %q does not name the package and end with the reason", v)
				}
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("violations:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tt.want, "\n"))
			}
		})
	}
}

// TestCheckStaleRule: a rule for packages that do not exist (any more) is an error, not a
// rule that silently passes.
func TestCheckStaleRule(t *testing.T) {
	rule := depcheck.Rule{Why: "because", Packages: []string{"ex/lib", "ex/gone/..."}, MustNotImport: []string{"testing"}}
	_, err := depcheck.Check(fakeGraph(), []depcheck.Rule{rule})
	if err == nil || !strings.Contains(err.Error(), "ex/gone/...") {
		t.Errorf("Check with a pattern that matches nothing: %v, want an error naming the pattern", err)
	}
}

func TestMatch(t *testing.T) {
	tests := []struct {
		pattern, path string
		want          bool
	}{
		{"ex/agent/...", "ex/agent", true},
		{"ex/agent/...", "ex/agent/store", true},
		{"ex/agent/...", "ex/agentx", false},
		{"ex/agent", "ex/agent/store", false},
		{"testing", "testing", true},
		{"testing", "testing/fstest", false},
	}
	for _, tt := range tests {
		if got := depcheck.Match(tt.pattern, tt.path); got != tt.want {
			t.Errorf("Match(%q, %q) = %v, want %v", tt.pattern, tt.path, got, tt.want)
		}
	}
}
