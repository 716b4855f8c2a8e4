package main

import (
	"bytes"
	"context"
	"encoding/pem"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// freeAddr is a loopback address with a port that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestControllerCommand runs `shoal controller` against a real API server: it becomes ready,
// leads through its Lease, creates NodeCaches for Nodes, and stops when its context ends.
func TestControllerCommand(t *testing.T) {
	env := kubetest.Start(t)
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, env.KubeConfig, 0o600); err != nil {
		t.Fatal(err)
	}
	health := freeAddr(t)
	root := newRootCommand()
	var stderr bytes.Buffer
	root.SetOut(&bytes.Buffer{})
	root.SetErr(&stderr)
	root.SetArgs([]string{"controller", "--kubeconfig", kubeconfig, "--metrics-addr", "0", "--health-addr", health,
		"--leader-election-namespace", "default", "--log-level", "debug"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- root.ExecuteContext(ctx) }()
	stopped := false
	stop := func() error {
		stopped = true
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(time.Minute):
			t.Fatal("shoal controller did not stop a minute after its context ended")
			return nil
		}
	}
	t.Cleanup(func() {
		if !stopped {
			_ = stop()
		}
		if t.Failed() {
			t.Logf("shoal controller's log:\n%s", stderr.String())
		}
	})

	waitUntil := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 30 s", what)
			}
			select {
			case err := <-done:
				t.Fatalf("shoal controller exited: %v", err)
			default:
			}
		}
	}
	waitUntil("/readyz answers 200", func() bool {
		resp, err := http.Get("http://" + health + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	waitUntil("the Lease names a holder", func() bool {
		var lease coordinationv1.Lease
		err := env.Client.Get(t.Context(), client.ObjectKey{Namespace: "default", Name: "shoal-controller.shoal.dev"}, &lease)
		return err == nil && lease.Spec.HolderIdentity != nil && *lease.Spec.HolderIdentity != ""
	})
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}
	if err := env.Client.Create(t.Context(), node); err != nil {
		t.Fatal(err)
	}
	waitUntil("a NodeCache for the new Node", func() bool {
		return env.Client.Get(t.Context(), client.ObjectKey{Name: "node-a"}, &v1.NodeCache{}) == nil
	})
	if err := stop(); err != nil {
		t.Errorf("shoal controller: %v", err)
	}
	// Released on the way out: the next replica need not wait for the Lease to expire.
	var lease coordinationv1.Lease
	if err := env.Client.Get(t.Context(), client.ObjectKey{Namespace: "default", Name: "shoal-controller.shoal.dev"}, &lease); err != nil {
		t.Fatal(err)
	}
	if lease.Spec.HolderIdentity != nil && *lease.Spec.HolderIdentity != "" {
		t.Errorf("Lease still held by %q after the controller stopped", *lease.Spec.HolderIdentity)
	}
}

// TestTransportTrusting: the controller's --registry-ca-file makes its registry client trust
// that CA (a server with a certificate it signed answers), and a file without a certificate is
// refused at start.
func TestTransportTrusting(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	defer srv.Close()
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	rt, err := transportTrusting(caFile)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: rt}).Get(srv.URL)
	if err != nil {
		t.Fatalf("GET with the CA trusted: %v", err)
	}
	resp.Body.Close()
	if resp, err := http.Get(srv.URL); err == nil {
		resp.Body.Close()
		t.Fatal("the test server is trusted without the CA: the check above proves nothing")
	}
	empty := filepath.Join(dir, "empty.crt")
	if err := os.WriteFile(empty, []byte("not a certificate\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := transportTrusting(empty); err == nil {
		t.Error("a CA file without a certificate was accepted")
	}
}

// TestConfigurationDocListsEveryFlag: docs/configuration.md has a row for every flag of shoal
// controller and shoal cleanup (with its environment variable), each in its command's section,
// and none for a flag they lack.
func TestConfigurationDocListsEveryFlag(t *testing.T) {
	doc, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	sections := map[string]string{}
	for _, part := range strings.Split(string(doc), "\n## ")[1:] {
		title, body, _ := strings.Cut(part, "\n")
		sections[strings.Trim(title, "`")] = body
	}
	for name, cmd := range map[string]*cobra.Command{"shoal controller": newControllerCommand(), "shoal cleanup": newCleanupCommand()} {
		checkFlagRows(t, "docs/configuration.md, "+name, sections[name], cmd)
	}
}
