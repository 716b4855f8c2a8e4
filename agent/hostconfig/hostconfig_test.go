package hostconfig

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const mirrorBlockText = `# The Shoal agent on this node, tried first. When it is down or answers with an error,
# containerd moves on to the next host.
[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]
  dial_timeout = "200ms"
`

func TestWriteNewFiles(t *testing.T) {
	tests := []struct {
		name      string
		registry  string
		upstream  string
		timeout   time.Duration
		wantDir   string
		wantFile  string
		lookup    string   // registry containerd resolves
		wantHosts []string // as containerd 1.6.20 reads the file
	}{
		{
			name:     "docker.io defaults to registry-1",
			registry: "docker.io",
			wantDir:  "docker.io",
			wantFile: "# Managed by Shoal (new-dir). Edits are overwritten; `shoal cleanup` undoes Shoal's changes.\n" +
				"server = \"https://registry-1.docker.io\"\n\n" + mirrorBlockText + "\n" +
				"# The upstream registry.\n[host.\"https://registry-1.docker.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
			lookup: "docker.io",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://registry-1.docker.io/v2 pull,resolve",
				"https://registry-1.docker.io/v2 pull,resolve,push",
			},
		},
		{
			name:     "upstream override",
			registry: "registry.test",
			upstream: "http://127.0.0.1:5000",
			wantDir:  "registry.test",
			wantFile: "# Managed by Shoal (new-dir). Edits are overwritten; `shoal cleanup` undoes Shoal's changes.\n" +
				"server = \"http://127.0.0.1:5000\"\n\n" + mirrorBlockText + "\n" +
				"# The upstream registry.\n[host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
			lookup: "registry.test",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"http://127.0.0.1:5000/v2 pull,resolve",
				"http://127.0.0.1:5000/v2 pull,resolve,push",
			},
		},
		{
			name:     "upstream without scheme means https",
			registry: "registry.test",
			upstream: "mirror.corp.test:8443",
			wantDir:  "registry.test",
			lookup:   "registry.test",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://mirror.corp.test:8443/v2 pull,resolve",
				"https://mirror.corp.test:8443/v2 pull,resolve,push",
			},
		},
		{
			name:     "host:port keeps its directory name",
			registry: "registry.test:5000",
			wantDir:  "registry.test:5000",
			lookup:   "registry.test:5000",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://registry.test:5000/v2 pull,resolve",
				"https://registry.test:5000/v2 pull,resolve,push",
			},
		},
		{
			name:     "localhost defaults to http like containerd",
			registry: "localhost:5000",
			wantDir:  "localhost:5000",
			lookup:   "localhost:5000",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"http://localhost:5000/v2 pull,resolve",
				"http://localhost:5000/v2 pull,resolve,push",
			},
		},
		{
			name:     "catch-all has no server: containerd falls back to the registry itself",
			registry: "*",
			wantDir:  "_default",
			wantFile: "# Managed by Shoal (new-dir). Edits are overwritten; `shoal cleanup` undoes Shoal's changes.\n" +
				"# No server: after the hosts below, containerd pulls from the registry named in the image.\n\n" + mirrorBlockText,
			lookup: "ghcr.io",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://ghcr.io/v2 pull,resolve,push",
			},
		},
		{
			name:     "catch-all for docker.io",
			registry: "*",
			wantDir:  "_default",
			lookup:   "docker.io",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://registry-1.docker.io/v2 pull,resolve,push",
			},
		},
		{
			name:     "custom dial timeout",
			registry: "registry.test",
			timeout:  1500 * time.Millisecond,
			wantDir:  "registry.test",
			wantFile: "# Managed by Shoal (new-dir). Edits are overwritten; `shoal cleanup` undoes Shoal's changes.\n" +
				"server = \"https://registry.test\"\n\n" + strings.Replace(mirrorBlockText, "200ms", "1.5s", 1) + "\n" +
				"# The upstream registry.\n[host.\"https://registry.test\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
			lookup: "registry.test",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://registry.test/v2 pull,resolve",
				"https://registry.test/v2 pull,resolve,push",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := Config{
				Dir:         dir,
				MirrorURL:   testMirror,
				Registries:  []string{tt.registry},
				Upstream:    func(string) string { return tt.upstream },
				DialTimeout: tt.timeout,
			}
			if err := Write(cfg); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, tt.wantDir, "hosts.toml")
			got := readFile(t, path)
			if tt.wantFile != "" && got != tt.wantFile {
				t.Errorf("hosts.toml:\n%s\nwant:\n%s", got, tt.wantFile)
			}
			if hosts := hostList(containerdHosts(t, dir, tt.lookup)); !slices.Equal(hosts, tt.wantHosts) {
				t.Errorf("containerd reads hosts %q, want %q", hosts, tt.wantHosts)
			}
			for p, want := range map[string]os.FileMode{path: 0o644, filepath.Dir(path): 0o755 | os.ModeDir} {
				if info, err := os.Stat(p); err != nil || info.Mode() != want {
					t.Errorf("%s: mode %v (err %v), want %v", p, info.Mode(), err, want)
				}
			}
			if _, err := os.Stat(filepath.Join(dir, tt.wantDir, backupFile)); !os.IsNotExist(err) {
				t.Errorf("a backup was made although there was no user file: %v", err)
			}
		})
	}
}

