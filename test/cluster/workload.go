package cluster

import (
	"context"
	"fmt"
	"os"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/internal/imagebuild"
	"github.com/shoal-dev/shoal/test/harness"
)

// busyboxPath is Debian's busybox-static, the shell of the cluster's workload images.
const busyboxPath = "/bin/busybox"

// BusyboxLayer is a layer with a static busybox at /bin/busybox and /bin/sh and /bin/sleep
// linked to it: enough for a workload image that runs.
func BusyboxLayer() (v1.Layer, error) {
	data, err := os.ReadFile(busyboxPath)
	if err != nil {
		return nil, fmt.Errorf("busybox (apt install busybox-static): %w", err)
	}
	return imagebuild.Layer([]imagebuild.File{
		{Path: "bin/busybox", Mode: 0o755, Data: data},
		{Path: "bin/sh", Linkname: "busybox"},
		{Path: "bin/sleep", Linkname: "busybox"},
		{Path: "tmp/", Mode: 0o1777},
	})
}

// PushWorkloadImage pushes an image that runs (busybox, sleeping) with layers random layers of
// layerSize bytes on top, as repoTag in the cluster's registry.
func (c *Cluster) PushWorkloadImage(ctx context.Context, repoTag string, layers int, layerSize int64) (*harness.Image, error) {
	base, err := BusyboxLayer()
	if err != nil {
		return nil, err
	}
	return harness.PushImage(ctx, c.tb.RegistryHost(), repoTag, harness.ImageSpec{
		Layers: layers, LayerSize: layerSize, Base: []v1.Layer{base}, Cmd: []string{"/bin/sleep", "86400"},
	})
}
