package kubemembers

import (
	"net/netip"
	"slices"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

// TestAddrsByNodeName: the watched members answer for their nodes' names, this node always for
// its own, unknown names and invalid members are left out.
func TestAddrsByNodeName(t *testing.T) {
	self := netip.MustParseAddrPort("10.0.0.1:7070")
	s, err := New(&rest.Config{Host: "https://127.0.0.1:1"}, Config{NodeName: "a", Self: self, ProtocolVersion: 2, AgentVersion: "v"})
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Addrs([]string{"b"}); got != nil {
		t.Errorf("before the watch: %v, want none", got)
	}
	member := func(name, ip string, port int32) any {
		return &v1alpha1.SwarmMember{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: v1alpha1.SwarmMemberSpec{IP: ip, Port: port}}
	}
	s.peers([]any{member("a", "10.9.9.9", 1), member("b", "10.0.0.2", 7070), member("c", "not an ip", 7070)})
	got := s.Addrs([]string{"c", "b", "a", "gone"})
	if want := []netip.AddrPort{netip.MustParseAddrPort("10.0.0.2:7070"), self}; !slices.Equal(got, want) {
		t.Errorf("Addrs = %v, want %v", got, want)
	}
}