func TestWriteIsIdempotent(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "user.test", "hosts.toml"), "server = \"https://user.test\"\n\n[host.\"https://a.test\"]\n", 0o644)
	cfg := Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"docker.io", "user.test", "*", "docker.io"}}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	first := snapshot(t, dir)
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	if second := snapshot(t, dir); !mapsEqual(first, second) {
		t.Errorf("second Write changed files:\nfirst  %q\nsecond %q", first, second)
	}
	if len(first) != 4 { // docker.io, _default, user.test and its backup
		t.Errorf("files after Write: %q", first)
	}
}

func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	files := map[string]string{}
	for _, rel := range listTree(t, dir) {
		p := filepath.Join(dir, rel)
		if info, err := os.Stat(p); err == nil && !info.IsDir() {
			files[rel] = readFile(t, p)
		}
	}
	return files
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// userFile exercises every top-level setting and per-host settings containerd knows, with
// comments, so the merge can be checked to keep them all.
const userFile = `# Corporate registry settings, maintained by the platform team.
server = "https://registry.corp.test"
ca = "corp.crt"
skip_verify = false

[header]
  x-corp-server = "yes"

# Primary pull-through cache.
[host."https://cache-a.corp.test"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  [host."https://cache-a.corp.test".header]
    x-corp-cache = "a"

[host."https://cache-b.corp.test:8443/prefix"]
  capabilities = ["pull"]
  ca = ["corp.crt"]
  client = [["corp.cert", "corp.key"]]
  override_path = true
`

