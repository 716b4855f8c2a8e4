package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/shoal-dev/shoal/agent/criruntime"
	"github.com/shoal-dev/shoal/agent/hostconfig"
)

type cleanupOptions struct {
	hostsDir         string
	runtimeEndpoint  string
	runtimeNamespace string
	agentAddr        string
	timeout          time.Duration
	hold             bool
}

func newCleanupCommand() *cobra.Command {
	var o cleanupOptions
	cmd := &cobra.Command{
		Use:   "cleanup",
		Short: "Undo what Shoal did on this node: its hosts.toml entries and its containerd pins",
		Long: `Remove what Shoal wrote under containerd's hosts directory: files Shoal created are
deleted, files it merged its mirror into are restored byte for byte from their backup, and
nothing Shoal did not write is touched. With --runtime-endpoint, also release every image pin
Shoal made in containerd (those it marked as its own; the images stay, and pins made by others
stay). Run it when uninstalling; pulls then go straight upstream. The Helm chart runs it on
every node when the release is deleted.

` + envHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if o.hostsDir == "" {
				return fmt.Errorf("%s must be set", flagLabel(cmd.Flags(), "containerd-hosts-dir"))
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			if err := runCleanup(ctx, cmd, o); err != nil {
				return err
			}
			if o.hold {
				<-ctx.Done()
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.hostsDir, "containerd-hosts-dir", "/etc/containerd/certs.d", "containerd's config_path, where Shoal wrote hosts.toml files")
	f.StringVar(&o.runtimeEndpoint, "runtime-endpoint", "", `containerd's socket (unix:///run/containerd/containerd.sock): release the image pins Shoal made there; "" = leave pins alone`)
	f.StringVar(&o.runtimeNamespace, "runtime-namespace", criruntime.DefaultNamespace, "containerd namespace of the CRI plugin's images")
	f.StringVar(&o.agentAddr, "wait-for-agent-exit", "", `first wait until nothing listens at this address (the agent's mirror, 127.0.0.1:5001), so that an agent still shutting down does not write after the cleanup; "" = do not wait`)
	f.DurationVar(&o.timeout, "timeout", 2*time.Minute, "give up after this long")
	f.BoolVar(&o.hold, "hold", false, "after cleaning up, stay running until SIGTERM (a DaemonSet's pod that must stay up)")
	_ = f.MarkHidden("hold")
	cmd.AddCommand(newCleanupWaitCommand())
	return cmd
}

func runCleanup(ctx context.Context, cmd *cobra.Command, o cleanupOptions) error {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	if o.agentAddr != "" {
		if err := waitUntilClosed(ctx, o.agentAddr); err != nil {
			return err
		}
	}
	if err := hostconfig.Remove(o.hostsDir); err != nil {
		return fmt.Errorf("clean up %s: %w", o.hostsDir, err)
	}
	if _, err := fmt.Fprintf(cmd.OutOrStdout(), "removed Shoal's hosts.toml entries from %s\n", o.hostsDir); err != nil {
		return err
	}
	if o.runtimeEndpoint == "" {
		return nil
	}
	rt, err := criruntime.Dial(o.runtimeEndpoint, o.runtimeNamespace)
	if err != nil {
		return err
	}
	defer rt.Close()
	pinned, err := rt.PinnedByOwner(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, ref := range pinned {
		errs = append(errs, rt.Unpin(ctx, ref))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	_, err = fmt.Fprintf(cmd.OutOrStdout(), "released %d image pins Shoal made in containerd\n", len(pinned))
	return err
}

// waitUntilClosed polls addr until a connection to it is refused.
func waitUntilClosed(ctx context.Context, addr string) error {
	for {
		conn, err := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "tcp", addr)
		if err != nil && ctx.Err() == nil && errors.Is(err, syscall.ECONNREFUSED) {
			return nil
		}
		if conn != nil {
			conn.Close()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the agent still listens at %s: %w", addr, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// newCleanupWaitCommand is the uninstall hook's Job: Helm waits for Jobs, not DaemonSets, so the
// Job waits until the cleanup DaemonSet's pod (whose init container does the work) is ready on
// every node it is scheduled to.
func newCleanupWaitCommand() *cobra.Command {
	var namespace, name string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:    "wait",
		Short:  "Wait until the cleanup DaemonSet is ready on every node (the chart's uninstall hook)",
		Args:   cobra.NoArgs,
		Hidden: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := rest.InClusterConfig()
			if err != nil {
				return err
			}
			client, err := kubernetes.NewForConfig(cfg)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			for {
				ds, err := client.AppsV1().DaemonSets(namespace).Get(ctx, name, metav1.GetOptions{})
				if err == nil && ds.Status.ObservedGeneration >= ds.Generation &&
					ds.Status.NumberReady == ds.Status.DesiredNumberScheduled && ds.Status.UpdatedNumberScheduled == ds.Status.DesiredNumberScheduled {
					_, err = fmt.Fprintf(cmd.OutOrStdout(), "cleaned up on %d nodes\n", ds.Status.NumberReady)
					return err
				}
				select {
				case <-ctx.Done():
					if err == nil {
						err = fmt.Errorf("%d of %d nodes cleaned up", ds.Status.NumberReady, ds.Status.DesiredNumberScheduled)
					}
					return fmt.Errorf("daemonset %s/%s: %w (%w)", namespace, name, err, ctx.Err())
				case <-time.After(time.Second):
				}
			}
		},
	}
	f := cmd.Flags()
	f.StringVar(&namespace, "namespace", "", "namespace of the cleanup DaemonSet")
	f.StringVar(&name, "daemonset", "shoal-cleanup", "the cleanup DaemonSet")
	f.DurationVar(&timeout, "timeout", 5*time.Minute, "give up after this long")
	return cmd
}
