package main

// `twinkle-sched status`: one line per worker with its health, state, groups and step.

import (
	"context"
	"fmt"
	"io"
	"math"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"example.com/twinkle"
	workerv1 "example.com/twinkle/gen/twinkle/worker/v1"
)

type row struct {
	health, state, groups, steps, sequence, owner string
	rank                                          int32
	reachable                                     bool
}

// printStatus asks every worker at once (read-only calls, any state) and prints the table;
// the exit code is 1 when a worker is unreachable or not serving.
func printStatus(out io.Writer, targets twinkle.Targets, s *settings) int {
	// The mesh does not matter to read-only calls: a 1-D mesh of the right size connects them.
	mesh, _ := twinkle.NewMesh(map[string]int{"dp": len(targets.Addresses)})
	client, err := twinkle.Connect(targets, mesh, s.options())
	if err != nil {
		fmt.Fprintln(out, "twinkle-sched status:", err)
		return 2
	}
	defer client.Close()
	rows := make([]row, len(client.Workers))
	var group sync.WaitGroup
	for _, w := range client.Workers {
		group.Add(1)
		go func(w *twinkle.Worker) {
			defer group.Done()
			rows[w.Rank] = describe(w)
		}(w)
	}
	group.Wait()
	table := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(table, "#\tADDRESS\tHEALTH\tRANK\tSTATE\tGROUPS\tSTEP\tSEQ\tOWNER")
	code := 0
	for i, r := range rows {
		rank := "-"
		if r.state == "initialized" {
			rank = fmt.Sprint(r.rank)
		}
		fmt.Fprintf(table, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", i, client.Workers[i].Address, r.health, rank,
			r.state, r.groups, r.steps, r.sequence, r.owner)
		if !r.reachable || r.health != "SERVING" {
			code = 1
		}
	}
	_ = table.Flush()
	return code
}

func describe(w *twinkle.Worker) row {
	r := row{health: "-", state: "-", groups: "-", steps: "-", sequence: "-", owner: "-"}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	health, err := w.Health.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		r.health = "UNREACHABLE (" + status.Code(err).String() + ")"
		return r
	}
	r.health, r.reachable = health.GetStatus().String(), true
	reply, err := w.Service.GetStatus(ctx, &workerv1.GetStatusRequest{})
	if err != nil {
		r.state = status.Code(err).String()
		return r
	}
	r.rank, r.sequence = reply.GetRank(), fmt.Sprint(reply.GetLastSequenceNumber())
	r.state = "new"
	if reply.GetInitialized() {
		r.state = "initialized"
	}
	if id := reply.GetSessionId(); id != "" {
		r.owner = shorten(id) + leaseText(reply.GetLeaseSecondsLeft())
	}
	var names, steps []string
	groups := reply.GetGroups()
	if len(groups) > 1 { // "" (the full model) stands for the only adapter then: list the adapters
		groups = groups[:0:0]
		for _, name := range reply.GetGroups() {
			if name != "" {
				groups = append(groups, name)
			}
		}
	}
	for _, name := range groups {
		label := name
		if label == "" {
			label = "(model)"
		}
		names = append(names, label)
		steps = append(steps, label+"="+optimizerStep(ctx, w, name))
	}
	if len(names) > 0 {
		r.groups, r.steps = strings.Join(names, ","), strings.Join(steps, ",")
	}
	return r
}

// optimizerStep of a group, from GetTrainConfigs; "?" when the worker does not say (busy).
func optimizerStep(ctx context.Context, w *twinkle.Worker, group string) string {
	reply, err := w.Service.GetTrainConfigs(ctx, &workerv1.GetTrainConfigsRequest{AdapterName: group})
	if err != nil {
		return "?"
	}
	value, ok := reply.GetConfigs().GetFields()["optimizer_step"]
	if !ok {
		return "?"
	}
	return fmt.Sprint(int64(value.GetNumberValue()))
}

func shorten(id string) string {
	if len(id) > 8 {
		return id[:8]
	}
	return id
}

func leaseText(seconds float64) string {
	switch {
	case math.IsInf(seconds, 1):
		return ""
	case seconds < 0:
		return " (lease lapsed)"
	}
	return fmt.Sprintf(" (lease %.0fs)", seconds)
}
