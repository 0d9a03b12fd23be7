package twinkle

// The coordinator: one connection per rank, every call fanned out to all ranks at once (one
// goroutine per rank), per-worker sequence numbers under one session id, the retry rule for
// in-doubt calls, and errors that name the rank (docs/protocol.md sections 4, 9 and 12).

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	workerv1 "example.com/twinkle/gen/twinkle/worker/v1"
)

const (
	service = "/twinkle.worker.v1.WorkerService/"
	// MaxMessageBytes raises gRPC's 4 MiB default, as docs/protocol.md section 1 asks.
	MaxMessageBytes = 256 << 20
	maxAttempts     = 3
)

// Options of a Client; zero values take the defaults.
type Options struct {
	Timeout    time.Duration // deadline of each call (default 10 min)
	Retry      time.Duration // how long an UNAVAILABLE rank may take to come back (default 5 s)
	AbortGrace time.Duration // after one rank fails, how long the others get to answer (default 10 s)
	SessionID  string        // default: a random one
}

// ReportBound is the longest a caller waits, after a rank dies, for the error that names it:
// the retry window plus the grace given to the other ranks.
func (o Options) ReportBound() time.Duration {
	return o.withDefaults().Retry + o.withDefaults().AbortGrace
}

func (o Options) withDefaults() Options {
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Minute
	}
	if o.Retry <= 0 {
		o.Retry = 5 * time.Second
	}
	if o.AbortGrace <= 0 {
		o.AbortGrace = 10 * time.Second
	}
	return o
}

// Client drives the workers of one mesh, in global-rank order.
type Client struct {
	Mesh    Mesh
	Targets Targets
	Session string
	Workers []*Worker
	options Options
	mu      sync.Mutex // held while numbering and sending: every rank sees the calls in one order
}

// Worker is the connection to one rank.
type Worker struct {
	Rank    int
	Address string
	Conn    *grpc.ClientConn
	Health  healthpb.HealthClient
	Service workerv1.WorkerServiceClient

	sequence uint64
	doubtMu  sync.Mutex
	inDoubt  map[uint64]call // sequenced calls whose outcome is unknown, resent before the next one
}

type call struct {
	method   string
	request  proto.Message
	response func() proto.Message
}

// RankError is a failed call, naming the rank that caused it.
type RankError struct {
	Method  string
	Rank    int
	Address string
	Code    codes.Code
	Detail  string
	Others  int   // further ranks that failed (usually ABORTED because of this one)
	Silent  []int // ranks that had not answered when the grace ran out
	timeout time.Duration
	hung    bool // Rank is one of Silent: it never answered while its peers failed because of it
}

func (e *RankError) Error() string {
	if e.hung {
		return fmt.Sprintf("%s: rank %d (%s) did not answer (silent: %v): %s", e.Method, e.Rank, e.Address, e.Silent, e.Detail)
	}
	text := fmt.Sprintf("%s failed on rank %d (%s)", e.Method, e.Rank, e.Address)
	if e.Others > 0 {
		text += fmt.Sprintf(" and %d other rank(s)", e.Others)
	}
	if len(e.Silent) > 0 {
		text += fmt.Sprintf("; rank(s) %v did not answer within %v after that: they are probably hung or dead",
			e.Silent, e.timeout)
	}
	return fmt.Sprintf("%s: %s: %s", text, e.Code, e.Detail)
}

