package hostconfig

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// markerPrefix starts the first line of every file Shoal writes. The state in parentheses
// after it records what Remove has to do.
const markerPrefix = "# Managed by Shoal"

const (
	stateMerged  = "merged"   // the user's file is in hosts.toml.shoal-backup: restore it
	stateNewFile = "new-file" // Shoal created hosts.toml in an existing directory: delete it
	stateNewDir  = "new-dir"  // Shoal created the directory too: delete both
)

func header(state string) string {
	h := markerPrefix + " (" + state + "). Edits are overwritten; `shoal cleanup` undoes Shoal's changes.\n"
	if state == stateMerged {
		h += "# The original file, merged below, is kept unchanged in " + backupFile + ".\n"
	}
	return h
}

// parseMarker reports whether content is a file Shoal wrote, and with which state.
func parseMarker(content []byte) (state string, ours bool) {
	line, _, _ := bytes.Cut(content, []byte("\n"))
	rest, ok := strings.CutPrefix(string(line), markerPrefix)
	if !ok {
		return "", false
	}
	if s, ok := strings.CutPrefix(rest, " ("); ok {
		if state, _, ok := strings.Cut(s, ")"); ok {
			return state, true
		}
	}
	return "", true
}

func mirrorBlock(mirrorURL string, dialTimeout time.Duration) string {
	return "# The Shoal agent on this node, tried first. When it is down or answers with an error,\n" +
		"# containerd moves on to the next host.\n" +
		"[host." + quote(mirrorURL) + "]\n" +
		"  capabilities = [\"pull\", \"resolve\"]\n" +
		"  dial_timeout = " + quote(dialTimeout.String()) + "\n"
}

// renderNew is the file for a registry that has no hosts.toml of its own: the mirror, then the
// upstream both as a [host] table and as the server. upstream is "" for _default, where
// containerd puts the registry named in the image reference last.
func renderNew(state, mirrorURL string, dialTimeout time.Duration, upstream string, certs certFiles) ([]byte, error) {
	var b strings.Builder
	b.WriteString(header(state))
	if upstream != "" {
		b.WriteString("server = " + quote(upstream) + "\n")
	} else {
		b.WriteString("# No server: after the hosts below, containerd pulls from the registry named in the image.\n")
	}
	certs.write(&b, "")
	b.WriteString("\n" + mirrorBlock(mirrorURL, dialTimeout))
	want := []string{mirrorURL}
	if upstream != "" {
		b.WriteString("\n# The upstream registry.\n[host." + quote(upstream) + "]\n  capabilities = [\"pull\", \"resolve\"]\n")
		certs.write(&b, "  ")
		want = append(want, upstream)
	}
	out := []byte(b.String())
	if err := checkHosts(out, want); err != nil {
		return nil, err
	}
	return out, nil
}

// renderMerged is the user's file with the mirror's [host] table inserted ahead of the user's
// first table. The user's text is kept verbatim, so their top-level keys (server, ca, ...) and
// host tables keep their meaning, and their hosts keep their order after the mirror.
func renderMerged(state, mirrorURL string, dialTimeout time.Duration, original []byte) ([]byte, error) {
	original = bytes.TrimPrefix(original, []byte("\uFEFF")) // a BOM is valid only at the very start
	lay, err := parseLayout(original)
	if err != nil {
		return nil, err
	}
	if slices.Contains(lay.hosts, mirrorURL) {
		return nil, fmt.Errorf("it already has a [host.%s] table; remove that table so Shoal can put the mirror first", quote(mirrorURL))
	}
	preamble, rest := original[:lay.insertAt], original[lay.insertAt:]
	var b bytes.Buffer
	b.WriteString(header(state))
	b.Write(preamble)
	if len(preamble) > 0 && !bytes.HasSuffix(preamble, []byte("\n")) {
		b.WriteString("\n")
	}
	if len(preamble) > 0 && !bytes.HasSuffix(preamble, []byte("\n\n")) && !bytes.HasSuffix(preamble, []byte("\n\r\n")) {
		b.WriteString("\n") // a blank line before the mirror's comment
	}
	b.WriteString(mirrorBlock(mirrorURL, dialTimeout))
	if len(rest) > 0 {
		b.WriteString("\n")
		b.Write(rest)
	}
	out := b.Bytes()
	if err := checkHosts(out, append([]string{mirrorURL}, lay.hosts...)); err != nil {
		return nil, err
	}
	return out, nil
}

// checkHosts guards against writing a file containerd would read differently than intended.
func checkHosts(content []byte, want []string) error {
	lay, err := parseLayout(content)
	if err != nil {
		return fmt.Errorf("the result is not a valid hosts.toml: %w", err)
	}
	if !slices.Equal(lay.hosts, want) {
		return fmt.Errorf("the result would list hosts %q instead of %q", lay.hosts, want)
	}
	return nil
}

// layout is what a merge needs to know about a hosts.toml.
type layout struct {
	hosts    []string // keys of the [host."..."] tables, in file order (containerd's order)
	insertAt int      // where a table goes ahead of all others: the first table header, or the comments right above it
}

