package main

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestQuantityValue(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		str  string
	}{
		{"50Gi", 50 << 30, "50Gi"},
		{"16Mi", 16 << 20, "16Mi"},
		{"1.5Ki", 1536, "1536"},
		{"20M", 20_000_000, "20000000"},
		{"0", 0, "0"},
		{"-1", -1, "-1"}, // the agent refuses negative sizes, naming the field
	}
	for _, tt := range tests {
		var dst int64
		q := newQuantityValue(&dst, 7)
		if dst != 7 {
			t.Fatalf("newQuantityValue did not set the default: %d", dst)
		}
		if err := q.Set(tt.in); err != nil || dst != tt.want {
			t.Errorf("Set(%q) = %v, value %d; want %d", tt.in, err, dst, tt.want)
		}
		if got := q.String(); got != tt.str {
			t.Errorf("after Set(%q), String() = %q, want %q", tt.in, got, tt.str)
		}
	}
	for _, bad := range []string{"50MB", "", "ten", "1Gi "} {
		var dst int64 = 3
		err := newQuantityValue(&dst, 3).Set(bad)
		if err == nil || !strings.Contains(err.Error(), `"`+bad+`"`) || !strings.Contains(err.Error(), "50Mi") {
			t.Errorf("Set(%q) = %v, want an error naming the value and an example", bad, err)
		}
		if dst != 3 {
			t.Errorf("Set(%q) failed but changed the value to %d", bad, dst)
		}
	}
}

func TestEndpointsValue(t *testing.T) {
	var m map[string]string
	e := newEndpointsValue(&m)
	for _, s := range []string{"registry.test=http://127.0.0.1:5000", " docker.io = https://mirror.test "} {
		if err := e.Set(s); err != nil {
			t.Fatalf("Set(%q) = %v", s, err)
		}
	}
	want := []string{"docker.io=https://mirror.test", "registry.test=http://127.0.0.1:5000"}
	if got := e.GetSlice(); !slices.Equal(got, want) {
		t.Errorf("GetSlice() = %q, want %q", got, want)
	}
	for _, bad := range []string{"registry.test", "=http://x", "registry.test=", "registry.test=http://other"} {
		if err := e.Set(bad); err == nil {
			t.Errorf("Set(%q) accepted", bad)
		}
	}
	if err := e.Replace([]string{"a.test=http://a"}); err != nil || len(m) != 1 || m["a.test"] != "http://a" {
		t.Errorf("Replace = %v, map %v", err, m)
	}
}

func TestPeersValue(t *testing.T) {
	var peers []netip.AddrPort
	p := &peersValue{dst: &peers}
	if err := p.Set("10.0.0.1:7070, 10.0.0.2:7070"); err != nil {
		t.Fatal(err)
	}
	if err := p.Set("10.0.0.3:7070"); err != nil {
		t.Fatal(err)
	}
	if got, want := p.String(), "10.0.0.1:7070,10.0.0.2:7070,10.0.0.3:7070"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if err := p.Set("10.0.0.2:7070"); err == nil {
		t.Error("a peer given twice, in two flags, was accepted")
	}
	if len(peers) != 3 {
		t.Errorf("a refused Set changed the peers: %v", peers)
	}
	if err := p.Set("node-a:7070"); err == nil {
		t.Error("a host name was accepted as a peer")
	}
}

func TestAddrPortValue(t *testing.T) {
	var addr netip.AddrPort
	a := addrPortValue{&addr}
	if err := a.Set("10.0.0.1:7070"); err != nil || a.String() != "10.0.0.1:7070" {
		t.Fatalf("Set = %v, String() = %q", err, a.String())
	}
	if err := a.Set("10.0.0.1"); err == nil || !strings.Contains(err.Error(), `"10.0.0.1"`) {
		t.Errorf("Set without a port = %v, want an error naming the value", err)
	}
	if err := a.Set(""); err != nil || addr.IsValid() || a.String() != "" {
		t.Errorf(`Set("") = %v, value %v; want it unset`, err, addr)
	}
}
