package main

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Every flag of every subcommand can be set from the environment as well, which is how a
// DaemonSet's manifest passes most of them: --mirror-addr from SHOAL_MIRROR_ADDR. The command line
// wins over the environment. A flag that takes a list (pflag.SliceValue: --mirror-registries,
// --registry-endpoint, --peers) takes its entries from its variable separated by commas or
// newlines, so that a manifest can write one entry per line.

// envHelp says so in the commands' help.
const envHelp = `Every flag can also be set from an environment variable: SHOAL_ and the flag's name in upper
snake case (SHOAL_MIRROR_ADDR for --mirror-addr). The command line wins over the environment.
Flags that take a list (--mirror-registries, --registry-endpoint, --peers) take their entries
from their variable separated by commas or newlines.`

// envPrefix starts the name of every variable that sets a flag.
const envPrefix = "SHOAL_"

// envAnnotation marks a flag that its environment variable set, with the variable's name, so
// that an error found later in the flag's value names the variable (flagLabel).
const envAnnotation = "shoal.dev/env"

// envName is the variable that sets a flag: SHOAL_ and the flag's name in upper snake case.
func envName(flag string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// setFlagsFromEnv sets every flag of fs that the command line left unset from its variable in
// environ (in os.Environ's form), if that is there. An error names the variable.
func setFlagsFromEnv(fs *pflag.FlagSet, environ []string) error {
	vars := make(map[string]string, len(environ))
	for _, kv := range environ {
		if name, value, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(name, envPrefix) {
			vars[name] = value
		}
	}
	var errs []error
	fs.VisitAll(func(f *pflag.Flag) {
		name := envName(f.Name)
		value, ok := vars[name]
		if f.Changed || !ok || f.Name == "help" {
			return
		}
		if err := setFromEnv(fs, f, value); err != nil {
			errs = append(errs, fmt.Errorf("environment variable %s (--%s): %w", name, f.Name, err))
			return
		}
		_ = fs.SetAnnotation(f.Name, envAnnotation, []string{name}) // the flag exists: no error
	})
	return errors.Join(errs...)
}

func setFromEnv(fs *pflag.FlagSet, f *pflag.Flag, value string) error {
	list, ok := f.Value.(pflag.SliceValue)
	if !ok {
		err := fs.Set(f.Name, value)
		// pflag's message names the flag as if given on the command line; keep only the cause.
		if invalid := (*pflag.InvalidValueError)(nil); errors.As(err, &invalid) {
			return invalid.Unwrap()
		}
		return err
	}
	entries := strings.FieldsFunc(value, func(r rune) bool { return r == ',' || r == '\n' })
	for i := range entries {
		entries[i] = strings.TrimSpace(entries[i])
	}
	if err := list.Replace(slices.DeleteFunc(entries, func(e string) bool { return e == "" })); err != nil {
		return err
	}
	f.Changed = true
	return nil
}

// unknownEnv returns, sorted, the SHOAL_ variables in environ that set no flag of any command
// under root: most likely misspelt.
func unknownEnv(root *cobra.Command, environ []string) []string {
	known := map[string]bool{}
	var walk func(*cobra.Command)
	walk = func(c *cobra.Command) {
		add := func(f *pflag.Flag) {
			if f.Name != "help" {
				known[envName(f.Name)] = true
			}
		}
		c.Flags().VisitAll(add)
		c.PersistentFlags().VisitAll(add)
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	var unknown []string
	for _, kv := range environ {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, envPrefix) && !known[name] {
			unknown = append(unknown, name)
		}
	}
	slices.Sort(unknown)
	return slices.Compact(unknown)
}

// applyEnv sets cmd's flags from environ and warns about SHOAL_ variables that no command of
// shoal reads. The root command runs it before every subcommand.
func applyEnv(cmd *cobra.Command, environ []string) error {
	if err := setFlagsFromEnv(cmd.Flags(), environ); err != nil {
		return err
	}
	if unknown := unknownEnv(cmd.Root(), environ); len(unknown) > 0 {
		log, err := commandLogger(cmd)
		if err != nil {
			return err
		}
		log.Warn("ignoring environment variables that set no flag of shoal; check their spelling",
			"variables", unknown)
	}
	return nil
}

// flagLabel names a flag of fs in an error: "--mirror-addr", or "SHOAL_MIRROR_ADDR
// (--mirror-addr)" when the flag was set from the environment.
func flagLabel(fs *pflag.FlagSet, name string) string {
	if f := fs.Lookup(name); f != nil {
		if env := f.Annotations[envAnnotation]; len(env) == 1 {
			return env[0] + " (--" + name + ")"
		}
	}
	return "--" + name
}
