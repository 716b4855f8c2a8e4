// Package depcheck checks package dependency rules: which packages of the module may import
// which. The rules themselves are a table in this package's test, which make unit runs, so the
// layering cannot rot silently (go-containerregistry's internal/depcheck is the model).
//
// The import graph comes from `go list -deps -json`, so checking needs the go command and no
// dependency beyond the standard library.
package depcheck

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"slices"
	"strings"
)

// Package is one node of the import graph, as `go list -json` describes it.
type Package struct {
	ImportPath string
	Name       string
	// Imports are the imports of the package's non-test files; TestImports and XTestImports
	// those of its _test.go files in the package and in package <name>_test.
	Imports      []string
	TestImports  []string
	XTestImports []string
	Error        *struct{ Err string }
}

// Graph is an import graph: packages by import path. Loaded with -deps, it holds every
// package the listed ones depend on, so dependencies can be followed to the standard library.
type Graph map[string]*Package

// Load lists the packages matching patterns, and every package they depend on, with
// `go list -e -deps -json` run in dir (a directory inside the module). A package that cannot
// be loaded is an error: its imports, and so the rules, cannot be checked.
func Load(ctx context.Context, dir string, patterns ...string) (Graph, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return nil, fmt.Errorf("list packages: the go command is needed: %w", err)
	}
	args := append([]string{"list", "-e", "-deps",
		"-json=ImportPath,Name,Imports,TestImports,XTestImports,Error"}, patterns...)
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, stderr.Bytes())
	}
	g := Graph{}
	var loadErrs []error
	for dec := json.NewDecoder(bytes.NewReader(out)); ; {
		var p Package
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return nil, fmt.Errorf("read go list output: %w", err)
		}
		if p.Error != nil {
			loadErrs = append(loadErrs, fmt.Errorf("%s: %s", p.ImportPath, p.Error.Err))
		}
		g[p.ImportPath] = &p
	}
	if len(loadErrs) > 0 {
		return nil, fmt.Errorf("load packages: %w", errors.Join(loadErrs...))
	}
	return g, nil
}

// A Rule says what a set of packages must not import. Package sets are patterns: an import
// path, or a path ending in "/..." for that package and every package below it
// ("example.com/m/agent/..." matches example.com/m/agent and example.com/m/agent/store).
type Rule struct {
	// Why is the reason for the rule, printed with every violation.
	Why string
	// Packages are the packages the rule applies to; each pattern must match at least one
	// package, so that a rule cannot go stale silently when a package moves.
	Packages []string
	// Except exempts packages from Packages; these patterns may match nothing.
	Except []string
	// Commands restricts the rule to the main packages among Packages.
	Commands bool
	// MustNotImport are packages that the rule's packages must not import directly (the
	// imports of their non-test files, and with Tests also of their _test.go files).
	MustNotImport []string
	// Tests extends MustNotImport to the packages' _test.go files.
	Tests bool
	// MustNotDependOn are packages that the rule's packages must not depend on at all,
	// directly or through other packages: what a binary built from them would link.
	MustNotDependOn []string
}

// A Violation is one package breaking one rule.
type Violation struct {
	Rule *Rule
	// Package broke the rule by depending on Forbidden; Path is the chain of imports from
	// Package to Forbidden, both included.
	Package, Forbidden string
	Path               []string
	// InTests says that the import is in the package's _test.go files.
	InTests bool
}

func (v Violation) String() string {
	what := "imports"
	if v.InTests {
		what = "imports in its tests"
	}
	if len(v.Path) > 2 {
		what = "depends on"
	}
	s := fmt.Sprintf("%s %s %s", v.Package, what, v.Forbidden)
	if len(v.Path) > 2 {
		s += " (" + strings.Join(v.Path, " -> ") + ")"
	}
	return s + ": " + v.Rule.Why
}

// Check returns every violation of rules in g, in a stable order, and an error for a rule
// whose Packages patterns match no package of g.
func Check(g Graph, rules []Rule) ([]Violation, error) {
	paths := make([]string, 0, len(g))
	for path := range g {
		paths = append(paths, path)
	}
	slices.Sort(paths)
	var stale []error
	var violations []Violation
	for i := range rules {
		r := &rules[i]
		for _, pattern := range r.Packages {
			if !slices.ContainsFunc(paths, func(p string) bool { return Match(pattern, p) }) {
				stale = append(stale, fmt.Errorf("rule %q: pattern %s matches no package: update the rule", r.Why, pattern))
			}
		}
		for _, path := range paths {
			p := g[path]
			if !matchAny(r.Packages, path) || matchAny(r.Except, path) || (r.Commands && p.Name != "main") {
				continue
			}
			violations = append(violations, r.check(g, p)...)
		}
	}
	return violations, errors.Join(stale...)
}

func (r *Rule) check(g Graph, p *Package) []Violation {
	var vs []Violation
	direct := func(imports []string, inTests bool) {
		for _, imp := range imports {
			if matchAny(r.MustNotImport, imp) {
				vs = append(vs, Violation{Rule: r, Package: p.ImportPath, Forbidden: imp, Path: []string{p.ImportPath, imp}, InTests: inTests})
			}
		}
	}
	direct(p.Imports, false)
	if r.Tests {
		direct(p.TestImports, true)
		direct(p.XTestImports, true)
	}
	if len(r.MustNotDependOn) > 0 {
		for _, path := range forbiddenPaths(g, p.ImportPath, r.MustNotDependOn) {
			vs = append(vs, Violation{Rule: r, Package: p.ImportPath, Forbidden: path[len(path)-1], Path: path})
		}
	}
	return vs
}

// forbiddenPaths walks the imports of from's non-test files breadth first and returns, for
// every forbidden package it reaches, the shortest import chain from from to it. It does not
// walk on through a forbidden package: what that one imports is part of the same mistake.
func forbiddenPaths(g Graph, from string, forbidden []string) [][]string {
	parent := map[string]string{from: ""}
	queue := []string{from}
	var found [][]string
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		p, ok := g[cur]
		if !ok {
			continue
		}
		for _, imp := range p.Imports {
			if _, seen := parent[imp]; seen {
				continue
			}
			parent[imp] = cur
			if !matchAny(forbidden, imp) {
				queue = append(queue, imp)
				continue
			}
			var path []string
			for at := imp; at != ""; at = parent[at] {
				path = append(path, at)
			}
			slices.Reverse(path)
			found = append(found, path)
		}
	}
	return found
}

// Match reports whether the import path matches pattern: equal to it, or, for a pattern
// ending in "/...", equal to or below the path before that suffix.
func Match(pattern, path string) bool {
	if base, ok := strings.CutSuffix(pattern, "/..."); ok {
		return path == base || strings.HasPrefix(path, base+"/")
	}
	return path == pattern
}

func matchAny(patterns []string, path string) bool {
	return slices.ContainsFunc(patterns, func(pattern string) bool { return Match(pattern, path) })
}
