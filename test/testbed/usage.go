package testbed

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// userHZ is the unit of the CPU times in /proc: the kernel reports them in USER_HZ, which
// is 100 on every architecture Linux supports (whatever CONFIG_HZ is).
const userHZ = 100

// Usage is what a process has used since it started.
type Usage struct {
	CPUSeconds float64 // user + system
	PeakRSS    int64   // bytes, VmHWM
}

// ProcessUsage reads /proc/<pid>/stat and /proc/<pid>/status.
func ProcessUsage(pid int) (Usage, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return Usage{}, fmt.Errorf("read cpu time of pid %d: %w", pid, err)
	}
	// The command name (field 2) may hold spaces; the fields after its ")" are fixed.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return Usage{}, fmt.Errorf("pid %d: malformed /proc stat", pid)
	}
	fields := strings.Fields(string(stat[i+1:]))
	if len(fields) < 13 {
		return Usage{}, fmt.Errorf("pid %d: short /proc stat", pid)
	}
	// fields[0] is field 3 (state); utime and stime are fields 14 and 15.
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err1 != nil || err2 != nil {
		return Usage{}, fmt.Errorf("pid %d: parse cpu times %q %q", pid, fields[11], fields[12])
	}
	u := Usage{CPUSeconds: float64(utime+stime) / userHZ}

	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Usage{}, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return Usage{}, fmt.Errorf("pid %d: parse VmHWM %q", pid, v)
			}
			u.PeakRSS = kb << 10
			return u, nil
		}
	}
	if err := sc.Err(); err != nil {
		return Usage{}, fmt.Errorf("read memory of pid %d: %w", pid, err)
	}
	return Usage{}, fmt.Errorf("pid %d: no VmHWM in /proc status", pid)
}

// MachineCPU is a reading of the machine's CPU counters (/proc/stat); subtract two readings
// to get how busy the machine was between them.
type MachineCPU struct {
	Busy, Total float64 // seconds summed over all CPUs
	// Steal is the part of Busy during which the hypervisor ran other machines on these CPUs
	// while this one had work: a run with much of it was slowed by something outside it.
	Steal float64
}

// ReadMachineCPU reads the aggregate line of /proc/stat.
func ReadMachineCPU() (MachineCPU, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return MachineCPU{}, fmt.Errorf("read /proc/stat: %w", err)
	}
	line, _, _ := strings.Cut(string(data), "\n")
	return parseMachineCPU(line)
}

// parseMachineCPU parses the aggregate "cpu" line of /proc/stat.
func parseMachineCPU(line string) (MachineCPU, error) {
	fields := strings.Fields(line)
	if len(fields) < 5 || fields[0] != "cpu" {
		return MachineCPU{}, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var m MachineCPU
	// user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
	for i, f := range fields[1:min(len(fields), 9)] {
		v, err := strconv.ParseFloat(f, 64)
		if err != nil {
			return MachineCPU{}, fmt.Errorf("/proc/stat: field %q: %w", f, err)
		}
		v /= userHZ
		m.Total += v
		if i != 3 && i != 4 { // idle, iowait
			m.Busy += v
		}
		if i == 7 {
			m.Steal += v
		}
	}
	return m, nil
}

// Sub returns the counters between an earlier reading and m.
func (m MachineCPU) Sub(earlier MachineCPU) MachineCPU {
	return MachineCPU{Busy: m.Busy - earlier.Busy, Total: m.Total - earlier.Total, Steal: m.Steal - earlier.Steal}
}

// StealShare is Steal / Total.
func (m MachineCPU) StealShare() float64 {
	if m.Total <= 0 {
		return 0
	}
	return m.Steal / m.Total
}

// Utilisation is Busy / Total: 1 means every CPU was busy all the time.
func (m MachineCPU) Utilisation() float64 {
	if m.Total <= 0 {
		return 0
	}
	return m.Busy / m.Total
}
