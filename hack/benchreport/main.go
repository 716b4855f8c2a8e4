// Command benchreport turns `go test -bench` output into the figures of docs/benchmarks.md: it
// reads benchmark lines on stdin, derives the ratios the project tracks, and replaces the text
// between the markers of one section of the Markdown file, leaving the rest of the file alone.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// result is one benchmark line: its name (without the -GOMAXPROCS suffix) and its metrics by unit.
type result struct {
	name    string
	metrics map[string]float64
}

var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+(\d+)\s+(.*)$`)

func parse(r io.Reader) (map[string]result, []string, error) {
	results := map[string]result{}
	var context []string
	scanner := bufio.NewScanner(r)
	for scanner.Scan() {
		line := scanner.Text()
		for _, key := range []string{"goos:", "goarch:", "cpu:"} {
			if strings.HasPrefix(line, key) && !contains(context, line) {
				context = append(context, line)
			}
		}
		m := benchLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		res := result{name: m[1], metrics: map[string]float64{}}
		fields := strings.Fields(m[3])
		for i := 0; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				continue
			}
			res.metrics[fields[i+1]] = v
		}
		results[res.name] = res // the last run of a name wins
	}
	return results, context, scanner.Err()
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// ratio describes a derived figure: numerator over denominator of one metric, with a target.
type ratio struct {
	label, numerator, denominator, metric, target string
}

var ratios = []ratio{
	{"warm hit, 1 GiB blob from disk: mirror / direct file read", "BenchmarkWarmBlob/disk/mirror", "BenchmarkWarmBlob/disk/direct", "MB/s", "≥ 0.9"},
	{"warm hit, 1 GiB blob in the page cache: mirror / direct file read", "BenchmarkWarmBlob/cached/mirror", "BenchmarkWarmBlob/cached/direct", "MB/s", "report"},
	{"cold pull-through / direct from the registry", "BenchmarkColdPull/mirror", "BenchmarkColdPull/direct", "MB/s", "report"},
}

func render(results map[string]result, context []string) string {
	var b strings.Builder
	if len(context) > 0 {
		fmt.Fprintf(&b, "Machine: %s\n\n", strings.Join(context, ", "))
	}
	b.WriteString("| figure | value | target |\n| --- | --- | --- |\n")
	for _, r := range ratios {
		num, okN := results[r.numerator].metrics[r.metric]
		den, okD := results[r.denominator].metrics[r.metric]
		if !okN || !okD || den == 0 {
			fmt.Fprintf(&b, "| %s | not measured | %s |\n", r.label, r.target)
			continue
		}
		fmt.Fprintf(&b, "| %s | **%.2f** (%.0f vs %.0f MB/s) | %s |\n", r.label, num/den, num, den, r.target)
	}
	names := make([]string, 0, len(results))
	for name := range results {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		for unit, v := range results[name].metrics {
			if strings.HasPrefix(unit, "peak-RSS-MiB") {
				fmt.Fprintf(&b, "| agent peak RSS, %s | **%.0f MiB** | ≤ 100 MiB |\n", strings.TrimPrefix(name, "Benchmark"), v)
			}
		}
	}
	b.WriteString("\nAll benchmark lines:\n\n| benchmark | metrics |\n| --- | --- |\n")
	for _, name := range names {
		units := make([]string, 0, len(results[name].metrics))
		for unit := range results[name].metrics {
			units = append(units, unit)
		}
		sort.Strings(units)
		parts := make([]string, 0, len(units))
		for _, unit := range units {
			parts = append(parts, fmt.Sprintf("%.4g %s", results[name].metrics[unit], unit))
		}
		fmt.Fprintf(&b, "| %s | %s |\n", name, strings.Join(parts, ", "))
	}
	return b.String()
}

func replaceSection(doc []byte, section, body string) ([]byte, error) {
	begin := []byte("<!-- BEGIN " + section + " -->\n")
	end := []byte("<!-- END " + section + " -->")
	i := bytes.Index(doc, begin)
	j := bytes.Index(doc, end)
	if i < 0 || j < i {
		return nil, fmt.Errorf("markers for section %q not found", section)
	}
	var out bytes.Buffer
	out.Write(doc[:i+len(begin)])
	out.WriteString(body)
	out.Write(doc[j:])
	return out.Bytes(), nil
}

func main() {
	doc := flag.String("doc", "docs/benchmarks.md", "Markdown file to update")
	section := flag.String("section", "mirror", "name of the section between <!-- BEGIN name --> and <!-- END name -->")
	flag.Parse()
	results, context, err := parse(os.Stdin)
	if err == nil && len(results) == 0 {
		err = errors.New("no benchmark lines on stdin")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
	body := render(results, context)
	fmt.Print(body)
	old, err := os.ReadFile(*doc)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
	updated, err := replaceSection(old, *section, body)
	if err == nil {
		err = os.WriteFile(*doc, updated, 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
}
