package membership

import (
	"strings"
	"testing"
)

// FuzzParsePeers checks that an accepted --peers list holds only addresses a peer can be
// reached at, each once, and that it formats back to the same list.
func FuzzParsePeers(f *testing.F) {
	for _, s := range []string{
		"10.0.0.1:7070,[fd00::2]:7070", "", " , ", "10.0.0.1:7070,10.0.0.1:7070", "0.0.0.0:1",
		"[::ffff:10.0.0.1]:7070,10.0.0.1:7070", "host:80", "10.0.0.1:0", "[fe80::1%eth0]:7070",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		peers, err := ParsePeers(s)
		if err != nil {
			return
		}
		seen := make(map[string]bool)
		parts := make([]string, len(peers))
		for i, p := range peers {
			if !p.IsValid() || p.Addr().IsUnspecified() || p.Port() == 0 || p.Addr().Is4In6() {
				t.Fatalf("ParsePeers(%q) accepted %v", s, p)
			}
			if seen[p.String()] {
				t.Fatalf("ParsePeers(%q) lists %v twice", s, p)
			}
			seen[p.String()] = true
			parts[i] = p.String()
		}
		again, err := ParsePeers(strings.Join(parts, ","))
		if err != nil || len(again) != len(peers) {
			t.Fatalf("ParsePeers(%q) = %v, which formats to a list that parses as %v, %v", s, peers, again, err)
		}
		for i := range again {
			if again[i] != peers[i] {
				t.Fatalf("ParsePeers(%q) = %v, which formats to a list that parses as %v", s, peers, again)
			}
		}
	})
}
