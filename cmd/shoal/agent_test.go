package main

import (
	"bytes"
	"context"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/shoal-dev/shoal/agent"
)

// TestAgentErrorsNameFlags: what the agent refuses in its configuration is reported with the
// flag, or the environment variable, that set it. Every case must fail before the agent starts.
func TestAgentErrorsNameFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string // the error starts with this
	}{
		{"mirror addr", []string{"--mirror-addr", "5001"}, nil, `--mirror-addr: "5001" is not IP:PORT`},
		{"mirror addr from env", nil, map[string]string{"SHOAL_MIRROR_ADDR": "5001"}, `SHOAL_MIRROR_ADDR (--mirror-addr): "5001" is not IP:PORT`},
		{"negative cache size", []string{"--cache-size", "-1"}, nil, "--cache-size: must not be negative"},
		{"cache size not a quantity", []string{"--cache-size", "50GB"}, nil, `invalid argument "50GB" for "--cache-size" flag: "50GB" is not a quantity`},
		{"cache size from env", nil, map[string]string{"SHOAL_CACHE_SIZE": "50GB"}, `environment variable SHOAL_CACHE_SIZE (--cache-size): "50GB" is not a quantity`},
		{"no registries", []string{"--mirror-registries", ""}, nil, "--mirror-registries: must name at least one registry"},
		{"endpoint syntax", []string{"--registry-endpoint", "registry.test"}, nil, `invalid argument "registry.test" for "--registry-endpoint" flag`},
		{"endpoint URL", []string{"--registry-endpoint", "registry.test=ftp://x"}, nil, "--registry-endpoint: registry.test=ftp://x: "},
		{"endpoint registry", []string{"--registry-endpoint", "a/b=http://x"}, nil, "--registry-endpoint: "},
		{"default registry", []string{"--default-registry", "http://docker.io"}, nil, "--default-registry: "},
		{"peers without p2p addr", []string{"--peers", "10.0.0.1:7070"}, nil, "--peers needs --p2p-addr"},
		{"peers from env without p2p addr", nil, map[string]string{"SHOAL_PEERS": "10.0.0.1:7070\n10.0.0.2:7070"}, "SHOAL_PEERS (--peers) needs --p2p-addr"},
		{"p2p addr", []string{"--p2p-addr", "10.0.0.1"}, nil, `invalid argument "10.0.0.1" for "--p2p-addr" flag`},
		{"negative upload rate", []string{"--max-upload-rate", "-1Mi"}, nil, "--max-upload-rate: must not be negative"},
		{"negative min segments", []string{"--swarm-min-segments", "-1"}, nil, "--swarm-min-segments: must not be negative"},
		{"ramp segments", []string{"--swarm-ramp-segments", "-1"}, nil, "--swarm-ramp-segments -1: want 0 or more"},
		{"log level from env", nil, map[string]string{"SHOAL_LOG_LEVEL": "loud"}, `SHOAL_LOG_LEVEL (--log-level) "loud": want debug`},
		{"CA file", []string{"--registry-ca-file", "/nonexistent/ca.pem"}, nil, "--registry-ca-file: "},
		{"membership", []string{"--membership", "gossip"}, nil, `--membership "gossip": want static or kubernetes`},
		{"pinned share", []string{"--membership", "kubernetes", "--node-name", "a", "--p2p-addr", "127.0.0.2:7070", "--max-pinned-share", "1.5"}, nil, "--max-pinned-share 1.5: want a share between 0 and 1"},
		{"kubernetes without node name", []string{"--membership", "kubernetes", "--p2p-addr", "127.0.0.2:7070"}, nil, "--membership kubernetes needs --node-name"},
		{"kubernetes without p2p addr", nil, map[string]string{"SHOAL_MEMBERSHIP": "kubernetes", "SHOAL_NODE_NAME": "a"}, "SHOAL_MEMBERSHIP (--membership) kubernetes needs --p2p-addr"},
		{"node cache status interval", []string{"--membership", "kubernetes", "--node-name", "a", "--p2p-addr", "127.0.0.2:7070", "--node-cache-status-interval", "0s"}, nil, "--node-cache-status-interval 0s: want more than 0"},
		{"node cache store recheck", []string{"--membership", "kubernetes", "--node-name", "a", "--p2p-addr", "127.0.0.2:7070", "--node-cache-store-recheck", "0s"}, nil, "--node-cache-store-recheck 0s: want more than 0"},
		{"node cache runtime recheck", []string{"--membership", "kubernetes", "--node-name", "a", "--p2p-addr", "127.0.0.2:7070", "--node-cache-runtime-recheck", "-1s"}, nil, "--node-cache-runtime-recheck -1s: want more than 0"},
		{"node cache stall timeout", []string{"--membership", "kubernetes", "--node-name", "a", "--p2p-addr", "127.0.0.2:7070", "--node-cache-stall-timeout", "-1s"}, nil, "--node-cache-stall-timeout -1s: want more than 0"},
		{"runtime endpoint not a socket", []string{"--membership", "kubernetes", "--node-name", "a", "--p2p-addr", "127.0.0.2:7070", "--runtime-endpoint", "tcp://10.0.0.1:1"}, nil, `--runtime-endpoint: criruntime: endpoint "tcp://10.0.0.1:1" is not an absolute unix socket path`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			root := newRootCommand()
			root.SetOut(&bytes.Buffer{})
			root.SetErr(&bytes.Buffer{})
			// Harmless settings, should a case pass validation after all; the deadline stops it.
			args := append([]string{"agent", "--data-dir", t.TempDir(), "--containerd-hosts-dir", "", "--containerd-config", "",
				"--metrics-addr", ""}, tt.args...)
			if tt.env["SHOAL_MIRROR_ADDR"] == "" && !strings.Contains(strings.Join(tt.args, " "), "--mirror-addr") {
				args = append(args, "--mirror-addr", "127.0.0.1:0")
			}
			root.SetArgs(args)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := root.ExecuteContext(ctx)
			if err == nil || !strings.HasPrefix(err.Error(), tt.want) {
				t.Errorf("shoal %s = %v, want an error starting %q", strings.Join(args, " "), err, tt.want)
			}
		})
	}
}

