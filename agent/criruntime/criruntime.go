// Package criruntime imports images into the node's container runtime the way kubelet pulls
// them (CRI PullImage, which goes through the node's registry mirror, so the bytes come from
// the agent's store) and pins them there with containerd's io.cri-containerd.pinned image
// label, which containerd reports as the CRI image's pinned flag and kubelet's image garbage
// collector honours.
//
// Pins have an owner: every image record this package pins also carries OwnerLabel, and Unpin
// changes only records that carry it, so images that a user or containerd's own configuration
// pinned (the sandbox image) stay pinned. Nothing here ever removes an image: an unpinned image
// is left to kubelet's garbage collector, which never removes images that containers use.
//
// containerd before 1.7 has no pinned images: the label is set, but CRI never reports the image
// pinned, and Pin says so (Imported, not Pinned).
package criruntime

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Labels on containerd image records.
const (
	// PinnedLabel and PinnedValue are containerd's mark of a pinned image.
	PinnedLabel = "io.cri-containerd.pinned"
	PinnedValue = "pinned"
	// OwnerLabel marks the pins this package made.
	OwnerLabel = "shoal.dev/pinned"
	ownerValue = "true"
)

// DefaultNamespace is the containerd namespace of the CRI plugin's images.
const DefaultNamespace = "k8s.io"

// State is where an image stands in the runtime.
type State int

// The states of an image.
const (
	// Absent: the runtime does not have the image.
	Absent State = iota
	// Imported: the runtime has the image, not pinned.
	Imported
	// Pinned: the runtime has the image and reports it pinned.
	Pinned
)

func (s State) String() string {
	switch s {
	case Imported:
		return "Imported"
	case Pinned:
		return "Pinned"
	}
	return "Absent"
}

// ErrCannotPin is returned by Pin when the runtime took the label but does not report the
// image pinned (containerd before 1.7).
var ErrCannotPin = errors.New("the container runtime does not pin images (containerd 1.7 or newer does)")

// Runtime is a containerd reached through its socket: the CRI image service to pull and inspect
// images, containerd's image service to label them.
type Runtime struct {
	conn      *grpc.ClientConn
	cri       runtimeapi.ImageServiceClient
	images    imagesapi.ImagesClient
	namespace string
	// pins is what the runtime was found to do with the pinned label: 0 not known yet, 1 it
	// reports such images pinned, -1 it does not (containerd before 1.7).
	pins atomic.Int32
}

// pinWait bounds how long Pin waits for CRI to report a labelled image pinned: containerd's
// CRI plugin learns of the label from an image event, a few milliseconds after the update.
const pinWait = 2 * time.Second

// Dial returns a Runtime for the containerd listening at endpoint (a socket path, or
// unix:///path as kubelet's --container-runtime-endpoint writes it), whose CRI images live in
// namespace ("" = DefaultNamespace). It connects on first use.
func Dial(endpoint, namespace string) (*Runtime, error) {
	path, err := SocketPath(endpoint)
	if err != nil {
		return nil, err
	}
	if namespace == "" {
		namespace = DefaultNamespace
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("criruntime: %w", err)
	}
	return &Runtime{
		conn:      conn,
		cri:       runtimeapi.NewImageServiceClient(conn),
		images:    imagesapi.NewImagesClient(conn),
		namespace: namespace,
	}, nil
}

// SocketPath returns the socket path of endpoint, a path or unix:///path.
func SocketPath(endpoint string) (string, error) {
	path := strings.TrimPrefix(endpoint, "unix://")
	if path == "" || !strings.HasPrefix(path, "/") {
		return "", fmt.Errorf("criruntime: endpoint %q is not an absolute unix socket path (unix:///run/containerd/containerd.sock)", endpoint)
	}
	return path, nil
}

// Close closes the connection.
func (r *Runtime) Close() error { return r.conn.Close() }

// ns adds the containerd namespace to ctx, for calls to containerd's own services.
func (r *Runtime) ns(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "containerd-namespace", r.namespace)
}

// Import pulls ref (registry/repository@digest) into the runtime through CRI, as kubelet would.
// The runtime resolves the registry through its hosts configuration, so the pull goes through
// the node's mirror first.
func (r *Runtime) Import(ctx context.Context, ref string) error {
	if _, err := r.cri.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
		return fmt.Errorf("CRI pull %s: %w", ref, err)
	}
	return nil
}

// Status says whether the runtime has ref and whether it reports it pinned.
func (r *Runtime) Status(ctx context.Context, ref string) (State, error) {
	resp, err := r.cri.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return Absent, fmt.Errorf("CRI image status %s: %w", ref, err)
	}
	switch img := resp.GetImage(); {
	case img == nil:
		return Absent, nil
	case img.GetPinned():
		return Pinned, nil
	}
	return Imported, nil
}

