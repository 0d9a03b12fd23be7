// Command twinkle-sched drives a mesh of Twinkle workers as a scheduler would: it waits for
// every worker to be SERVING, runs a LoRA job from a JSON spec (Init, AddAdapter,
// SetOptimizer, ForwardBackward + ClipGradAndStep per micro-batch, checkpoints, Save, Reset)
// and prints one JSON object per line. `twinkle-sched status ADDR...` prints each rank's state.
//
//	twinkle-sched [flags] JOB.json           run a job (--resume: from its last checkpoint)
//	twinkle-sched status [flags] ADDR...     a table of the workers' state (or --rank0 ADDR)
//	twinkle-sched plan --mesh M --samples N  data ranks, collect ranks and slices of a mesh
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"example.com/twinkle"
)

type settings struct {
	workers, cluster, group, tokenEnv  string
	rank0                              string
	meshWait                           time.Duration
	rootCert, clientCert, clientKey    string
	serverName                         string
	useTLS                             bool
	resume                             bool
	health, timeout, retry, abortGrace time.Duration
}

func flags(name string) (*flag.FlagSet, *settings) {
	s := &settings{}
	set := flag.NewFlagSet(name, flag.ExitOnError)
	set.StringVar(&s.workers, "workers", "", "worker addresses host:port,... in global-rank order")
	set.StringVar(&s.cluster, "cluster", "", "cluster config (a path or the JSON itself; default $"+twinkle.ClusterEnv+")")
	set.StringVar(&s.rank0, "rank0", "", "rank 0's host:port alone: the other ranks are asked of it (GetMesh)")
	set.DurationVar(&s.meshWait, "mesh-wait", twinkle.DefaultMeshWait, "with --rank0 (or a config's rank0): how long rank 0 may wait for every rank to register")
	set.StringVar(&s.group, "group", "", "group of the cluster config (may be left out when there is one)")
	set.StringVar(&s.tokenEnv, "token-env", "TWINKLE_TOKEN", "variable holding the bearer token (with --workers)")
	set.BoolVar(&s.useTLS, "tls", false, "connect with TLS, trusting the system's roots")
	set.StringVar(&s.rootCert, "tls-root-cert", "", "PEM file of the CA of the workers' certificates (turns TLS on)")
	set.StringVar(&s.clientCert, "tls-client-cert", "", "PEM file of this client's certificate (mutual TLS)")
	set.StringVar(&s.clientKey, "tls-client-key", "", "PEM file of this client's key (mutual TLS)")
	set.StringVar(&s.serverName, "tls-server-name", "", "name to check the workers' certificates against")
	set.BoolVar(&s.resume, "resume", false, "continue from the job's checkpoint (ResumeFromCheckpoint)")
	set.DurationVar(&s.health, "health-timeout", 2*time.Minute, "how long to wait for every worker to be SERVING")
	set.DurationVar(&s.timeout, "timeout", 10*time.Minute, "deadline of each call")
	set.DurationVar(&s.retry, "retry", 5*time.Second, "how long an unreachable worker may take to come back")
	set.DurationVar(&s.abortGrace, "abort-grace", 10*time.Second, "after one rank fails, how long the others get to answer")
	return set, s
}

// targets: --rank0, else --workers, else the cluster config (--cluster or $TWINKLE_CLUSTER). The
// token is read from a variable, never from the command line (where ps would show it).
func (s *settings) targets(ctx context.Context, addresses []string) (twinkle.Targets, error) {
	security := twinkle.Security{
		Token: os.Getenv(s.tokenEnv), TLS: s.useTLS, RootCert: s.rootCert,
		ClientCert: s.clientCert, ClientKey: s.clientKey, ServerName: s.serverName,
	}
	if s.rank0 != "" {
		if s.workers != "" || len(addresses) > 0 {
			return twinkle.Targets{}, fmt.Errorf("--rank0 finds the workers itself: give no --workers or addresses with it")
		}
		return twinkle.FromRank0(ctx, s.rank0, twinkle.Rank0Options{Security: security, Wait: s.meshWait})
	}
	if s.workers != "" {
		addresses = append(strings.Split(s.workers, ","), addresses...)
	}
	if len(addresses) > 0 {
		return twinkle.FromAddresses(addresses, security)
	}
	group, err := twinkle.ParseCluster(s.cluster, s.group)
	if err != nil {
		return twinkle.Targets{}, err
	}
	configured := group.Security()
	if configured.Token == "" { // the config names no token_env (or it is empty)
		configured.Token = security.Token
	}
	if security.UsesTLS() { // TLS flags override the config's
		security.Token = configured.Token
		configured = security
	}
	return group.Resolve(ctx, configured, s.meshWait)
}

// exitCode of a failure to find the workers: 1 when a worker answered (or not) over gRPC, 2 for
// bad flags or a bad config.
func exitCode(err error) int {
	var rpcErr interface{ GRPCStatus() *status.Status }
	if errors.As(err, &rpcErr) {
		return 1
	}
	return 2
}

