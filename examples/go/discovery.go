package twinkle

// Discovery from rank 0's address alone (docs/protocol.md, "Discovery: GetMesh"): workers placed
// by their engine register with rank 0, and GetMesh on rank 0 lists them in rank order. The
// incarnations it reports are kept, so that a failed call can name a rank that restarted.

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	workerv1 "example.com/twinkle/gen/twinkle/worker/v1"
)

// DefaultMeshWait is how long FromRank0 lets rank 0 wait for every rank to register.
const DefaultMeshWait = 2 * time.Minute

// RestartCheckTimeout bounds the GetStatus round that, after a failed call on a mesh found
// through rank 0, looks for restarted ranks: it adds to Options.ReportBound.
const RestartCheckTimeout = 5 * time.Second

// maxMeshWait is the longest wait_seconds a worker accepts.
const maxMeshWait = 600 * time.Second

// Rank0Options says how to ask rank 0; zero values take the defaults.
type Rank0Options struct {
	Security Security
	Wait     time.Duration // how long rank 0 may wait for the other ranks (default 2 min, at most 10 min)
}

// FromRank0 asks rank 0 at address for its mesh (GetMesh) and returns every rank's address in
// rank order, the rendezvous rank 0 reports and each rank's incarnation. A worker that is not
// rank 0 answers FAILED_PRECONDITION naming rank 0's address; a mesh still incomplete after the
// wait is UNAVAILABLE naming the ranks that did not register.
func FromRank0(ctx context.Context, address string, options Rank0Options) (Targets, error) {
	if !strings.Contains(address, ":") {
		return Targets{}, fmt.Errorf("rank 0: %q is not host:port", address)
	}
	wait := options.Wait
	if wait <= 0 {
		wait = DefaultMeshWait
	}
	if wait > maxMeshWait {
		return Targets{}, fmt.Errorf("rank 0 (%s): a mesh wait of %v is over the workers' limit of %v", address, wait, maxMeshWait)
	}
	dialOptions, err := options.Security.DialOptions()
	if err != nil {
		return Targets{}, err
	}
	conn, err := dial(address, dialOptions)
	if err != nil {
		return Targets{}, fmt.Errorf("rank 0 (%s): %v", address, err)
	}
	defer conn.Close()
	// The deadline covers rank 0 coming up (WaitForReady) and its own wait for the other ranks.
	ctx, cancel := context.WithTimeout(ctx, wait+30*time.Second)
	defer cancel()
	mesh, err := workerv1.NewWorkerServiceClient(conn).GetMesh(ctx,
		&workerv1.GetMeshRequest{WaitSeconds: wait.Seconds()}, grpc.WaitForReady(true))
	if err != nil {
		return Targets{}, status.Errorf(status.Code(err), "GetMesh on rank 0 (%s): %s", address, status.Convert(err).Message())
	}
	targets, err := targetsOfMesh(address, mesh, wait)
	if err != nil {
		return Targets{}, err
	}
	targets.Security = options.Security
	return targets, nil
}

// targetsOfMesh checks rank 0's answer: every rank 0..world_size-1 once, each with an address.
func targetsOfMesh(rank0 string, mesh *workerv1.GetMeshResponse, wait time.Duration) (Targets, error) {
	size := int(mesh.GetWorldSize())
	if size <= 0 {
		return Targets{}, fmt.Errorf("rank 0 (%s) reports a world size of %d", rank0, size)
	}
	byRank := map[int]*workerv1.MeshMember{}
	for _, member := range mesh.GetMembers() {
		rank := int(member.GetRank())
		if rank < 0 || rank >= size || byRank[rank] != nil || member.GetAddress() == "" {
			return Targets{}, fmt.Errorf("rank 0 (%s) lists a member that does not fit a mesh of %d ranks: "+
				"rank %d, address %q (duplicate, out of range or without an address)", rank0, size, rank, member.GetAddress())
		}
		byRank[rank] = member
	}
	var missing []int
	for rank := 0; rank < size; rank++ {
		if byRank[rank] == nil {
			missing = append(missing, rank)
		}
	}
	if len(missing) > 0 || !mesh.GetComplete() {
		return Targets{}, status.Errorf(codes.Unavailable, "rank 0 (%s) expects %d ranks but rank(s) %v did not "+
			"register within %v: are they running, and can they reach rank 0?", rank0, size, missing, wait)
	}
	targets := Targets{Rank0: rank0, MasterAddr: mesh.GetMasterAddr(), MasterPort: int(mesh.GetMasterPort())}
	for rank := 0; rank < size; rank++ {
		targets.Addresses = append(targets.Addresses, byRank[rank].GetAddress())
		targets.Incarnations = append(targets.Incarnations, byRank[rank].GetIncarnation())
	}
	return targets, nil
}

// RestartError is a failed call on a mesh where some rank's worker is another process than the
// one seen at connection time: its model, adapters and optimizer state are gone.
type RestartError struct {
	Restarted map[int]string // rank -> its incarnation now
	Targets   Targets
	Cause     error
}

func (e *RestartError) Error() string {
	ranks := e.Ranks()
	names := make([]string, len(ranks))
	for i, rank := range ranks {
		names[i] = fmt.Sprintf("rank %d (%s, incarnation %s -> %s)", rank, e.Targets.Addresses[rank],
			short(e.Targets.Incarnations[rank]), short(e.Restarted[rank]))
	}
	return fmt.Sprintf("%s restarted: a new worker process whose model, adapters and optimizer state are gone; "+
		"Reset, Init again and resume from a checkpoint (--resume). The call failed with: %v",
		strings.Join(names, ", "), e.Cause)
}

// Unwrap gives the failure itself (usually a *RankError).
func (e *RestartError) Unwrap() error { return e.Cause }

// Ranks are the restarted ranks, in order.
func (e *RestartError) Ranks() []int {
	ranks := make([]int, 0, len(e.Restarted))
	for rank := range e.Restarted {
		ranks = append(ranks, rank)
	}
	sort.Ints(ranks)
	return ranks
}

func short(incarnation string) string {
	if len(incarnation) > 8 {
		return incarnation[:8]
	}
	return incarnation
}

// restartedRanks compares the incarnations seen at connection time with those answered now
// ("" now: the rank did not answer, which says nothing).
func restartedRanks(seen, now []string) map[int]string {
	restarted := map[int]string{}
	for rank := range seen {
		if rank < len(now) && seen[rank] != "" && now[rank] != "" && now[rank] != seen[rank] {
			restarted[rank] = now[rank]
		}
	}
	return restarted
}

// explainRestart turns err into a *RestartError when the client knows the ranks' incarnations
// (FromRank0) and some rank answers GetStatus as another process; else it returns err. Every
// rank is asked at once: a restart often shows first as a failure on its collective partner.
func (c *Client) explainRestart(ctx context.Context, err error) error {
	if err == nil || len(c.Targets.Incarnations) != len(c.Workers) {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, RestartCheckTimeout)
	defer cancel()
	now := make([]string, len(c.Workers))
	var group sync.WaitGroup
	for _, w := range c.Workers {
		group.Add(1)
		go func(w *Worker) {
			defer group.Done()
			if reply, statusErr := w.Service.GetStatus(ctx, &workerv1.GetStatusRequest{}); statusErr == nil {
				now[w.Rank] = reply.GetIncarnation()
			}
		}(w)
	}
	group.Wait()
	if restarted := restartedRanks(c.Targets.Incarnations, now); len(restarted) > 0 {
		return &RestartError{Restarted: restarted, Targets: c.Targets, Cause: err}
	}
	return err
}
