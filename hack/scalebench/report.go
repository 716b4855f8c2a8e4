package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
)

// setup is what the run was given.
type setup struct {
	Nodes         int            `json:"nodes"`
	NodePlatforms map[string]int `json:"node_platforms"`
	Images        int            `json:"images"`
	Indexes       int            `json:"indexes"`
	Manifests     int            `json:"manifests_to_seed"`
	Layers        int            `json:"layers"`
	LayerBytes    int64          `json:"layer_bytes"`
	Rate          float64        `json:"rate_pods_per_s"`
	Concurrency   int            `json:"concurrency"`
	SeedTTL       string         `json:"seed_ttl"`
	Args          []string       `json:"args"`
	K8s           string         `json:"kubernetes"`
	Cores         int            `json:"cores"`
}

// seedTiming is one manifest's SwarmSeed against its image's first pod.
type seedTiming struct {
	Image    string  `json:"image"`
	Manifest string  `json:"manifest"`
	Platform string  `json:"platform"`
	Watch    float64 `json:"watch_s"`  // seen by the watch − the first pod's create answered
	Stamps   float64 `json:"stamps_s"` // creationTimestamp − the first pod's (whole seconds)
	Relisted bool    `json:"relisted,omitempty"`
}

// result is one round.
type result struct {
	Round         int    `json:"round"`
	Pods          int    `json:"pods"`
	PodsCreated   int    `json:"pods_created"`
	PodErrors     int    `json:"pod_errors"`
	FirstPodError string `json:"first_pod_error,omitempty"`
	Images        int    `json:"images"`
	Manifests     int    `json:"manifests_to_seed"`

	ControllerReady   float64 `json:"controller_ready_s"`
	ControllerSettled float64 `json:"controller_settled_s"`
	// PhaseStart is when the first pod was sent, on the timeline's clock (the controller's start).
	PhaseStart    float64 `json:"pod_phase_start_s"`
	CreateSeconds float64 `json:"create_s"` // first pod's request to the last pod's answer
	CreateRate    float64 `json:"create_rate_pods_per_s"`
	// CaughtUp is from the last pod's creation until the controller had looked at every pod.
	CaughtUp float64 `json:"caught_up_s"`
	// Wall is from the first pod's creation until every manifest was seeded and the
	// controller's queues were empty.
	Wall float64 `json:"wall_s"`

	SeedsWritten       int          `json:"seeds_written"`
	UnexpectedSeeds    int          `json:"unexpected_seeds"`
	SeedsCreatedMetric float64      `json:"swarmseeds_created_total"`
	Seeds              []seedTiming `json:"seeds"`

	// Requests are the controller's from the first pod to the end, from the audit log.
	Requests          requests `json:"requests"`
	WritesPerImage    float64  `json:"writes_per_image"`
	WritesPerManifest float64  `json:"writes_per_manifest"`
	// ClientWrites is the same from the controller's rest_client_requests_total (POST, PUT,
	// PATCH, DELETE).
	ClientWrites float64 `json:"client_writes"`

	HistP50      float64 `json:"seed_latency_histogram_p50_s"`
	HistP99      float64 `json:"seed_latency_histogram_p99_s"`
	HistCount    uint64  `json:"seed_latency_histogram_count"`
	WatchLatency spread  `json:"watch_latency_s"`
	StampLatency spread  `json:"stamp_latency_s"`

	Reconciles        map[string]float64 `json:"reconciles"`
	PodsLookedAt      float64            `json:"seed_pods_total"`
	ImagesResolved    float64            `json:"seed_images_resolved_total"`
	ResolveFailures   float64            `json:"seed_resolve_failures_total"`
	Resolutions       float64            `json:"resolutions_total"`
	RegistryManifests int64              `json:"registry_manifest_requests"`
	RegistryBlobs     int64              `json:"registry_blob_requests"`

	PeakRSS  int64 `json:"controller_peak_rss_bytes"`
	PeakHeap int64 `json:"controller_peak_heap_inuse_bytes"`

	// CPU is CPU seconds during the pod phase by process; CPUAvailable all cores' seconds.
	CPU          map[string]float64 `json:"cpu_s"`
	CPUAvailable float64            `json:"cpu_available_s"`
	MachineCPU   float64            `json:"machine_cpu"`
	MachineSteal float64            `json:"machine_steal"`

	Timeline []sample `json:"timeline"`
}

// report is the whole run.
type report struct {
	Date    string         `json:"date"`
	Config  setup          `json:"config"`
	Startup *startup       `json:"startup,omitempty"`
	Rounds  []*result      `json:"rounds"`
	Prewarm *prewarmResult `json:"prewarm,omitempty"`
}

func writeJSON(path string, r *report) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

func printTable(w io.Writer, r *report) { fmt.Fprint(w, "\n"+markdown(r)) }