func TestMergeKeepsUserSettingsAndOrder(t *testing.T) {
	dir := t.TempDir()
	regDir := filepath.Join(dir, "registry.corp.test")
	writeCertFiles(t, regDir, "corp")
	hostsPath := filepath.Join(regDir, "hosts.toml")
	writeFile(t, hostsPath, userFile, 0o600)
	before := hostList(containerdHosts(t, dir, "registry.corp.test"))

	cfg := Config{
		Dir: dir, MirrorURL: testMirror, Registries: []string{"registry.corp.test"},
		Upstream: func(string) string { return "http://127.0.0.1:5999" }, // not used: the user's file decides the fallback
	}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}

	merged := readFile(t, hostsPath)
	if !strings.HasPrefix(merged, "# Managed by Shoal (merged)") {
		t.Errorf("no marker on the first line:\n%s", merged)
	}
	// The user's text is kept verbatim: top-level keys, then the mirror, then everything else.
	preamble, rest, _ := strings.Cut(userFile, "[header]\n")
	rest = "[header]\n" + rest
	if !strings.Contains(merged, preamble+mirrorBlockText+"\n"+rest) {
		t.Errorf("merged file does not keep the user's text around the mirror table:\n%s", merged)
	}
	if strings.Contains(merged, "5999") {
		t.Error("the merged file lists Shoal's upstream instead of keeping the user's")
	}
	if got := readFile(t, filepath.Join(regDir, backupFile)); got != userFile {
		t.Errorf("backup differs from the user's file:\n%s", got)
	}

	hosts := containerdHosts(t, dir, "registry.corp.test")
	want := append([]string{"http://127.0.0.1:5001/v2 pull,resolve"}, before...)
	if got := hostList(hosts); !slices.Equal(got, want) {
		t.Fatalf("containerd reads hosts %q, want the mirror then the user's %q", got, before)
	}
	wantBefore := []string{
		"https://cache-a.corp.test/v2 pull,resolve",
		"https://cache-b.corp.test:8443/prefix pull",
		"https://registry.corp.test/v2 pull,resolve,push",
	}
	if !slices.Equal(before, wantBefore) {
		t.Fatalf("test setup: containerd read the user's file as %q, want %q", before, wantBefore)
	}
	// Per-host settings survive the merge.
	if _, _, skip := tlsConfigOf(t, hosts[1]); !skip || hosts[1].Header["x-corp-cache"][0] != "a" { //nolint:staticcheck // containerd keeps header names as written in hosts.toml
		t.Errorf("cache-a lost skip_verify or its header: skip=%v header=%v", skip, hosts[1].Header)
	}
	if roots, certs, _ := tlsConfigOf(t, hosts[2]); !roots || certs != 1 {
		t.Errorf("cache-b lost its ca or client pair: roots=%v certs=%d", roots, certs)
	}
	if roots, _, _ := tlsConfigOf(t, hosts[3]); !roots || hosts[3].Header["x-corp-server"][0] != "yes" { //nolint:staticcheck // containerd keeps header names as written in hosts.toml
		t.Errorf("the server lost its ca or header: roots=%v header=%v", roots, hosts[3].Header)
	}

	server, err := ExistingServer(dir, "registry.corp.test")
	if err != nil || server != "https://registry.corp.test" {
		t.Errorf("ExistingServer = %q, %v; want the user's server", server, err)
	}

	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, hostsPath); got != userFile {
		t.Errorf("Remove did not restore the user's file:\n%s", got)
	}
	if info, err := os.Stat(hostsPath); err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("restored file mode %v (err %v), want 0600", info.Mode(), err)
	}
	assertMissing(t, filepath.Join(regDir, backupFile))
	for _, name := range []string{"corp.crt", "corp.cert", "corp.key"} {
		if _, err := os.Stat(filepath.Join(regDir, name)); err != nil {
			t.Errorf("Remove touched the user's %s: %v", name, err)
		}
	}
}