// Connect opens one connection per rank (lazily: nothing is dialled until the first call).
// Use WaitServing before the first call.
func Connect(targets Targets, mesh Mesh, options Options) (*Client, error) {
	if len(targets.Addresses) != mesh.WorldSize() {
		return nil, fmt.Errorf("a mesh of %d ranks needs %d workers, got %d",
			mesh.WorldSize(), mesh.WorldSize(), len(targets.Addresses))
	}
	dialOptions, err := targets.Security.DialOptions()
	if err != nil {
		return nil, err
	}
	dialOptions = append(dialOptions, grpc.WithDefaultCallOptions(
		grpc.MaxCallRecvMsgSize(MaxMessageBytes), grpc.MaxCallSendMsgSize(MaxMessageBytes)))
	options = options.withDefaults()
	if options.SessionID == "" {
		options.SessionID = randomID()
	}
	client := &Client{Mesh: mesh, Targets: targets, Session: options.SessionID, options: options}
	for rank, address := range targets.Addresses {
		conn, err := dial(address, dialOptions)
		if err != nil {
			client.Close()
			return nil, fmt.Errorf("rank %d (%s): %v", rank, address, err)
		}
		client.Workers = append(client.Workers, &Worker{
			Rank: rank, Address: address, Conn: conn, Health: healthpb.NewHealthClient(conn),
			Service: workerv1.NewWorkerServiceClient(conn), inDoubt: map[uint64]call{},
		})
	}
	return client, nil
}

// dial is grpc.Dial, which grpc-go 1.33 (Debian 12) has; grpc-go >= 1.63 prefers
// grpc.NewClient(address, options...), the same here since neither blocks.
func dial(address string, options []grpc.DialOption) (*grpc.ClientConn, error) {
	return grpc.Dial(address, options...)
}

// Close closes every connection.
func (c *Client) Close() {
	for _, w := range c.Workers {
		_ = w.Conn.Close()
	}
}

// Options returns the client's options, defaults filled in.
func (c *Client) Options() Options { return c.options }

// WaitServing waits, for every rank at once, until its health service answers SERVING; the
// error names the ranks that did not within timeout.
func (c *Client) WaitServing(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	failures := make([]error, len(c.Workers))
	var group sync.WaitGroup
	for _, w := range c.Workers {
		group.Add(1)
		go func(w *Worker) {
			defer group.Done()
			failures[w.Rank] = w.waitServing(ctx)
		}(w)
	}
	group.Wait()
	var lines []string
	for rank, err := range failures {
		if err != nil {
			lines = append(lines, fmt.Sprintf("rank %d (%s): %v", rank, c.Workers[rank].Address, err))
		}
	}
	if len(lines) > 0 {
		return fmt.Errorf("not serving within %v: %s", timeout, strings.Join(lines, "; "))
	}
	return nil
}