// markdown renders the section that goes between the scale markers.
func markdown(r *report) string {
	var b strings.Builder
	c := r.Config
	names := make([]string, 0, len(c.NodePlatforms))
	for p := range c.NodePlatforms {
		names = append(names, p)
	}
	slices.Sort(names)
	platforms := make([]string, 0, len(names))
	for _, p := range names {
		platforms = append(platforms, fmt.Sprintf("%s %s", thousands(c.NodePlatforms[p]), p))
	}
	fmt.Fprintf(&b, "Measured %s with `%s` (kube-apiserver %s and etcd through envtest, %d cores): %s Nodes (%s); "+
		"%d images of %d layers of %s, %d of them indexes of linux/amd64, linux/arm64 and linux/s390x (no node is s390x): "+
		"%d manifests to seed. Pods are created at up to %s/s, %d at once, each image's in one run after the other's; "+
		"every other pod is bound to a node. `--seed-ttl %s`, so that no SwarmSeed expires during the run.\n\n",
		r.Date, strings.Join(append([]string{"go run ./hack/scalebench"}, c.Args...), " "), c.K8s, c.Cores,
		thousands(c.Nodes), strings.Join(platforms, ", "),
		c.Images, c.Layers, size(c.LayerBytes), c.Indexes, c.Manifests, strconv.FormatFloat(c.Rate, 'f', -1, 64), c.Concurrency, c.SeedTTL)
	if s := r.Startup; s != nil {
		fmt.Fprintf(&b, "Start of the first controller, before any pod: ready (caches synced) after %.1f s; one NodeCache per Node and "+
			"nothing queued after %.1f s, with %s API writes (%s) and a peak heap of %s.\n\n",
			s.Ready, s.Settled, thousands(s.Requests.writes()), writeList(s.Requests), size(s.PeakHeap))
	}
	if len(r.Rounds) == 0 {
		b.WriteString("No round completed.\n")
		return b.String()
	}
	b.WriteString("| figure |")
	for _, res := range r.Rounds {
		fmt.Fprintf(&b, " %s pods |", thousands(res.Pods))
	}
	b.WriteString("\n| --- |")
	for range r.Rounds {
		b.WriteString(" ---: |")
	}
	b.WriteString("\n")
	row := func(label string, cell func(*result) string) {
		b.WriteString("| " + label + " |")
		for _, res := range r.Rounds {
			b.WriteString(" " + cell(res) + " |")
		}
		b.WriteString("\n")
	}
	row("pods created", func(res *result) string {
		s := fmt.Sprintf("%s in %.1f s (%.0f/s)", thousands(res.PodsCreated), res.CreateSeconds, res.CreateRate)
		if res.PodErrors > 0 {
			s += fmt.Sprintf("; %d failed", res.PodErrors)
		}
		return s
	})
	row("SwarmSeeds written / manifests to seed", func(res *result) string {
		s := fmt.Sprintf("%d / %d", res.SeedsWritten, res.Manifests)
		if res.UnexpectedSeeds > 0 {
			s += fmt.Sprintf(" (and %d not asked for)", res.UnexpectedSeeds)
		}
		return s
	})
	row("controller's API writes while the pods came (audit log)", func(res *result) string {
		return fmt.Sprintf("%s: %s", thousands(res.Requests.writes()), writeList(res.Requests))
	})
	row("**writes per distinct image** (per manifest)", func(res *result) string {
		return fmt.Sprintf("**%.2f** (%.2f)", res.WritesPerImage, res.WritesPerManifest)
	})
	row("writes by the controller's own count (`rest_client_requests_total`)", func(res *result) string {
		return thousands(int(res.ClientWrites))
	})
	row("seed latency, controller's histogram p50 / p99", func(res *result) string {
		return fmt.Sprintf("%s / %s s (%d seeds)", secs(res.HistP50), secs(res.HistP99), res.HistCount)
	})
	row("first pod of an image created → its SwarmSeed seen by a watch, p50 / p99 / max", func(res *result) string {
		return fmt.Sprintf("%s / %s / %s ms", ms(res.WatchLatency.P50), ms(res.WatchLatency.P99), ms(res.WatchLatency.Max))
	})
	row("the same from creationTimestamps (whole seconds), p50 / p99", func(res *result) string {
		return fmt.Sprintf("%.0f / %.0f s", res.StampLatency.P50, res.StampLatency.P99)
	})
	row("controller had looked at every pod (polled every 250 ms)", func(res *result) string {
		return fmt.Sprintf("%.1f s after the last was created", res.CaughtUp)
	})
	row("reconciles", func(res *result) string { return reconcileList(res.Reconciles) })
	row("images resolved (registry manifest requests)", func(res *result) string {
		return fmt.Sprintf("%s (%s)", thousands(int(res.ImagesResolved)), thousands(int(res.RegistryManifests)))
	})
	row("controller peak RSS / peak heap in use", func(res *result) string {
		return fmt.Sprintf("%s / %s", size(res.PeakRSS), size(res.PeakHeap))
	})
	row("controller CPU while the pods came", func(res *result) string {
		return fmt.Sprintf("%.1f s (%s of the cores)", res.CPU["controller"], share(res.CPU["controller"], res.CPUAvailable))
	})
	row("machine CPU: all (controller, kube-apiserver, etcd, benchmark)", func(res *result) string {
		s := fmt.Sprintf("%.0f %% (%s, %s, %s, %s)", 100*res.MachineCPU, share(res.CPU["controller"], res.CPUAvailable),
			share(res.CPU["kube-apiserver"], res.CPUAvailable), share(res.CPU["etcd"], res.CPUAvailable), share(res.CPU["benchmark"], res.CPUAvailable))
		if res.MachineSteal >= 0.01 {
			s += fmt.Sprintf("; steal %.0f %%", 100*res.MachineSteal)
		}
		return s
	})
	row("wall: first pod → every manifest seeded, controller idle", func(res *result) string {
		return fmt.Sprintf("%.1f s", res.Wall)
	})
	if len(r.Rounds) >= 2 {
		b.WriteString("\n" + growth(r.Rounds[0], r.Rounds[len(r.Rounds)-1]) + "\n")
	}
	b.WriteString("\nWrites are the controller's create, update, patch and delete requests from the first pod to the end, " +
		"counted in the API server's audit log (the controller is a user of its own, `" + controllerUser + "`, bound to the generated ClusterRole) " +
		"and by the controller itself; an index's amd64 and arm64 manifests are a SwarmSeed each. " +
		"A SwarmSeed's delete comes `--seed-ttl` after its create, after the run. " +
		"The controller's histogram measures from the pod's creationTimestamp, which the API server keeps in whole seconds, " +
		"so each observation is up to a second high (and interpolated in buckets that double from 50 ms); " +
		"the watch row is the same interval on the benchmark's clock, from the answer to the first create of a pod of the image " +
		"to the SwarmSeed's watch event, as an agent sees it (nearest rank over one value per manifest). " +
		"Peak RSS is VmHWM over the controller's life; peak heap the highest `go_memstats_heap_inuse_bytes` of one sample a second, " +
		"garbage not yet collected included. CPU is over the pod phase; the machine's total includes whatever else ran on it.\n")
	return b.String()
}