func TestMergeVariants(t *testing.T) {
	tests := []struct {
		name      string
		user      string
		wantHosts []string // containerd's order for registry.test after the merge
		wantText  string   // expected merged file after the marker lines, if set
	}{
		{
			name: "server only: invalid for containerd 1.6 alone, valid once merged",
			user: "server = \"https://upstream.test\"\n",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://upstream.test/v2 pull,resolve,push",
			},
			wantText: "server = \"https://upstream.test\"\n\n" + mirrorBlockText,
		},
		{
			name: "no trailing newline",
			user: "server = \"https://upstream.test\"",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://upstream.test/v2 pull,resolve,push",
			},
			wantText: "server = \"https://upstream.test\"\n\n" + mirrorBlockText,
		},
		{
			name: "hosts only, comment stays with its table",
			user: "# upstream cache\n[host.\"https://a.test\"]\n",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://a.test/v2 pull,resolve,push",
				"https://registry.test/v2 pull,resolve,push",
			},
			wantText: mirrorBlockText + "\n# upstream cache\n[host.\"https://a.test\"]\n",
		},
		{
			name: "comment separated by a blank line stays on top",
			user: "# file header\n\n[host.\"https://a.test\"]\n",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://a.test/v2 pull,resolve,push",
				"https://registry.test/v2 pull,resolve,push",
			},
			wantText: "# file header\n\n" + mirrorBlockText + "\n[host.\"https://a.test\"]\n",
		},
		{
			name: "multi-line values that look like tables",
			user: "server = \"https://upstream.test\"\nx-array = [\n  [\"a\", \"b\"],\n]\nx = '''\n[host.\"https://fake.test\"]\n'''\n[host.'https://b.test']\n[host.\"https://a.test\"]\n",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://b.test/v2 pull,resolve,push",
				"https://a.test/v2 pull,resolve,push",
				"https://upstream.test/v2 pull,resolve,push",
			},
		},
		{
			name: "CRLF line endings and a BOM",
			user: "\uFEFFserver = \"https://upstream.test\"\r\n\r\n[host.\"https://a.test\"]\r\n  capabilities = [\"pull\"]\r\n",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://a.test/v2 pull",
				"https://upstream.test/v2 pull,resolve,push",
			},
		},
		{
			name: "empty file: containerd treats it as absent, so Shoal writes the full form",
			user: "",
			wantHosts: []string{
				"http://127.0.0.1:5001/v2 pull,resolve",
				"https://registry.test/v2 pull,resolve",
				"https://registry.test/v2 pull,resolve,push",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			hostsPath := filepath.Join(dir, "registry.test", "hosts.toml")
			writeFile(t, hostsPath, tt.user, 0o644)
			if err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"registry.test"}}); err != nil {
				t.Fatal(err)
			}
			merged := readFile(t, hostsPath)
			if got := hostList(containerdHosts(t, dir, "registry.test")); !slices.Equal(got, tt.wantHosts) {
				t.Errorf("containerd reads hosts %q, want %q\nfile:\n%s", got, tt.wantHosts, merged)
			}
			if tt.wantText != "" {
				body := strings.SplitN(merged, "\n", 3)[2] // after the two marker lines
				if body != tt.wantText {
					t.Errorf("merged file body:\n%s\nwant:\n%s", body, tt.wantText)
				}
			}
			if err := Remove(dir); err != nil {
				t.Fatal(err)
			}
			if got := readFile(t, hostsPath); got != tt.user {
				t.Errorf("after Remove: %q, want the user's %q", got, tt.user)
			}
			assertMissing(t, filepath.Join(dir, "registry.test", backupFile))
		})
	}
}

func TestMergeRefusesWhatItCannotMergeSafely(t *testing.T) {
	tests := []struct{ name, user, wantErr string }{
		{"invalid TOML", "server = \n", "not valid TOML"},
		{"duplicate table", "[host.\"https://a.test\"]\n[host.\"https://a.test\"]\n", "not valid TOML"},
		{"dotted host keys", "host.\"https://a.test\".capabilities = [\"pull\"]\n", "dotted keys"},
		{"inline host table", "host = { \"https://a.test\" = { capabilities = [\"pull\"] } }\n", "inline table"},
		{"bare [host] table", "[host]\n\"https://a.test\" = { capabilities = [\"pull\"] }\n", "[host]"},
		{"mirror already listed", "[host.\"https://a.test\"]\n[host.'http://127.0.0.1:5001']\n", "already has"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, filepath.Join(dir, "registry.test", "hosts.toml"), tt.user, 0o644)
			writeFile(t, filepath.Join(dir, "ok.test", "keep"), "", 0o644)
			err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"registry.test", "other.test"}})
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "registry.test") {
				t.Fatalf("Write error = %v, want one about registry.test containing %q", err, tt.wantErr)
			}
			if got := readFile(t, filepath.Join(dir, "registry.test", "hosts.toml")); got != tt.user {
				t.Errorf("the user's file was changed to:\n%s", got)
			}
			assertMissing(t, filepath.Join(dir, "registry.test", backupFile))
			if _, err := os.Stat(filepath.Join(dir, "other.test", "hosts.toml")); err != nil {
				t.Errorf("one bad registry stopped the others: %v", err)
			}
		})
	}
}