// parseLayout validates a hosts.toml and finds its host tables and first table header.
func parseLayout(b []byte) (layout, error) {
	var doc map[string]any
	if err := toml.Unmarshal(b, &doc); err != nil {
		return layout{}, fmt.Errorf("not valid TOML: %w", err)
	}
	lay := layout{insertAt: len(b)}
	p := unstable.Parser{KeepComments: true}
	p.Reset(b)
	seenTable := false
	commentsFrom, prevEnd := -1, 0 // the run of comment lines just above the next expression
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Comment:
			start := int(e.Raw.Offset)
			if commentsFrom < 0 || hasBlankLine(b[prevEnd:start]) {
				commentsFrom = lineStart(b, start)
			}
			prevEnd = start + int(e.Raw.Length)
		case unstable.KeyValue:
			if !seenTable && keyOf(e)[0] == "host" {
				return layout{}, errors.New("hosts defined by top-level dotted keys or an inline table are not supported; write them as [host.\"...\"] tables")
			}
			commentsFrom = -1
		case unstable.Table, unstable.ArrayTable:
			key := keyOf(e)
			start := lineStart(b, int(e.Child().Raw.Offset))
			if !seenTable {
				seenTable = true
				lay.insertAt = start
				if commentsFrom >= 0 && !hasBlankLine(b[prevEnd:start]) {
					lay.insertAt = commentsFrom // keep the user's comments with their table
				}
			}
			commentsFrom = -1
			if key[0] != "host" {
				continue
			}
			if e.Kind == unstable.ArrayTable || len(key) == 1 {
				return layout{}, errors.New("a [host] or [[host]] table is not supported; write hosts as [host.\"...\"] tables")
			}
			if !slices.Contains(lay.hosts, key[1]) {
				lay.hosts = append(lay.hosts, key[1])
			}
		}
	}
	if err := p.Error(); err != nil {
		return layout{}, fmt.Errorf("not valid TOML: %w", err)
	}
	return lay, nil
}

func keyOf(e *unstable.Node) []string {
	var key []string
	it := e.Key()
	for it.Next() {
		key = append(key, string(it.Node().Data))
	}
	return key
}

func lineStart(b []byte, offset int) int {
	return bytes.LastIndexByte(b[:offset], '\n') + 1
}

// hasBlankLine reports whether the text between the end of one line's content and the start
// of a later line contains an empty line.
func hasBlankLine(between []byte) bool {
	return bytes.Count(between, []byte("\n")) >= 2
}

// quote returns s as a TOML basic string.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, "\\u%04X", r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// checkURL validates a URL written into hosts.toml: http or https, a host, and nothing that
// containerd would not use (user info, query, fragment).
func checkURL(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", err
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return "", fmt.Errorf("%q: scheme must be http or https", raw)
	case u.Host == "":
		return "", fmt.Errorf("%q: no host", raw)
	case u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "":
		return "", fmt.Errorf("%q: user info, query and fragment are not allowed", raw)
	}
	return raw, nil
}

// certFiles are Docker-style certificate files in a registry directory. containerd uses them
// only while the directory has no hosts.toml, so a hosts.toml Shoal adds must name them.
type certFiles struct {
	cas     []string    // *.crt: CA certificates
	clients [][2]string // *.cert with its *.key: client certificates
}

// findCertFiles lists them as containerd 1.6 does (loadCertFiles), by name relative to regDir,
// which is how containerd resolves relative paths in hosts.toml.
func findCertFiles(regDir string) (certFiles, error) {
	var c certFiles
	entries, err := os.ReadDir(regDir)
	if errors.Is(err, fs.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return c, err
	}
	names := map[string]bool{}
	for _, e := range entries {
		names[e.Name()] = !e.IsDir()
	}
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || (!strings.HasSuffix(name, ".crt") && !strings.HasSuffix(name, ".cert")) {
			continue
		}
		if !utf8.ValidString(name) {
			return c, fmt.Errorf("certificate file name %q in %s is not UTF-8 and cannot be named in hosts.toml", name, regDir)
		}
		if base, ok := strings.CutSuffix(name, ".cert"); ok {
			key := base + ".key"
			if !names[key] {
				key = name // the key is in the certificate file, as containerd then assumes
			}
			c.clients = append(c.clients, [2]string{name, key})
		} else {
			c.cas = append(c.cas, name)
		}
	}
	return c, nil
}

func (c certFiles) write(b *strings.Builder, indent string) {
	if len(c.cas) > 0 {
		quoted := make([]string, len(c.cas))
		for i, f := range c.cas {
			quoted[i] = quote(f)
		}
		b.WriteString(indent + "ca = [" + strings.Join(quoted, ", ") + "]\n")
	}
	if len(c.clients) > 0 {
		pairs := make([]string, len(c.clients))
		for i, p := range c.clients {
			pairs[i] = "[" + quote(p[0]) + ", " + quote(p[1]) + "]"
		}
		b.WriteString(indent + "client = [" + strings.Join(pairs, ", ") + "]\n")
	}
}