func (w *Worker) waitServing(ctx context.Context) error {
	var last error
	for ctx.Err() == nil {
		watch, err := w.Health.Watch(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		if err == nil {
			for {
				reply, err := watch.Recv()
				if err != nil {
					last = err
					break
				}
				if reply.GetStatus() == healthpb.HealthCheckResponse_SERVING {
					return nil
				}
				last = fmt.Errorf("health %v", reply.GetStatus())
			}
		} else {
			last = err
		}
		select { // the stream ended (a restart): watch again, not in a busy loop
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	if last == nil {
		last = ctx.Err()
	}
	return last
}

// ready reports whether the worker answers a health check within timeout (waiting for the
// connection), before a call that may not have arrived is resent.
func (w *Worker) ready(ctx context.Context, timeout time.Duration) bool {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	_, err := w.Health.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	return err == nil
}

// invoke runs one call on this rank. UNAVAILABLE (the request may not have arrived) is
// resent with the same request, so the same sequence number, once the worker answers again
// within the retry window; only idempotent calls (sequenced, or read-only) are resent.
func (c *Client) invoke(ctx context.Context, w *Worker, method string, request, response proto.Message, idempotent bool) error {
	var first error
	for attempt := 1; ; attempt++ {
		callCtx, cancel := context.WithTimeout(ctx, c.options.Timeout)
		err := w.Conn.Invoke(callCtx, service+method, request, response)
		cancel()
		if err == nil {
			return nil
		}
		if first == nil {
			first = err
		}
		if status.Code(err) != codes.Unavailable || !idempotent || attempt >= maxAttempts {
			if status.Code(err) == codes.Unavailable || status.Code(err) == codes.DeadlineExceeded {
				return first // the first failure says more than the retry's
			}
			return err
		}
		if !w.ready(ctx, c.options.Retry) {
			return first
		}
	}
}

// inDoubtCode: the call may or may not have run.
func inDoubtCode(code codes.Code) bool {
	return code == codes.Unavailable || code == codes.DeadlineExceeded || code == codes.Canceled
}

// gone: no answer came from the rank; reported without waiting for the others.
func gone(code codes.Code) bool {
	return code == codes.Unavailable || code == codes.DeadlineExceeded
}

func (w *Worker) record(number uint64, c call, err error) {
	if number == 0 {
		return
	}
	w.doubtMu.Lock()
	defer w.doubtMu.Unlock()
	if err != nil && inDoubtCode(status.Code(err)) {
		w.inDoubt[number] = c
	} else {
		delete(w.inDoubt, number)
	}
}

// Build makes rank r's request around the CallContext the client filled in (session id, and
// the rank's next sequence number); it returns nil for a request without a context.
type Build func(rank int, context *workerv1.CallContext) proto.Message

// All sends one call to every rank at once and waits for them; a sequenced call takes each
// worker's next number. Responses come back in global-rank order. On failure the error is a
// *RankError naming the rank that caused it: a rank that is gone is reported at once; after
// any other failure the others get AbortGrace to answer, then the silent ones are named.
func All[R any, P interface {
	*R
	proto.Message
}](ctx context.Context, c *Client, method string, sequenced bool, build Build) ([]P, error) {
	responses := make([]P, len(c.Workers))
	messages, err := c.fanOut(ctx, method, sequenced, build, func() proto.Message { return P(new(R)) })
	if err != nil {
		return nil, c.explainRestart(ctx, err)
	}
	for rank, message := range messages {
		responses[rank] = message.(P)
	}
	return responses, nil
}

type outcome struct {
	rank int
	err  error
}

func (c *Client) fanOut(ctx context.Context, method string, sequenced bool, build Build, newResponse func() proto.Message) ([]proto.Message, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if sequenced {
		if err := c.confirmInDoubt(ctx); err != nil {
			return nil, err
		}
	}
	responses := make([]proto.Message, len(c.Workers))
	results := make(chan outcome, len(c.Workers)) // buffered: a call still running after an early report never blocks
	for _, w := range c.Workers {
		var number uint64
		if sequenced {
			w.sequence++
			number = w.sequence
		}
		request := build(w.Rank, &workerv1.CallContext{SequenceNumber: number, SessionId: c.Session})
		response := newResponse()
		responses[w.Rank] = response
		go func(w *Worker, number uint64) {
			err := c.invoke(ctx, w, method, request, response, sequenced || readOnly[method])
			w.record(number, call{method, request, newResponse}, err)
			results <- outcome{w.Rank, err}
		}(w, number)
	}
	return responses, c.gather(method, results)
}

var readOnly = map[string]bool{"GetStatus": true, "GetTrainConfigs": true, "Reset": true}

func (c *Client) gather(method string, results <-chan outcome) error {
	answered := make([]bool, len(c.Workers))
	failures := map[int]error{}
	var grace <-chan time.Time
	early := false
	for count := 0; count < len(c.Workers) && !early; {
		select {
		case result := <-results:
			count++
			answered[result.rank] = true
			if result.err == nil {
				continue
			}
			failures[result.rank] = result.err
			if gone(status.Code(result.err)) {
				early = true
			} else if grace == nil {
				grace = time.After(c.options.AbortGrace)
			}
		case <-grace:
			early = true
		}
	}
	if len(failures) == 0 && !early {
		return nil
	}
	var silent []int
	for rank, done := range answered {
		if !done {
			silent = append(silent, rank)
		}
	}
	return c.rootCause(method, failures, silent)
}

// rootCause picks the error to report: the lowest rank whose failure is its own (not ABORTED
// or CANCELLED because a peer failed); a rank that is gone needs no silent ranks named.
func (c *Client) rootCause(method string, failures map[int]error, silent []int) error {
	ranks := make([]int, 0, len(failures))
	for rank := range failures {
		ranks = append(ranks, rank)
	}
	sort.Ints(ranks)
	cause := -1
	for _, rank := range ranks {
		code := status.Code(failures[rank])
		if code != codes.Aborted && code != codes.Canceled {
			cause = rank
			break
		}
	}
	if cause < 0 && len(silent) > 0 {
		// The ranks that failed did so because of a peer (ABORTED), and some never answered: a
		// silent rank is the likely cause (hung or dead), so it is the one named.
		detail := "probably hung or dead"
		if len(ranks) > 0 {
			detail = fmt.Sprintf("rank(s) %v failed because of a peer (%s) and it gave no answer within %v after that: %s",
				ranks, status.Convert(failures[ranks[0]]).Message(), c.options.AbortGrace, detail)
		}
		return &RankError{Method: method, Rank: silent[0], Address: c.Workers[silent[0]].Address,
			Code: codes.Unavailable, Detail: detail, Others: len(ranks), Silent: silent, timeout: c.options.AbortGrace,
			hung: true}
	}
	if cause < 0 {
		cause = ranks[0]
	}
	code := status.Code(failures[cause])
	if gone(code) {
		silent = nil
	}
	return &RankError{
		Method: method, Rank: cause, Address: c.Workers[cause].Address, Code: code,
		Detail: status.Convert(failures[cause]).Message(), Others: len(ranks) - 1, Silent: silent,
		timeout: c.options.AbortGrace,
	}
}

// confirmInDoubt resends every unconfirmed sequenced call with its own number (the worker runs
// it if it never arrived, or returns its stored outcome) before anything new is sent.
func (c *Client) confirmInDoubt(ctx context.Context) error {
	for _, w := range c.Workers {
		w.doubtMu.Lock()
		numbers := make([]uint64, 0, len(w.inDoubt))
		for number := range w.inDoubt {
			numbers = append(numbers, number)
		}
		w.doubtMu.Unlock()
		if len(numbers) == 0 {
			continue
		}
		sort.Slice(numbers, func(i, j int) bool { return numbers[i] < numbers[j] })
		if !w.ready(ctx, c.options.Retry) {
			return &RankError{Method: "resend", Rank: w.Rank, Address: w.Address, Code: codes.Unavailable,
				Detail: fmt.Sprintf("unreachable, and its call(s) %v were never confirmed; nothing new was sent. "+
					"If the worker died: Reset the survivors, restart it, Init and resume from a checkpoint", numbers)}
		}
		for _, number := range numbers {
			w.doubtMu.Lock()
			pending := w.inDoubt[number]
			w.doubtMu.Unlock()
			err := c.invoke(ctx, w, pending.method, pending.request, pending.response(), true)
			w.record(number, pending, err)
			if err != nil && inDoubtCode(status.Code(err)) {
				return &RankError{Method: pending.method, Rank: w.Rank, Address: w.Address, Code: status.Code(err),
					Detail: fmt.Sprintf("call %d is still unconfirmed (%s); nothing new was sent", number,
						status.Convert(err).Message())}
			}
		}
	}
	return nil
}

// RestartSequence is for Init: it starts every worker's numbering again at 1.
func (c *Client) RestartSequence() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, w := range c.Workers {
		w.sequence = 0
		w.doubtMu.Lock()
		w.inDoubt = map[uint64]call{}
		w.doubtMu.Unlock()
	}
}

// Reset ends this client's session on every rank (best effort, within timeout): the workers
// drop the model and serve the next client. It returns the errors of the ranks that failed.
func (c *Client) Reset(ctx context.Context, timeout time.Duration) []error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	errs := make([]error, len(c.Workers))
	var group sync.WaitGroup
	for _, w := range c.Workers {
		group.Add(1)
		go func(w *Worker) {
			defer group.Done()
			request := &workerv1.ResetRequest{Context: &workerv1.CallContext{SessionId: c.Session}}
			if _, err := w.Service.Reset(ctx, request); err != nil {
				errs[w.Rank] = fmt.Errorf("rank %d (%s): %v", w.Rank, w.Address, err)
			}
		}(w)
	}
	group.Wait()
	var failed []error
	for _, err := range errs {
		if err != nil {
			failed = append(failed, err)
		}
	}
	return failed
}

func randomID() string {
	var raw [16]byte
	if _, err := rand.Read(raw[:]); err != nil {
		panic(err)
	}
	return hex.EncodeToString(raw[:])
}