func TestUserReplacesMergedFile(t *testing.T) {
	dir := t.TempDir()
	hostsPath := filepath.Join(dir, "registry.test", "hosts.toml")
	writeFile(t, hostsPath, "[host.\"https://old.test\"]\n", 0o644)
	cfg := Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"registry.test"}}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	// Configuration management puts its current version back while Shoal runs.
	newer := "[host.\"https://new.test\"]\n"
	writeFile(t, hostsPath, newer, 0o644)
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	want := []string{"http://127.0.0.1:5001/v2 pull,resolve", "https://new.test/v2 pull,resolve,push", "https://registry.test/v2 pull,resolve,push"}
	if got := hostList(containerdHosts(t, dir, "registry.test")); !slices.Equal(got, want) {
		t.Errorf("containerd reads %q, want %q", got, want)
	}
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, hostsPath); got != newer {
		t.Errorf("Remove restored %q, want the user's latest %q", got, newer)
	}
}

func TestMirrorChangeRewritesFromTheBackup(t *testing.T) {
	dir := t.TempDir()
	hostsPath := filepath.Join(dir, "registry.test", "hosts.toml")
	user := "server = \"https://upstream.test\"\n"
	writeFile(t, hostsPath, user, 0o644)
	for _, mirror := range []string{testMirror, "http://127.0.0.1:6001"} {
		if err := Write(Config{Dir: dir, MirrorURL: mirror, Registries: []string{"registry.test"}}); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{"http://127.0.0.1:6001/v2 pull,resolve", "https://upstream.test/v2 pull,resolve,push"}
	if got := hostList(containerdHosts(t, dir, "registry.test")); !slices.Equal(got, want) {
		t.Errorf("containerd reads %q, want only the new mirror before the user's server: %q", got, want)
	}
	if got := readFile(t, filepath.Join(dir, "registry.test", backupFile)); got != user {
		t.Errorf("backup is %q, want the user's original", got)
	}
}

func TestSymlinkedUserFileIsRestored(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(t.TempDir(), "managed-hosts.toml")
	user := "server = \"https://upstream.test\"\n"
	writeFile(t, target, user, 0o644)
	regDir := filepath.Join(dir, "registry.test")
	if err := os.MkdirAll(regDir, 0o755); err != nil {
		t.Fatal(err)
	}
	hostsPath := filepath.Join(regDir, "hosts.toml")
	if err := os.Symlink(target, hostsPath); err != nil {
		t.Fatal(err)
	}
	if err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"registry.test"}}); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, target); got != user {
		t.Errorf("Write changed the symlink's target: %q", got)
	}
	if err := Remove(dir); err != nil {
		t.Fatal(err)
	}
	if link, err := os.Readlink(hostsPath); err != nil || link != target {
		t.Errorf("hosts.toml after Remove: link %q, err %v; want the user's symlink to %s", link, err, target)
	}
}

func TestRemove(t *testing.T) {
	dir := t.TempDir()
	// A user's file Shoal does not manage, in a registry Shoal does not mirror.
	untouched := filepath.Join(dir, "other.test", "hosts.toml")
	writeFile(t, untouched, "server = \"https://other.test\"\n", 0o644)
	// A directory with only Docker-style certificates: Shoal adds hosts.toml beside them.
	writeCertFiles(t, filepath.Join(dir, "certs.test"), "ca")
	cfg := Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"docker.io", "certs.test", "*"}}
	if err := Write(cfg); err != nil {
		t.Fatal(err)
	}
	// Someone drops a file into a directory Shoal created: the directory must survive.
	writeFile(t, filepath.Join(dir, "_default", "ca.crt"), "x", 0o644)
	// Leftover of a crash in the middle of a write.
	writeFile(t, filepath.Join(dir, "docker.io", tempPrefix+"123"), "partial", 0o644)

	for i := range 2 { // Remove is idempotent
		if err := Remove(dir); err != nil {
			t.Fatalf("Remove #%d: %v", i+1, err)
		}
		got := listTree(t, dir)
		want := []string{".", "_default", "_default/ca.crt", "certs.test", "certs.test/ca.cert", "certs.test/ca.crt", "certs.test/ca.key", "other.test", "other.test/hosts.toml"}
		if !slices.Equal(got, want) {
			t.Errorf("after Remove #%d: %q, want %q", i+1, got, want)
		}
	}
	if got := readFile(t, untouched); got != "server = \"https://other.test\"\n" {
		t.Errorf("Remove changed a file Shoal did not write: %q", got)
	}
	if err := Remove(filepath.Join(dir, "does-not-exist")); err != nil {
		t.Errorf("Remove of a missing directory: %v", err)
	}
}

