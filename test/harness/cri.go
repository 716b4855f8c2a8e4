package harness

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// CRIClient calls the CRI image service over a container runtime's socket: the path kubelet
// pulls images by, which honours containerd's registry config_path (hosts.toml).
type CRIClient struct {
	conn   *grpc.ClientConn
	images runtimeapi.ImageServiceClient
}

// DialCRI returns a client for the runtime listening on the unix socket at path. It
// connects lazily, on the first call.
func DialCRI(path string) (*CRIClient, error) {
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("CRI client for %s: %w", path, err)
	}
	return &CRIClient{conn: conn, images: runtimeapi.NewImageServiceClient(conn)}, nil
}

// PullImage pulls ref (e.g. "registry.test/test/app:v1") and returns the image id the
// runtime reports.
func (c *CRIClient) PullImage(ctx context.Context, ref string) (string, error) {
	resp, err := c.images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return "", fmt.Errorf("CRI pull %s: %w", ref, err)
	}
	return resp.GetImageRef(), nil
}

// RemoveImage removes ref from the runtime; removing an absent image is not an error.
func (c *CRIClient) RemoveImage(ctx context.Context, ref string) error {
	if _, err := c.images.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}}); err != nil {
		return fmt.Errorf("CRI remove %s: %w", ref, err)
	}
	return nil
}

// ImageStatus returns what the runtime knows about ref, or nil when it does not have it.
func (c *CRIClient) ImageStatus(ctx context.Context, ref string) (*runtimeapi.Image, error) {
	resp, err := c.images.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return nil, fmt.Errorf("CRI image status %s: %w", ref, err)
	}
	return resp.GetImage(), nil
}

// ListImages lists every image the runtime holds.
func (c *CRIClient) ListImages(ctx context.Context) ([]*runtimeapi.Image, error) {
	resp, err := c.images.ListImages(ctx, &runtimeapi.ListImagesRequest{})
	if err != nil {
		return nil, fmt.Errorf("CRI list images: %w", err)
	}
	return resp.GetImages(), nil
}

// Close closes the connection.
func (c *CRIClient) Close() error { return c.conn.Close() }
