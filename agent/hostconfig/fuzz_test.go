package hostconfig

import (
	"slices"
	"sort"
	"strings"
	"testing"

	tomlv1 "github.com/pelletier/go-toml"
)

// FuzzRenderMerged checks that a merge never breaks a file containerd 1.x can parse. Shoal
// parses with go-toml v2 (as containerd 2 does); containerd 1.x uses go-toml v1 and orders
// hosts by the line of their table (getSortedHosts in remotes/docker/config). Whenever v1
// reads the user's file and Shoal accepts it, v1 must read the result with the mirror first,
// followed by the user's hosts in their order.
func FuzzRenderMerged(f *testing.F) {
	f.Add(userFile)
	f.Add("server = \"https://upstream.test\"\n")
	f.Add("# c\n[host.\"https://a.test\"]\n  capabilities = [\"pull\"]\n")
	f.Add("x = '''\n[host.\"https://fake.test\"]\n'''\n[host.'https://b.test']\n")
	f.Add("a = [\n  [1, 2],\n]\n[header]\n  k = \"v\"\n[host.\"https://a.test\".header]\n  k = \"v\"\n")
	f.Fuzz(func(t *testing.T, user string) {
		before, err := containerd1HostOrder([]byte(user))
		if err != nil {
			return // containerd 1.x ignores this file with or without Shoal
		}
		out, err := renderMerged(stateMerged, testMirror, DefaultDialTimeout, []byte(user))
		if err != nil {
			return
		}
		after, err := containerd1HostOrder(out)
		if err != nil {
			t.Fatalf("go-toml v1 cannot parse the merge: %v\n%s", err, out)
		}
		if want := append([]string{testMirror}, before...); !slices.Equal(after, want) {
			t.Fatalf("containerd 1.x orders hosts %q, want %q:\n%s", after, want, out)
		}
		if !strings.HasPrefix(string(out), markerPrefix) {
			t.Fatalf("no marker:\n%s", out)
		}
	})
}

// containerd1HostOrder parses like containerd 1.6's parseHostsFile and returns the host table
// keys in the order containerd tries them (nil when there is no host table).
func containerd1HostOrder(b []byte) ([]string, error) {
	tree, err := tomlv1.LoadBytes(b)
	if err != nil {
		return nil, err
	}
	hosts, ok := tree.Get("host").(*tomlv1.Tree)
	if !ok {
		return nil, nil
	}
	keys := hosts.Keys()
	line := make(map[string]int, len(keys))
	for _, k := range keys {
		table, ok := hosts.GetPath([]string{k}).(*tomlv1.Tree)
		if !ok {
			return nil, nil // containerd would panic on its type assertion; not a usable file
		}
		line[k] = table.Position().Line
	}
	sort.Slice(keys, func(i, j int) bool { return line[keys[i]] < line[keys[j]] })
	return keys, nil
}
