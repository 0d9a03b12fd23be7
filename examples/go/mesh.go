// Package twinkle is a Go client for a mesh of Twinkle workers (docs/protocol.md): the mesh
// arithmetic, the tensor codec, and a coordinator that fans every call out to all ranks.
package twinkle

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// DimOrder is Twinkle's dim order, outermost first. A dim is present only when given,
// except dp, which is always present.
var DimOrder = []string{"fsdp", "pp", "dp", "cp", "tp"}

// Mesh is a DeviceMesh: named dims, outermost first, in DimOrder.
type Mesh struct {
	DimNames []string
	DimSizes []int
}

// NewMesh builds a mesh from dim sizes (e.g. {"dp": 2}); unknown dims and sizes below 1 are refused.
func NewMesh(sizes map[string]int) (Mesh, error) {
	known := map[string]bool{}
	for _, name := range DimOrder {
		known[name] = true
	}
	names := make([]string, 0, len(sizes))
	for name := range sizes {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if !known[name] {
			return Mesh{}, fmt.Errorf("unknown mesh dim %q (known: %s)", name, strings.Join(DimOrder, ", "))
		}
		if sizes[name] < 1 {
			return Mesh{}, fmt.Errorf("mesh dim %s must be a positive integer, got %d", name, sizes[name])
		}
	}
	var mesh Mesh
	for _, name := range DimOrder {
		size, given := sizes[name]
		if !given && name != "dp" {
			continue
		}
		if !given {
			size = 1
		}
		mesh.DimNames = append(mesh.DimNames, name)
		mesh.DimSizes = append(mesh.DimSizes, size)
	}
	return mesh, nil
}

// ParseMesh reads "fsdp=2,dp=2" (any order; the canonical order is applied).
func ParseMesh(text string) (Mesh, error) {
	sizes := map[string]int{}
	for _, part := range strings.Split(text, ",") {
		if strings.TrimSpace(part) == "" {
			continue
		}
		name, value, found := strings.Cut(part, "=")
		size, err := strconv.Atoi(strings.TrimSpace(value))
		if !found || err != nil {
			return Mesh{}, fmt.Errorf("mesh %q: %q is not NAME=SIZE", text, part)
		}
		sizes[strings.TrimSpace(name)] = size
	}
	return NewMesh(sizes)
}

// Size of a dim; 1 when the mesh does not have it.
func (m Mesh) Size(name string) int {
	for i, dim := range m.DimNames {
		if dim == name {
			return m.DimSizes[i]
		}
	}
	return 1
}

// WorldSize is the number of ranks: the product of the dim sizes.
func (m Mesh) WorldSize() int {
	world := 1
	for _, size := range m.DimSizes {
		world *= size
	}
	return world
}

// Coordinates of global rank r: its row-major position in arange(world).reshape(sizes),
// peeled off innermost dim first.
func (m Mesh) Coordinates(rank int) (map[string]int, error) {
	if rank < 0 || rank >= m.WorldSize() {
		return nil, fmt.Errorf("rank %d outside a mesh of %d ranks", rank, m.WorldSize())
	}
	coords := map[string]int{}
	rest := rank
	for i := len(m.DimNames) - 1; i >= 0; i-- {
		coords[m.DimNames[i]] = rest % m.DimSizes[i]
		rest /= m.DimSizes[i]
	}
	return coords, nil
}

// DataWorldSize is size(dp) * size(fsdp).
func (m Mesh) DataWorldSize() int {
	return m.Size("dp") * m.Size("fsdp")
}

// DataRank of global rank r: dp_r * size(fsdp) + fsdp_r when fsdp > 1, else dp_r.
func (m Mesh) DataRank(rank int) (int, error) {
	coords, err := m.Coordinates(rank)
	if err != nil {
		return 0, err
	}
	if fsdp := m.Size("fsdp"); fsdp > 1 {
		return coords["dp"]*fsdp + coords["fsdp"], nil
	}
	return coords["dp"], nil
}

// CollectRanks gives, in data-rank order, the smallest global rank of each data rank: the
// rank whose answer counts for it (tp/cp peers return copies).
func (m Mesh) CollectRanks() []int {
	chosen := make([]int, m.DataWorldSize())
	for i := range chosen {
		chosen[i] = -1
	}
	for rank := 0; rank < m.WorldSize(); rank++ {
		d, _ := m.DataRank(rank)
		if chosen[d] < 0 {
			chosen[d] = rank
		}
	}
	return chosen
}

// SliceBounds is the half-open range [start, end) of the n samples of a micro-batch that data
// rank d of dws gets: contiguous balanced blocks, the first n % dws ranks one sample larger.
func SliceBounds(n, d, dws int) (int, int, error) {
	if n < dws {
		return 0, 0, fmt.Errorf("a micro-batch of %d samples is fewer than the data world size %d", n, dws)
	}
	if d < 0 || d >= dws {
		return 0, 0, fmt.Errorf("data rank %d outside a data world of %d", d, dws)
	}
	base, extra := n/dws, n%dws
	start := d*base + min(d, extra)
	end := start + base
	if d < extra {
		end++
	}
	return start, end, nil
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}