func TestRemoveWithoutBackupLeavesMergedFile(t *testing.T) {
	dir := t.TempDir()
	hostsPath := filepath.Join(dir, "registry.test", "hosts.toml")
	writeFile(t, hostsPath, "server = \"https://upstream.test\"\n", 0o644)
	if err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"registry.test"}}); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "registry.test", backupFile)); err != nil {
		t.Fatal(err)
	}
	if err := Remove(dir); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("Remove error = %v, want one saying the backup is missing", err)
	}
	if _, err := os.Stat(hostsPath); err != nil {
		t.Errorf("the merged file, now the only copy of the user's settings, was deleted: %v", err)
	}
}

func TestWritePrunesRegistriesNoLongerMirrored(t *testing.T) {
	dir := t.TempDir()
	user := "[host.\"https://a.test\"]\n"
	writeFile(t, filepath.Join(dir, "merged.test", "hosts.toml"), user, 0o644)
	if err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"docker.io", "gone.test", "merged.test"}}); err != nil {
		t.Fatal(err)
	}
	if err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"docker.io"}}); err != nil {
		t.Fatal(err)
	}
	want := []string{".", "docker.io", "docker.io/hosts.toml", "merged.test", "merged.test/hosts.toml"}
	if got := listTree(t, dir); !slices.Equal(got, want) {
		t.Errorf("after dropping registries: %q, want %q", got, want)
	}
	if got := readFile(t, filepath.Join(dir, "merged.test", "hosts.toml")); got != user {
		t.Errorf("the user's file was not restored: %q", got)
	}
}

func TestCertFilesCarryOverToNewFile(t *testing.T) {
	dir := t.TempDir()
	regDir := filepath.Join(dir, "registry.test")
	writeCertFiles(t, regDir, "corp")
	before := containerdHosts(t, dir, "registry.test")
	if roots, certs, _ := tlsConfigOf(t, before[0]); !roots || certs != 1 {
		t.Fatalf("test setup: containerd does not use the certificate files (roots=%v certs=%d)", roots, certs)
	}
	if err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"registry.test"}}); err != nil {
		t.Fatal(err)
	}
	content := readFile(t, filepath.Join(regDir, "hosts.toml"))
	if !strings.Contains(content, "(new-file)") {
		t.Errorf("the directory existed: state should be new-file:\n%s", content)
	}
	hosts := containerdHosts(t, dir, "registry.test")
	want := []string{"http://127.0.0.1:5001/v2 pull,resolve", "https://registry.test/v2 pull,resolve", "https://registry.test/v2 pull,resolve,push"}
	if got := hostList(hosts); !slices.Equal(got, want) {
		t.Fatalf("containerd reads %q, want %q", got, want)
	}
	for _, h := range hosts[1:] {
		if roots, certs, _ := tlsConfigOf(t, h); !roots || certs != 1 {
			t.Errorf("upstream %s lost the directory's certificates: roots=%v certs=%d", h.Host, roots, certs)
		}
	}
	if roots, certs, _ := tlsConfigOf(t, hosts[0]); roots || certs != 0 {
		t.Errorf("the plain-HTTP mirror got TLS settings: roots=%v certs=%d", roots, certs)
	}
}

