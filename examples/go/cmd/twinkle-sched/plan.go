package main

// `twinkle-sched plan`: what the client would do with a mesh, without a worker: each global
// rank's data rank, the collect ranks, and which samples each data rank gets.

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"

	"example.com/twinkle"
)

func plan(out io.Writer, args []string) int {
	set := flag.NewFlagSet("twinkle-sched plan", flag.ExitOnError)
	meshText := set.String("mesh", "dp=1", "the mesh, e.g. fsdp=2,dp=4")
	samples := set.String("samples", "", "micro-batch sizes to slice, e.g. 7,8,13")
	_ = set.Parse(args)
	mesh, err := twinkle.ParseMesh(*meshText)
	if err != nil {
		fmt.Fprintln(out, "twinkle-sched plan:", err)
		return 2
	}
	dataRanks := make([]int, mesh.WorldSize())
	for rank := range dataRanks {
		dataRanks[rank], _ = mesh.DataRank(rank)
	}
	slices := map[string][][2]int{}
	for _, text := range strings.Split(*samples, ",") {
		if strings.TrimSpace(text) == "" {
			continue
		}
		n, err := strconv.Atoi(strings.TrimSpace(text))
		if err != nil {
			fmt.Fprintf(out, "twinkle-sched plan: --samples: %q is not a number\n", text)
			return 2
		}
		for d := 0; d < mesh.DataWorldSize(); d++ {
			start, end, err := twinkle.SliceBounds(n, d, mesh.DataWorldSize())
			if err != nil {
				fmt.Fprintln(out, "twinkle-sched plan:", err)
				return 2
			}
			slices[text] = append(slices[text], [2]int{start, end})
		}
	}
	line, _ := json.Marshal(map[string]interface{}{
		"dim_names": mesh.DimNames, "dim_sizes": mesh.DimSizes, "world_size": mesh.WorldSize(),
		"data_world_size": mesh.DataWorldSize(), "data_ranks": dataRanks, "collect_ranks": mesh.CollectRanks(),
		"slices": slices,
	})
	fmt.Fprintln(out, string(line))
	return 0
}
