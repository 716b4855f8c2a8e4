package main

import (
	"bytes"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shoal-dev/shoal/agent/hostconfig"
)

// TestCleanupWaitsForTheAgent: with --wait-for-agent-exit, shoal cleanup touches nothing while
// something still listens at the agent's address (an agent shutting down could write again),
// then restores the node's own hosts.toml byte for byte once it is gone.
func TestCleanupWaitsForTheAgent(t *testing.T) {
	dir := t.TempDir()
	regDir := filepath.Join(dir, "registry.test")
	if err := os.MkdirAll(regDir, 0o755); err != nil {
		t.Fatal(err)
	}
	own := []byte("server = \"https://registry.test\"\n")
	if err := os.WriteFile(filepath.Join(regDir, "hosts.toml"), own, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := hostconfig.Write(hostconfig.Config{Dir: dir, MirrorURL: "http://127.0.0.1:5001", Registries: []string{"registry.test"}}); err != nil {
		t.Fatal(err)
	}
	agent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cmd := newCleanupCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs([]string{"--containerd-hosts-dir", dir, "--wait-for-agent-exit", agent.Addr().String(), "--timeout", "30s"})
	done := make(chan error, 1)
	go func() { done <- cmd.Execute() }()

	select {
	case err := <-done:
		t.Fatalf("cleanup returned while the agent still listened: %v", err)
	case <-time.After(1500 * time.Millisecond):
	}
	if got, _ := os.ReadFile(filepath.Join(regDir, "hosts.toml")); bytes.Equal(got, own) {
		t.Fatal("hosts.toml restored while the agent still listened")
	}
	agent.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("cleanup did not finish once the agent was gone")
	}
	if got, err := os.ReadFile(filepath.Join(regDir, "hosts.toml")); err != nil || !bytes.Equal(got, own) {
		t.Errorf("hosts.toml after cleanup (%v):\n%s\nwant the node's own:\n%s", err, got, own)
	}
	if !strings.Contains(out.String(), "removed Shoal's hosts.toml entries") {
		t.Errorf("output %q", out.String())
	}
}

// TestCleanupGivesUpOnAnAgentThatStays: the wait is bounded by --timeout and fails, leaving the
// files alone.
func TestCleanupGivesUpOnAnAgentThatStays(t *testing.T) {
	agent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer agent.Close()
	cmd := newCleanupCommand()
	cmd.SetOut(&bytes.Buffer{})
	cmd.SetErr(&bytes.Buffer{})
	cmd.SetArgs([]string{"--containerd-hosts-dir", t.TempDir(), "--wait-for-agent-exit", agent.Addr().String(), "--timeout", "1s"})
	if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), "still listens") {
		t.Errorf("cleanup with an agent that never leaves: %v; want a bounded failure", err)
	}
}
