// Command harness runs containerd's snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite.SnapshotterSuite)
// against a snapshotter served as a containerd proxy plugin on a unix socket,
// through containerd's own snapshot proxy client: the code path containerd
// itself takes when a `[proxy_plugins.X] type = "snapshot"` is configured.
//
// It is a plain program (not a `go test` package) so that one `go build`
// from Debian's GOPATH sources makes it. Go's testing framework still runs
// the suite, so results come out in Go's usual `-test.v` lines, one
// `--- PASS|FAIL|SKIP: TestSnapshotterSuite/<subtest>` per subtest:
//
//	harness -socket /run/lazysnap.sock -test.v
//
// Must run as root in the snapshotter's mount namespace: the suite mounts
// what Prepare and View return.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"sync"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

var (
	socket = flag.String("socket", "", "unix socket of the snapshotter's snapshots gRPC service (required)")
	name   = flag.String("name", "lazysnap", "snapshotter name sent in every request")
	// A hung server should fail the subtest that hit it, not stall the whole run.
	callTimeout = flag.Duration("call-timeout", time.Minute, "deadline of each gRPC call")
)

// suiteNamespace is the containerd namespace SnapshotterSuite puts in every context.
const suiteNamespace = "testsuite"

func main() {
	tests := []testing.InternalTest{{Name: "TestSnapshotterSuite", F: runSuite}}
	testing.Main(regexp.MatchString, tests, nil, nil)
}

func runSuite(t *testing.T) {
	if *socket == "" {
		t.Fatal("-socket is required")
	}
	if os.Geteuid() != 0 {
		t.Fatal("the suite mounts what the snapshotter returns: run as root")
	}
	testsuite.SnapshotterSuite(t, *name, newSnapshotter)
	// Runs after every (parallel) subtest has finished and cleaned up.
	t.Cleanup(func() { reportLeftovers(t) })
}

// dial connects as containerd 1.6 connects to a proxy plugin
// (services/server/server.go): unix target, insecure, 16 MiB messages.
func dial(ctx context.Context) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return grpc.DialContext(ctx, dialer.DialAddress(*socket),
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize),
			grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize),
		),
	)
}

// newSnapshotter is the suite's factory, called once per subtest with a fresh
// root under the subtest's temp dir. Each subtest gets its own connection so
// CloseTwice cannot break the others.
func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	conn, err := dial(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to %s: %w", *socket, err)
	}
	sn := &tracked{Snapshotter: proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), *name)}
	cleanup := func() error {
		defer conn.Close()
		// Some upstream checks return early without unmounting; the suite then
		// runs os.RemoveAll on the temp dir, which must not recurse into a
		// snapshot through a mount left behind.
		unmountUnder(filepath.Dir(root))
		return sn.removeCreated()
	}
	return sn, cleanup, nil
}

// tracked forwards every call unchanged, with a deadline, and remembers the
// keys it created: the suite never removes its snapshots, and one server
// serves all subtests, so each subtest removes its own at the end.
type tracked struct {
	snapshots.Snapshotter
	mu      sync.Mutex
	created []string
}

func withDeadline(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, *callTimeout)
}

func (s *tracked) remember(key string, err error) {
	if err != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.created = append(s.created, key)
}

func (s *tracked) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	return s.Snapshotter.Stat(ctx, key)
}

func (s *tracked) Update(ctx context.Context, info snapshots.Info, paths ...string) (snapshots.Info, error) {
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	return s.Snapshotter.Update(ctx, info, paths...)
}

func (s *tracked) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	return s.Snapshotter.Usage(ctx, key)
}

func (s *tracked) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	return s.Snapshotter.Mounts(ctx, key)
}

func (s *tracked) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	mounts, err := s.Snapshotter.Prepare(ctx, key, parent, opts...)
	s.remember(key, err)
	return mounts, err
}

func (s *tracked) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	mounts, err := s.Snapshotter.View(ctx, key, parent, opts...)
	s.remember(key, err)
	return mounts, err
}

func (s *tracked) Commit(ctx context.Context, committed, key string, opts ...snapshots.Opt) error {
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	err := s.Snapshotter.Commit(ctx, committed, key, opts...)
	s.remember(committed, err)
	return err
}

func (s *tracked) Remove(ctx context.Context, key string) error {
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	return s.Snapshotter.Remove(ctx, key)
}

func (s *tracked) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	ctx, cancel := withDeadline(ctx)
	defer cancel()
	return s.Snapshotter.Walk(ctx, fn, filters...)
}

// removeCreated removes the subtest's snapshots newest first, so children go
// before their parents. NotFound is expected: the subtest removed some itself,
// and Commit consumed the active keys.
func (s *tracked) removeCreated() error {
	ctx := namespaces.WithNamespace(context.Background(), suiteNamespace)
	s.mu.Lock()
	keys := append([]string(nil), s.created...)
	s.mu.Unlock()
	var errs []error
	for i := len(keys) - 1; i >= 0; i-- {
		if err := s.Remove(ctx, keys[i]); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("remove %q: %w", keys[i], err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%d snapshots not removed, first: %w", len(errs), errs[0])
	}
	return nil
}

// unmountUnder detaches every mount below dir, deepest first.
func unmountUnder(dir string) {
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		fmt.Fprintf(os.Stderr, "harness: reading mountinfo: %v\n", err)
		return
	}
	sort.Slice(infos, func(i, j int) bool { return len(infos[i].Mountpoint) > len(infos[j].Mountpoint) })
	for _, info := range infos {
		fmt.Fprintf(os.Stderr, "harness: unmounting %s, left mounted by a subtest\n", info.Mountpoint)
		if err := unix.Unmount(info.Mountpoint, unix.MNT_DETACH); err != nil {
			fmt.Fprintf(os.Stderr, "harness: unmount %s: %v\n", info.Mountpoint, err)
		}
	}
}

// reportLeftovers prints how many snapshots the server still holds, in a
// stable line (`harness: snapshots-left=N`) the caller can assert on.
func reportLeftovers(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), suiteNamespace)
	conn, err := dial(ctx)
	if err != nil {
		t.Errorf("connect for the final walk: %v", err)
		return
	}
	defer conn.Close()
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), *name)
	var left []string
	err = sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
		left = append(left, info.Name)
		return nil
	})
	if err != nil {
		t.Errorf("final walk: %v", err)
		return
	}
	fmt.Printf("harness: snapshots-left=%d %v\n", len(left), left)
}