func TestHostPortUnderscoreDirectoryIsUsed(t *testing.T) {
	dir := t.TempDir()
	// containerd 1.6 looks up host_port_ before host:port.
	writeCertFiles(t, filepath.Join(dir, "registry.test_5000_"), "ca")
	if err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"registry.test:5000"}}); err != nil {
		t.Fatal(err)
	}
	assertMissing(t, filepath.Join(dir, "registry.test:5000"))
	want := []string{"http://127.0.0.1:5001/v2 pull,resolve", "https://registry.test:5000/v2 pull,resolve", "https://registry.test:5000/v2 pull,resolve,push"}
	if got := hostList(containerdHosts(t, dir, "registry.test:5000")); !slices.Equal(got, want) {
		t.Errorf("containerd reads %q, want %q", got, want)
	}
}

func TestRegistryNames(t *testing.T) {
	tests := []struct {
		name, wantDir string // wantDir "" means rejected
	}{
		{"docker.io", "docker.io"},
		{"*", "_default"},
		{"registry.test:5000", "registry.test:5000"},
		{"localhost", "localhost"},
		{"127.0.0.1:5000", "127.0.0.1:5000"},
		{"[::1]:5000", "[::1]:5000"},
		{"[::1]", "[::1]"},
		{"Registry-1.Example.COM", "Registry-1.Example.COM"},
		{"", ""},
		{".", ""},
		{"..", ""},
		{"../etc", ""},
		{"a/b", ""},
		{"docker.io/library", ""},
		{"a\\b", ""},
		{"a..b", ""},
		{"a.", ""},
		{"_default", ""},
		{"-a.test", ""},
		{"a b", ""},
		{"a\x00b", ""},
		{"host:", ""},
		{"host:0", ""},
		{"host:65536", ""},
		{"host:+80", ""},
		{"host:port", ""},
		{"a:1:2", ""},
		{"[::1", ""},
		{"[fe80::1%eth0]:80", ""},
		{"[127.0.0.1]", ""},
		{"[::1]", "[::1]"},
		{"**", ""},
		{strings.Repeat("a", 64) + ".test", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateRegistry(tt.name)
			if (err == nil) != (tt.wantDir != "") {
				t.Errorf("ValidateRegistry(%q) = %v", tt.name, err)
			}
			if got := RegistryDir(tt.name); got != tt.wantDir {
				t.Errorf("RegistryDir(%q) = %q, want %q", tt.name, got, tt.wantDir)
			}
		})
	}
}

func TestWriteRejectsBadConfigBeforeTouchingAnything(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
	}{
		{"path trick", Config{MirrorURL: testMirror, Registries: []string{"docker.io", "../escape"}}},
		{"slash", Config{MirrorURL: testMirror, Registries: []string{"docker.io", "a/b"}}},
		{"mirror without scheme", Config{MirrorURL: "127.0.0.1:5001", Registries: []string{"docker.io"}}},
		{"mirror with query", Config{MirrorURL: testMirror + "/?x=1", Registries: []string{"docker.io"}}},
		{"negative timeout", Config{MirrorURL: testMirror, Registries: []string{"docker.io"}, DialTimeout: -time.Second}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parent := t.TempDir()
			tt.cfg.Dir = filepath.Join(parent, "certs.d")
			if err := Write(tt.cfg); err == nil {
				t.Fatal("Write accepted a bad config")
			}
			if got := listTree(t, parent); !slices.Equal(got, []string{"."}) {
				t.Errorf("Write touched the disk: %q", got)
			}
		})
	}
	if err := Write(Config{MirrorURL: testMirror}); err == nil {
		t.Error("Write accepted an empty directory")
	}
}

func TestBadUpstream(t *testing.T) {
	for _, upstream := range []string{"ftp://registry.test", testMirror, "https://user:pw@registry.test", "http://"} {
		t.Run(upstream, func(t *testing.T) {
			dir := t.TempDir()
			err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: []string{"registry.test"},
				Upstream: func(string) string { return upstream }})
			if err == nil {
				t.Fatal("Write accepted the upstream")
			}
			assertMissing(t, filepath.Join(dir, "registry.test"))
		})
	}
}