// TestAgentFlagsNameConfigFields: every entry of agentFlags names a field of agent.Config and a
// flag of shoal agent.
func TestAgentFlagsNameConfigFields(t *testing.T) {
	cmd := newAgentCommand()
	for field, flag := range agentFlags {
		typ := reflect.TypeFor[agent.Config]()
		for name := range strings.SplitSeq(field, ".") {
			f, ok := typ.FieldByName(name)
			if !ok {
				t.Errorf("agentFlags: agent.Config has no field %s", field)
				break
			}
			typ = f.Type
		}
		if cmd.Flags().Lookup(flag) == nil {
			t.Errorf("agentFlags: %s maps to --%s, which shoal agent does not have", field, flag)
		}
	}
}

// TestOperationsDocListsEveryFlag: the flag table of docs/operations.md has a row for every
// visible flag of shoal agent, with its environment variable, and no flag the agent lacks.
func TestOperationsDocListsEveryFlag(t *testing.T) {
	doc, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	checkFlagRows(t, "docs/operations.md", string(doc), newAgentCommand())
}

// checkFlagRows checks that text, a document or one of its sections, has a table row ("| `--flag`
// | ...", or several flags of one row: "| `--a`, `--b` |") naming its environment variable for
// every visible flag of cmd, and no row for a flag cmd lacks.
func checkFlagRows(t *testing.T, where, text string, cmd *cobra.Command) {
	t.Helper()
	rows := map[string]string{} // flag → its row
	for line := range strings.SplitSeq(text, "\n") {
		if !strings.HasPrefix(line, "| `--") {
			continue
		}
		names, _, _ := strings.Cut(strings.TrimPrefix(line, "| "), " |")
		for name := range strings.SplitSeq(names, ", ") {
			rows[strings.Trim(name, "`-")] = line
		}
	}
	cmd.Flags().VisitAll(func(f *pflag.Flag) {
		if f.Hidden {
			return
		}
		row, ok := rows[f.Name]
		switch {
		case !ok:
			t.Errorf("%s: no row for --%s", where, f.Name)
		case !strings.Contains(row, "`"+envName(f.Name)+"`"):
			t.Errorf("%s: the row of --%s does not name %s", where, f.Name, envName(f.Name))
		}
	})
	for name := range rows {
		if cmd.Flags().Lookup(name) == nil {
			t.Errorf("%s documents --%s, which %s does not have", where, name, cmd.CommandPath())
		}
	}
}