// Pin pins ref, which the runtime must have, and returns its state: Pinned, or Imported with
// ErrCannotPin when the runtime does not pin. An image pinned already by someone else stays
// theirs: it is not marked as this package's, so Unpin leaves it pinned.
func (r *Runtime) Pin(ctx context.Context, ref string) (State, error) {
	got, err := r.images.Get(r.ns(ctx), &imagesapi.GetImageRequest{Name: ref})
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return Absent, fmt.Errorf("pin %s: the runtime has no such image", ref)
		}
		return Absent, fmt.Errorf("pin %s: %w", ref, err)
	}
	if img := got.GetImage(); img.GetLabels()[PinnedLabel] != PinnedValue {
		if img.Labels == nil {
			img.Labels = map[string]string{}
		}
		img.Labels[PinnedLabel], img.Labels[OwnerLabel] = PinnedValue, ownerValue
		if err := r.update(ctx, img, PinnedLabel, OwnerLabel); err != nil {
			return Absent, fmt.Errorf("pin %s: %w", ref, err)
		}
	}
	// containerd's CRI plugin applies the label when its event arrives: wait for it, unless
	// this runtime is known not to pin.
	deadline := time.Now().Add(pinWait)
	for {
		st, err := r.Status(ctx, ref)
		switch {
		case err != nil:
			return Absent, err
		case st == Pinned:
			r.pins.Store(1)
			return Pinned, nil
		case st == Absent:
			return Absent, fmt.Errorf("pin %s: the image is gone", ref)
		case r.pins.Load() == -1 || time.Now().After(deadline):
			if r.pins.Load() == 1 {
				return Imported, fmt.Errorf("pin %s: labelled, but the runtime does not report it pinned after %s", ref, pinWait)
			}
			r.pins.Store(-1)
			return Imported, fmt.Errorf("pin %s: %w", ref, ErrCannotPin)
		}
		select {
		case <-ctx.Done():
			return Imported, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Unpin removes the pin this package put on ref. A pin someone else made stays; an image
// the runtime no longer has is not an error. It returns once the runtime no longer reports
// the pin (bounded by the same wait as Pin).
func (r *Runtime) Unpin(ctx context.Context, ref string) error {
	got, err := r.images.Get(r.ns(ctx), &imagesapi.GetImageRequest{Name: ref})
	if err != nil {
		if status.Code(err) == codes.NotFound {
			return nil
		}
		return fmt.Errorf("unpin %s: %w", ref, err)
	}
	img := got.GetImage()
	if img.GetLabels()[OwnerLabel] != ownerValue {
		return nil
	}
	// Labels named in the mask and missing from the image are removed.
	delete(img.Labels, PinnedLabel)
	delete(img.Labels, OwnerLabel)
	if err := r.update(ctx, img, PinnedLabel, OwnerLabel); err != nil {
		return fmt.Errorf("unpin %s: %w", ref, err)
	}
	// As with Pin, the CRI plugin sees the change when its event arrives: return once it no
	// longer reports the pin, so that a status read next is true.
	deadline := time.Now().Add(pinWait)
	for {
		st, err := r.Status(ctx, ref)
		switch {
		case err != nil:
			return fmt.Errorf("unpin %s: %w", ref, err)
		case st != Pinned:
			return nil
		case time.Now().After(deadline):
			return fmt.Errorf("unpin %s: unlabelled, but the runtime still reports it pinned after %s", ref, pinWait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// PinnedByOwner lists the names of the image records this package pinned.
func (r *Runtime) PinnedByOwner(ctx context.Context) ([]string, error) {
	resp, err := r.images.List(r.ns(ctx), &imagesapi.ListImagesRequest{
		Filters: []string{fmt.Sprintf("labels.%q==%s", OwnerLabel, ownerValue)},
	})
	if err != nil {
		return nil, fmt.Errorf("list pinned images: %w", err)
	}
	names := make([]string, 0, len(resp.GetImages()))
	for _, img := range resp.GetImages() {
		names = append(names, img.GetName())
	}
	return names, nil
}

// update writes the labels of img named in labels, and nothing else. img must be the record as
// read, target included: containerd 2.4 dereferences the target of every update, even one
// whose mask leaves it alone, and a request without one crashes the daemon.
func (r *Runtime) update(ctx context.Context, img *imagesapi.Image, labels ...string) error {
	paths := make([]string, len(labels))
	for i, l := range labels {
		paths[i] = "labels." + l
	}
	_, err := r.images.Update(r.ns(ctx), &imagesapi.UpdateImageRequest{
		Image: img, UpdateMask: &fieldmaskpb.FieldMask{Paths: paths},
	})
	return err
}
