package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/shoal-dev/shoal/test/harness"
)

// stopGrace is how long the controller gets to exit after SIGTERM before it is killed.
const stopGrace = 15 * time.Second

// controllerProcess is one `shoal controller` child, signalled by its own PID only.
type controllerProcess struct {
	cmd        *exec.Cmd
	logPath    string
	metricsURL string
	readyURL   string
	http       *http.Client
	done       chan struct{} // closed once the process has been reaped
	waitErr    error         // set before done is closed
}

// startController runs `shoal controller` against the API server of kubeconfig, with the
// registry at registryHost as registryName, its log in dir.
func startController(bin, dir string, round int, kubeconfig, registryHost string, seedTTL time.Duration) (*controllerProcess, error) {
	ports, err := harness.FreePorts(2)
	if err != nil {
		return nil, err
	}
	metricsAddr := "127.0.0.1:" + strconv.Itoa(ports[0])
	healthAddr := "127.0.0.1:" + strconv.Itoa(ports[1])
	logPath := filepath.Join(dir, fmt.Sprintf("controller-%d.log", round))
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child has its own copy once started
	cmd := exec.Command(bin, "controller",
		"--kubeconfig", kubeconfig,
		"--leader-elect=false",
		"--metrics-addr", metricsAddr,
		"--health-addr", healthAddr,
		"--registry-endpoint", registryName+"=http://"+registryHost,
		"--seed-ttl", seedTTL.String(),
		"--graceful-shutdown", "5s",
	)
	cmd.Env = harness.ChildEnv() // the controller talks to loopback only
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// If the benchmark dies without cleaning up, the kernel kills the controller.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s controller: %w", bin, err)
	}
	c := &controllerProcess{
		cmd: cmd, logPath: logPath,
		metricsURL: "http://" + metricsAddr + "/metrics",
		readyURL:   "http://" + healthAddr + "/readyz",
		http:       &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: nil}},
		done:       make(chan struct{}),
	}
	go func() {
		c.waitErr = cmd.Wait()
		close(c.done)
	}()
	return c, nil
}

func (c *controllerProcess) pid() int { return c.cmd.Process.Pid }

func (c *controllerProcess) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// waitReady polls /readyz until the controller's caches have synced, it exits, or ctx ends.
func (c *controllerProcess) waitReady(ctx context.Context) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.readyURL, nil)
		if err != nil {
			return err
		}
		if resp, err := c.http.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-c.done:
			return fmt.Errorf("before it was ready: %w", c.exitError())
		case <-ctx.Done():
			return fmt.Errorf("waiting for the controller to be ready: %w; log %s:\n%s", ctx.Err(), c.logPath, logTail(c.logPath))
		case <-tick.C:
		}
	}
}

// scrape reads the controller's /metrics.
func (c *controllerProcess) scrape(ctx context.Context) (harness.Metrics, error) {
	m, err := harness.ScrapeMetrics(ctx, c.http, c.metricsURL)
	if err != nil {
		return nil, fmt.Errorf("controller: %w", err)
	}
	return m, nil
}

// stop sends SIGTERM, waits up to stopGrace, then SIGKILLs; it returns once the process has
// been reaped.
func (c *controllerProcess) stop() error {
	if c.exited() {
		return nil
	}
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("terminate controller (pid %d): %w", c.pid(), err)
	}
	timer := time.NewTimer(stopGrace)
	defer timer.Stop()
	select {
	case <-c.done:
		return nil
	case <-timer.C:
	}
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill controller (pid %d): %w", c.pid(), err)
	}
	<-c.done
	return fmt.Errorf("controller (pid %d) ignored SIGTERM for %s and was killed", c.pid(), stopGrace)
}

// peakRSS is the process's VmHWM in bytes.
func peakRSS(pid int) (int64, error) { return statusBytes(pid, "VmHWM:") }

// rss is the process's VmRSS in bytes.
func rss(pid int) (int64, error) { return statusBytes(pid, "VmRSS:") }

