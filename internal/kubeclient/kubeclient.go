// Package kubeclient is how the agent's Kubernetes parts reach Shoal's API: a REST client that
// touches the API server only when used (an agent starts while it is down), and an informer
// over one resource that keeps no managed fields and says, coalesced, when anything changed.
package kubeclient

import (
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"

	"github.com/shoal-dev/shoal/api/v1alpha1"
)

// UserAgent names the agent's requests to the API server, unless the config names them.
const UserAgent = "shoal-agent"

// Shoal returns a REST client for the group shoal.dev/v1alpha1.
func Shoal(cfg *rest.Config) (*rest.RESTClient, error) {
	scheme := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &v1alpha1.GroupVersion
	c.APIPath = "/apis"
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = UserAgent
	}
	client, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, fmt.Errorf("client for %s: %w", v1alpha1.GroupVersion, err)
	}
	return client, nil
}

// Informer watches resource (e.g. "swarmmembers") of the objects of obj's type that selector
// picks, keeping them without their managed fields. changed receives a value after any
// add, update or delete; values are coalesced, so one receive may stand for several changes.
// Run the informer with RunWithContext.
func Informer[T interface {
	runtime.Object
	SetManagedFields([]metav1.ManagedFieldsEntry)
}](client rest.Interface, resource string, obj T, selector fields.Selector) (inf toolscache.SharedIndexInformer, changed <-chan struct{}, err error) {
	inf = toolscache.NewSharedIndexInformer(
		toolscache.NewListWatchFromClient(client, resource, "", selector), obj, 0, toolscache.Indexers{})
	if err := inf.SetTransform(func(o any) (any, error) {
		if t, ok := o.(T); ok {
			t.SetManagedFields(nil)
		}
		return o, nil
	}); err != nil {
		return nil, nil, fmt.Errorf("informer of %s: %w", resource, err)
	}
	ch := make(chan struct{}, 1)
	notify := func() {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	if _, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { notify() },
		UpdateFunc: func(any, any) { notify() },
		DeleteFunc: func(any) { notify() },
	}); err != nil {
		return nil, nil, fmt.Errorf("informer of %s: %w", resource, err)
	}
	return inf, ch, nil
}
