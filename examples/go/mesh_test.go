package twinkle

// The mesh rules against the tables and examples of docs/protocol.md section 5.

import (
	"reflect"
	"testing"
)

func TestMeshTableOfProtocolDoc(t *testing.T) {
	cases := []struct {
		sizes map[string]int
		names []string
		dims  []int
		world int
	}{
		{map[string]int{"dp": 2}, []string{"dp"}, []int{2}, 2},                       // DDP
		{map[string]int{"fsdp": 4}, []string{"fsdp", "dp"}, []int{4, 1}, 4},          // FSDP
		{map[string]int{"dp": 2, "fsdp": 2}, []string{"fsdp", "dp"}, []int{2, 2}, 4}, // HSDP
		{map[string]int{}, []string{"dp"}, []int{1}, 1},                              // one rank
		{map[string]int{"tp": 2, "dp": 2, "pp": 2}, []string{"pp", "dp", "tp"}, []int{2, 2, 2}, 8},
	}
	for _, c := range cases {
		mesh, err := NewMesh(c.sizes)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(mesh.DimNames, c.names) || !reflect.DeepEqual(mesh.DimSizes, c.dims) || mesh.WorldSize() != c.world {
			t.Errorf("%v: got %v %v world %d, want %v %v world %d", c.sizes, mesh.DimNames, mesh.DimSizes,
				mesh.WorldSize(), c.names, c.dims, c.world)
		}
	}
}

func TestParseMeshAppliesTheCanonicalOrderAndRefusesUnknownDims(t *testing.T) {
	mesh, err := ParseMesh("dp=4,fsdp=2")
	if err != nil || !reflect.DeepEqual(mesh.DimNames, []string{"fsdp", "dp"}) || !reflect.DeepEqual(mesh.DimSizes, []int{2, 4}) {
		t.Fatalf("got %v, %v", mesh, err)
	}
	for _, bad := range []string{"ep=2", "dp=0", "dp", "dp=x"} {
		if _, err := ParseMesh(bad); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}

func TestDataRanksOfFsdp2Dp4(t *testing.T) {
	// "Example fsdp=2, dp=4 (dims ["fsdp","dp"]): global ranks 0..7 have data ranks 0, 2, 4, 6, 1, 3, 5, 7."
	mesh, _ := NewMesh(map[string]int{"fsdp": 2, "dp": 4})
	var got []int
	for rank := 0; rank < mesh.WorldSize(); rank++ {
		d, err := mesh.DataRank(rank)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, d)
	}
	if want := []int{0, 2, 4, 6, 1, 3, 5, 7}; !reflect.DeepEqual(got, want) {
		t.Fatalf("data ranks %v, want %v", got, want)
	}
	if mesh.DataWorldSize() != 8 {
		t.Fatalf("data world size %d", mesh.DataWorldSize())
	}
	if _, err := mesh.DataRank(8); err == nil {
		t.Fatal("rank 8 of 8 accepted")
	}
}

func TestCoordinatesPeelTheInnermostDimFirst(t *testing.T) {
	mesh, _ := NewMesh(map[string]int{"fsdp": 2, "dp": 4})
	coords, _ := mesh.Coordinates(5) // row-major position 5 of a [2, 4] grid: row 1, column 1
	if coords["fsdp"] != 1 || coords["dp"] != 1 {
		t.Fatalf("rank 5: %v", coords)
	}
}

func TestTensorParallelPeersShareADataRankAndTheSmallestCollects(t *testing.T) {
	mesh, _ := NewMesh(map[string]int{"dp": 2, "tp": 2}) // ranks 0,1 are data rank 0; 2,3 data rank 1
	var got []int
	for rank := 0; rank < 4; rank++ {
		d, _ := mesh.DataRank(rank)
		got = append(got, d)
	}
	if !reflect.DeepEqual(got, []int{0, 0, 1, 1}) {
		t.Fatalf("data ranks %v", got)
	}
	if collect := mesh.CollectRanks(); !reflect.DeepEqual(collect, []int{0, 2}) {
		t.Fatalf("collect ranks %v", collect)
	}
	hsdp, _ := NewMesh(map[string]int{"fsdp": 2, "dp": 4})
	if collect := hsdp.CollectRanks(); !reflect.DeepEqual(collect, []int{0, 4, 1, 5, 2, 6, 3, 7}) {
		t.Fatalf("HSDP collect ranks %v", collect) // data rank d is served by the rank whose data rank is d
	}
}

func TestSliceBoundsSevenSamplesOverThreeDataRanks(t *testing.T) {
	// "B = 7, dws = 3 gives [0:3], [3:5], [5:7]."
	var got [][2]int
	for d := 0; d < 3; d++ {
		start, end, err := SliceBounds(7, d, 3)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, [2]int{start, end})
	}
	if want := [][2]int{{0, 3}, {3, 5}, {5, 7}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("slices %v, want %v", got, want)
	}
	if _, _, err := SliceBounds(2, 0, 3); err == nil {
		t.Fatal("a batch smaller than the data world size was accepted")
	}
}