// emitMesh prints where the workers are when rank 0 said so.
func emitMesh(targets twinkle.Targets) {
	if targets.Rank0 == "" {
		return
	}
	emit("mesh", map[string]interface{}{"rank0": targets.Rank0, "workers": targets.Addresses,
		"incarnations": targets.Incarnations, "master_addr": targets.MasterAddr, "master_port": targets.MasterPort})
}

func (s *settings) options() twinkle.Options {
	return twinkle.Options{Timeout: s.timeout, Retry: s.retry, AbortGrace: s.abortGrace}
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "plan" {
		os.Exit(plan(os.Stdout, os.Args[2:]))
	}
	if len(os.Args) > 1 && os.Args[1] == "status" {
		set, s := flags("twinkle-sched status")
		_ = set.Parse(os.Args[2:])
		targets, err := s.targets(context.Background(), set.Args())
		if err != nil {
			fmt.Fprintln(os.Stderr, "twinkle-sched status:", err)
			os.Exit(exitCode(err))
		}
		os.Exit(printStatus(os.Stdout, targets, s))
	}
	set, s := flags("twinkle-sched")
	set.Usage = func() {
		fmt.Fprintln(set.Output(), "usage: twinkle-sched [flags] JOB.json | status [flags] ADDR... (or --rank0 ADDR) | plan --mesh M --samples N,...")
		set.PrintDefaults()
	}
	_ = set.Parse(os.Args[1:])
	if set.NArg() != 1 {
		set.Usage()
		os.Exit(2)
	}
	os.Exit(run(set.Arg(0), s))
}

// emit prints one event as a JSON line.
func emit(event string, fields map[string]interface{}) {
	fields["event"] = event
	line, _ := json.Marshal(fields)
	fmt.Println(string(line))
}

// fail prints the error event: the rank, address and gRPC code when a rank caused it.
func fail(err error, started time.Time) {
	fields := map[string]interface{}{"message": err.Error(), "seconds": time.Since(started).Seconds()}
	var rankErr *twinkle.RankError
	if errors.As(err, &rankErr) {
		fields["rank"], fields["address"], fields["method"] = rankErr.Rank, rankErr.Address, rankErr.Method
		fields["code"], fields["code_name"] = int(rankErr.Code), rankErr.Code.String()
		fields["silent_ranks"] = rankErr.Silent
	} else if rpcErr := (interface{ GRPCStatus() *status.Status })(nil); errors.As(err, &rpcErr) {
		fields["code"], fields["code_name"] = int(rpcErr.GRPCStatus().Code()), rpcErr.GRPCStatus().Code().String()
	}
	var restartErr *twinkle.RestartError
	if errors.As(err, &restartErr) {
		fields["restarted_ranks"] = restartErr.Ranks()
		fields["code"], fields["code_name"] = int(codes.FailedPrecondition), codes.FailedPrecondition.String()
	}
	emit("error", fields)
}

func run(jobPath string, s *settings) int {
	started := time.Now()
	job, err := LoadJob(jobPath)
	if err != nil {
		fail(err, started)
		return 2
	}
	// SIGINT / SIGTERM cancel the calls in flight; the workers are still Reset below.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	targets, err := s.targets(ctx, nil)
	if err != nil {
		fail(err, started)
		return exitCode(err)
	}
	emitMesh(targets)
	mesh, err := meshOf(job, len(targets.Addresses))
	if err != nil {
		fail(err, started)
		return 2
	}
	if mesh.DataWorldSize() > job.MicroBatchSize {
		fail(fmt.Errorf("micro_batch_size %d is fewer than the data world size %d", job.MicroBatchSize, mesh.DataWorldSize()), started)
		return 2
	}
	client, err := twinkle.Connect(targets, mesh, s.options())
	if err != nil {
		fail(err, started)
		return 2
	}
	defer client.Close()
	if err := client.WaitServing(ctx, s.health); err != nil {
		fail(err, started)
		return 1
	}
	bound := client.Options().ReportBound()
	if len(targets.Incarnations) > 0 { // a failure is followed by the look for restarted ranks
		bound += twinkle.RestartCheckTimeout
	}
	emit("serving", map[string]interface{}{"workers": targets.Addresses, "session_id": client.Session,
		"report_bound_seconds": bound.Seconds()})
	trainer := &trainer{client: client, job: job, resume: s.resume}
	if err := trainer.run(ctx); err != nil {
		fail(err, started)
		failed := client.Reset(context.Background(), 30*time.Second) // free the survivors for the next job
		messages := []string{}
		for _, e := range failed {
			messages = append(messages, e.Error())
		}
		emit("reset", map[string]interface{}{"failed": messages})
		return 1
	}
	if failed := client.Reset(context.Background(), 60*time.Second); len(failed) > 0 {
		fail(failed[0], started)
		return 1
	}
	emit("done", map[string]interface{}{"seconds": time.Since(started).Seconds()})
	return 0
}

func meshOf(job *Job, workers int) (twinkle.Mesh, error) {
	if job.Mesh == "" {
		return twinkle.NewMesh(map[string]int{"dp": workers})
	}
	return twinkle.ParseMesh(job.Mesh)
}
