// Command shoal is the single binary of Shoal: the node agent (`shoal agent`), the controller
// (`shoal controller`) and the uninstall helper (`shoal cleanup`).
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "shoal:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return newRootCommand().ExecuteContext(ctx)
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "shoal",
		Short:         "Peer-to-peer distribution of container images and OCI artifacts for Kubernetes",
		Long:          "Peer-to-peer distribution of container images and OCI artifacts for Kubernetes.\n\n" + envHelp,
		SilenceUsage:  true,
		SilenceErrors: true,
		// Every subcommand's flags can also come from SHOAL_* variables (env.go).
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			return applyEnv(cmd, os.Environ())
		},
	}
	root.AddCommand(newAgentCommand(), newControllerCommand(), newCleanupCommand(), newVersionCommand())
	return root
}

func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprintln(cmd.OutOrStdout(), version)
			return err
		},
	}
}

// commandLogger is the logger a subcommand's --log-level and --log-format describe, writing to
// its stderr; for a subcommand without them, info-level text.
func commandLogger(cmd *cobra.Command) (*slog.Logger, error) {
	fs := cmd.Flags()
	var level slog.Level // info
	if f := fs.Lookup("log-level"); f != nil {
		if err := level.UnmarshalText([]byte(f.Value.String())); err != nil {
			return nil, fmt.Errorf("%s %q: want debug, info, warn or error", flagLabel(fs, f.Name), f.Value)
		}
	}
	format := "text"
	if f := fs.Lookup("log-format"); f != nil {
		format = f.Value.String()
	}
	opts := &slog.HandlerOptions{Level: level}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(cmd.ErrOrStderr(), opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), opts)), nil
	}
	return nil, fmt.Errorf("%s %q: want json or text", flagLabel(fs, "log-format"), format)
}