// growth says what grew with the pods between two rounds: the writes per image (they must
// not) and the controller's memory per pod.
func growth(a, b *result) string {
	writes := fmt.Sprintf("Writes per distinct image: %.2f with %s pods, %.2f with %s", a.WritesPerImage, thousands(a.Pods), b.WritesPerImage, thousands(b.Pods))
	if a.Requests.writes() == b.Requests.writes() {
		writes += ": they do not grow with the pods."
	} else {
		writes += fmt.Sprintf(": **they grew with the pods** (%s, then %s).", writeList(a.Requests), writeList(b.Requests))
	}
	pods := float64(b.Pods - a.Pods)
	return fmt.Sprintf("%s The controller's memory does, with the pending pods its cache holds: %.1f KiB of peak heap in use "+
		"and %.1f KiB of peak RSS more per pod.", writes,
		float64(b.PeakHeap-a.PeakHeap)/pods/1024, float64(b.PeakRSS-a.PeakRSS)/pods/1024)
}

// writeList is "create swarmseeds 60, …" by count, largest first.
func writeList(r requests) string {
	if len(r.Writes) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(r.Writes))
	for k := range r.Writes {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int {
		if r.Writes[a] != r.Writes[b] {
			return r.Writes[b] - r.Writes[a]
		}
		return strings.Compare(a, b)
	})
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		p := fmt.Sprintf("%s %s", k, thousands(r.Writes[k]))
		if n := r.Refused[k]; n > 0 {
			p += fmt.Sprintf(" (%s refused)", thousands(n))
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, ", ")
}

func reconcileList(m map[string]float64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %s", k, thousands(int(m[k]))))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// thousands formats n with commas: 20,000.
func thousands(n int) string {
	s := strconv.Itoa(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	if neg {
		s = "-" + s
	}
	return s
}

// size is bytes in KiB or MiB.
func size(n int64) string {
	if n < 1<<20 {
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20))
}

func secs(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

func ms(v float64) string {
	if math.IsNaN(v) {
		return "–"
	}
	return strconv.FormatFloat(v*1000, 'f', 0, 64)
}

func share(part, whole float64) string {
	if whole <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f %%", 100*part/whole)
}

// markers are the lines that bound section name of the doc, e.g. <!-- BEGIN scale -->.
func markers(name string) (begin, end string) {
	return "<!-- BEGIN " + name + " -->", "<!-- END " + name + " -->"
}

// writeDoc replaces what is between section name's markers in path and leaves the rest of the
// file as it was.
func writeDoc(path, name, body string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	text, err := replaceSection(string(data), name, body)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return os.WriteFile(path, []byte(text), 0o644)
}

func replaceSection(text, name, body string) (string, error) {
	beginMarker, endMarker := markers(name)
	begin, end := strings.Index(text, beginMarker), strings.Index(text, endMarker)
	if begin < 0 || end < begin {
		return "", fmt.Errorf("no %s … %s section", beginMarker, endMarker)
	}
	return text[:begin+len(beginMarker)] + "\n" + body + text[end:], nil
}