func statusBytes(pid int, field string) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), field); ok {
			kib, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("pid %d %s %q: %w", pid, field, rest, err)
			}
			return kib << 10, nil
		}
	}
	return 0, fmt.Errorf("pid %d: no %s in /proc status", pid, field)
}

// childrenNamed finds this process's children by command name (e.g. the kube-apiserver and
// etcd that envtest started), from /proc.
func childrenNamed(names ...string) (map[string]int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	self := os.Getpid()
	out := map[string]int{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue // gone meanwhile
		}
		open, closing := bytes.IndexByte(stat, '('), bytes.LastIndexByte(stat, ')')
		if open < 0 || closing < open {
			continue
		}
		comm := string(stat[open+1 : closing])
		fields := strings.Fields(string(stat[closing+1:]))
		if len(fields) < 2 {
			continue
		}
		if ppid, err := strconv.Atoi(fields[1]); err != nil || ppid != self {
			continue
		}
		for _, name := range names {
			if comm == name {
				out[name] = pid
			}
		}
	}
	return out, nil
}

// exitError says how the controller ended, with the end of its log; call it once done is closed.
func (c *controllerProcess) exitError() error {
	err := c.waitErr
	if err == nil {
		err = errors.New("exit status 0")
	}
	return fmt.Errorf("controller exited: %w; log %s:\n%s", err, c.logPath, logTail(c.logPath))
}

// logTailLines is how much of the controller's log an error quotes.
const logTailLines = 20

func logTail(path string) string {
	lines := logTailLines
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	all := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return string(bytes.Join(all, []byte("\n")))
}

// histogramQuantile is the q-quantile of the histogram family name, summed over its series,
// interpolated linearly within the bucket that holds it, as Prometheus' histogram_quantile
// does; a quantile in the +Inf bucket is the highest finite bound. It also returns the count.
func histogramQuantile(m harness.Metrics, name string, q float64) (float64, uint64) {
	fam, ok := m[name]
	if !ok {
		return math.NaN(), 0
	}
	counts := map[float64]uint64{}
	var total uint64
	for _, s := range fam.GetMetric() {
		h := s.GetHistogram()
		if h == nil {
			continue
		}
		total += h.GetSampleCount()
		for _, b := range h.GetBucket() {
			counts[b.GetUpperBound()] += b.GetCumulativeCount()
		}
	}
	return bucketQuantile(counts, total, q), total
}

// bucketQuantile interpolates the q-quantile from cumulative bucket counts by upper bound and
// the total count.
func bucketQuantile(cumulative map[float64]uint64, total uint64, q float64) float64 {
	if total == 0 {
		return math.NaN()
	}
	bounds := make([]float64, 0, len(cumulative))
	for b := range cumulative {
		if !math.IsInf(b, +1) {
			bounds = append(bounds, b)
		}
	}
	sort.Float64s(bounds)
	rank := q * float64(total)
	lower, below := 0.0, uint64(0)
	for _, b := range bounds {
		c := cumulative[b]
		if float64(c) >= rank {
			if c == below {
				return b
			}
			return lower + (b-lower)*(rank-float64(below))/float64(c-below)
		}
		lower, below = b, c
	}
	if len(bounds) == 0 {
		return math.NaN()
	}
	return bounds[len(bounds)-1]
}

// sumBy sums the series of family name by the value of label.
func sumBy(m harness.Metrics, name, label string) map[string]float64 {
	out := map[string]float64{}
	fam, ok := m[name]
	if !ok {
		return out
	}
	for _, s := range fam.GetMetric() {
		out[labelValue(s, label)] += value(s)
	}
	return out
}

func labelValue(s *dto.Metric, name string) string {
	for _, l := range s.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func value(s *dto.Metric) float64 {
	switch {
	case s.Counter != nil:
		return s.Counter.GetValue()
	case s.Gauge != nil:
		return s.Gauge.GetValue()
	case s.Untyped != nil:
		return s.Untyped.GetValue()
	}
	return 0
}