func TestExistingServer(t *testing.T) {
	tests := []struct {
		name     string
		files    map[string]string // relative path → content ("" makes a directory)
		shoal    []string          // registries Shoal writes before the lookup
		registry string
		want     string
		wantErr  bool
	}{
		{name: "nothing", registry: "registry.test"},
		{
			name:     "user file",
			files:    map[string]string{"registry.test/hosts.toml": "server = \"https://upstream.test\"\n[host.\"https://a.test\"]\n"},
			registry: "registry.test", want: "https://upstream.test",
		},
		{
			name:     "server without scheme",
			files:    map[string]string{"registry.test:5000/hosts.toml": "server = \"upstream.test:5000\"\n"},
			registry: "registry.test:5000", want: "https://upstream.test:5000",
		},
		{
			name:     "user file without server",
			files:    map[string]string{"registry.test/hosts.toml": "[host.\"https://a.test\"]\n"},
			registry: "registry.test",
		},
		{
			name:     "Shoal's own file",
			shoal:    []string{"registry.test"},
			registry: "registry.test",
		},
		{
			name:     "merged file: the user's server",
			files:    map[string]string{"registry.test/hosts.toml": "server = \"https://upstream.test\"\n"},
			shoal:    []string{"registry.test"},
			registry: "registry.test", want: "https://upstream.test",
		},
		{
			name:     "user catch-all applies to registries without a directory",
			files:    map[string]string{"_default/hosts.toml": "server = \"https://proxy.test\"\n"},
			registry: "registry.test", want: "https://proxy.test",
		},
		{
			name:     "user catch-all seen through Shoal's own directory",
			files:    map[string]string{"_default/hosts.toml": "server = \"https://proxy.test\"\n"},
			shoal:    []string{"registry.test"},
			registry: "registry.test", want: "https://proxy.test",
		},
		{
			name:     "merged catch-all",
			files:    map[string]string{"_default/hosts.toml": "server = \"https://proxy.test\"\n"},
			shoal:    []string{"*"},
			registry: "*", want: "https://proxy.test",
		},
		{
			name:     "a directory with certificates only hides the catch-all",
			files:    map[string]string{"_default/hosts.toml": "server = \"https://proxy.test\"\n", "registry.test/ca.crt": "x"},
			shoal:    []string{"registry.test"},
			registry: "registry.test",
		},
		{
			name:     "host_port_ directory first",
			files:    map[string]string{"registry.test_5000_/hosts.toml": "server = \"https://a.test\"\n", "registry.test:5000/hosts.toml": "server = \"https://b.test\"\n"},
			registry: "registry.test:5000", want: "https://a.test",
		},
		{
			name:     "invalid TOML",
			files:    map[string]string{"registry.test/hosts.toml": "server = \n"},
			registry: "registry.test", wantErr: true,
		},
		{name: "path trick", registry: "../x", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for rel, content := range tt.files {
				writeFile(t, filepath.Join(dir, rel), content, 0o644)
			}
			if tt.shoal != nil {
				if err := Write(Config{Dir: dir, MirrorURL: testMirror, Registries: tt.shoal}); err != nil {
					t.Fatal(err)
				}
			}
			got, err := ExistingServer(dir, tt.registry)
			if (err != nil) != tt.wantErr || got != tt.want {
				t.Errorf("ExistingServer = %q, %v; want %q (error: %v)", got, err, tt.want, tt.wantErr)
			}
		})
	}
}

func TestParseMarker(t *testing.T) {
	tests := []struct {
		content   string
		wantState string
		wantOurs  bool
	}{
		{header(stateMerged) + "x", stateMerged, true},
		{header(stateNewDir), stateNewDir, true},
		{"# Managed by Shoal\n", "", true},
		{"# managed by someone else\n# Managed by Shoal (new-dir)\n", "", false},
		{"", "", false},
	}
	for _, tt := range tests {
		state, ours := parseMarker([]byte(tt.content))
		if state != tt.wantState || ours != tt.wantOurs {
			t.Errorf("parseMarker(%q) = %q, %v; want %q, %v", tt.content, state, ours, tt.wantState, tt.wantOurs)
		}
	}
}
