package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/shoal-dev/shoal/agent/hostconfig"
)

func newCleanupCommand() *cobra.Command {
	var hostsDir string
	cmd := &cobra.Command{
		Use:   "cleanup",
		Short: "Remove the hosts.toml files Shoal wrote and restore the ones it merged into",
		Long: `Remove what Shoal wrote under containerd's hosts directory: files Shoal created are
deleted, files it merged its mirror into are restored byte for byte from their backup, and
nothing Shoal did not write is touched. Run it when uninstalling; pulls then go straight upstream.

` + envHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if hostsDir == "" {
				return fmt.Errorf("%s must be set", flagLabel(cmd.Flags(), "containerd-hosts-dir"))
			}
			if err := hostconfig.Remove(hostsDir); err != nil {
				return fmt.Errorf("clean up %s: %w", hostsDir, err)
			}
			_, err := fmt.Fprintf(cmd.OutOrStdout(), "removed Shoal's hosts.toml entries from %s\n", hostsDir)
			return err
		},
	}
	cmd.Flags().StringVar(&hostsDir, "containerd-hosts-dir", "/etc/containerd/certs.d", "containerd's config_path, where Shoal wrote hosts.toml files")
	return cmd
}
