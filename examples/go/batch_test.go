package twinkle

// Padding, slicing and merging against docs/protocol.md sections 5 and 8.

import (
	"math"
	"reflect"
	"testing"

	workerv1 "example.com/twinkle/gen/twinkle/worker/v1"
)

func decode(t *testing.T, m *workerv1.TensorMap, name string) ([]int64, []int64) {
	t.Helper()
	tensor := m.GetTensors()[name]
	values, err := Int64s(name, tensor)
	if err != nil {
		t.Fatal(err)
	}
	return tensor.GetShape(), values
}

func TestPaddingTable(t *testing.T) {
	samples := []Sample{
		{InputIDs: []int64{5, 6, 7}, Labels: []int64{6, 7, -100}},
		{InputIDs: []int64{9}, Labels: []int64{-100}},
	}
	padded, err := PadSlice(samples)
	if err != nil {
		t.Fatal(err)
	}
	shape, ids := decode(t, padded, "input_ids")
	_, mask := decode(t, padded, "attention_mask")
	_, labels := decode(t, padded, "labels")
	if !reflect.DeepEqual(shape, []int64{2, 3}) {
		t.Fatalf("shape %v: want [b, T] = [2, 3], padded to the longest sample of the slice", shape)
	}
	if !reflect.DeepEqual(ids, []int64{5, 6, 7, 9, 0, 0}) { // padding 0
		t.Errorf("input_ids %v", ids)
	}
	if !reflect.DeepEqual(mask, []int64{1, 1, 1, 1, 0, 0}) { // 1 token, 0 padding
		t.Errorf("attention_mask %v", mask)
	}
	if !reflect.DeepEqual(labels, []int64{6, 7, -100, -100, -100, -100}) { // padding -100
		t.Errorf("labels %v", labels)
	}
}

func TestCausalLabelsShiftLeftAndIgnoreTheLast(t *testing.T) {
	if got := CausalLabels([]int64{4, 5, 6}); !reflect.DeepEqual(got, []int64{5, 6, -100}) {
		t.Fatalf("labels %v", got)
	}
}

func TestEachSliceIsPaddedToItsOwnLongestSample(t *testing.T) {
	mesh, _ := NewMesh(map[string]int{"dp": 2})
	samples := []Sample{
		{InputIDs: []int64{1, 2, 3, 4}, Labels: CausalLabels([]int64{1, 2, 3, 4})},
		{InputIDs: []int64{5}, Labels: CausalLabels([]int64{5})},
		{InputIDs: []int64{6, 7}, Labels: CausalLabels([]int64{6, 7})},
	}
	slices, err := SliceBatch(mesh, samples)
	if err != nil {
		t.Fatal(err)
	}
	shape0, ids0 := decode(t, slices[0], "input_ids")
	shape1, ids1 := decode(t, slices[1], "input_ids")
	if !reflect.DeepEqual(shape0, []int64{2, 4}) || !reflect.DeepEqual(ids0, []int64{1, 2, 3, 4, 5, 0, 0, 0}) {
		t.Errorf("rank 0: %v %v (samples 0:2, padded to 4)", shape0, ids0)
	}
	if !reflect.DeepEqual(shape1, []int64{1, 2}) || !reflect.DeepEqual(ids1, []int64{6, 7}) {
		t.Errorf("rank 1: %v %v (sample 2:3, padded to 2)", shape1, ids1)
	}
	if _, err := SliceBatch(mesh, samples[:1]); err == nil {
		t.Fatal("one sample for two data ranks was accepted")
	}
}

func TestTensorParallelPeersGetTheSameSlice(t *testing.T) {
	mesh, _ := NewMesh(map[string]int{"dp": 2, "tp": 2})
	samples := []Sample{{InputIDs: []int64{1}, Labels: []int64{-100}}, {InputIDs: []int64{2}, Labels: []int64{-100}}}
	slices, _ := SliceBatch(mesh, samples)
	_, a := decode(t, slices[0], "input_ids")
	_, b := decode(t, slices[1], "input_ids")
	_, c := decode(t, slices[2], "input_ids")
	if !reflect.DeepEqual(a, []int64{1}) || !reflect.DeepEqual(b, a) || !reflect.DeepEqual(c, []int64{2}) {
		t.Fatalf("slices %v %v %v", a, b, c)
	}
}

func output(t *testing.T, lossSum float64, tokens int64, rows [][]float32) *workerv1.ForwardOutput {
	t.Helper()
	width := len(rows[0])
	var flat []float32
	for _, row := range rows {
		flat = append(flat, row...)
	}
	logps, err := Float32Tensor([]int64{int64(len(rows)), int64(width)}, flat)
	if err != nil {
		t.Fatal(err)
	}
	return &workerv1.ForwardOutput{LossSum: lossSum, NumTokens: tokens, Loss: lossSum / float64(tokens),
		Outputs: &workerv1.TensorMap{Tensors: map[string]*workerv1.Tensor{"logps": logps}}}
}

func TestMergeSumsOverSumsInDataRankOrder(t *testing.T) {
	// HSDP fsdp=2, dp=2: global ranks 0..3 have data ranks 0, 2, 1, 3, so data rank 1's samples come
	// from global rank 2. Per-rank means would give (1 + 2 + 3 + 4) / 4 = 2.5; sum / sum is 30/12.
	mesh, _ := NewMesh(map[string]int{"fsdp": 2, "dp": 2})
	outputs := []*workerv1.ForwardOutput{
		output(t, 1, 1, [][]float32{{-0.1, 0}}),          // data rank 0: sample 0
		output(t, 9, 3, [][]float32{{-0.3, -0.4, -0.5}}), // data rank 2: sample 2
		output(t, 4, 2, [][]float32{{-0.2, -0.25}}),      // data rank 1: sample 1
		output(t, 16, 6, [][]float32{{-0.6}}),            // data rank 3: sample 3
	}
	merged, err := MergeOutputs(mesh, outputs, []int{1, 2, 3, 1})
	if err != nil {
		t.Fatal(err)
	}
	if merged.NumTokens != 12 || merged.LossSum != 30 || math.Abs(merged.Loss-30.0/12) > 1e-15 {
		t.Fatalf("merged %+v", merged)
	}
	want := [][]float32{{-0.1}, {-0.2, -0.25}, {-0.3, -0.4, -0.5}, {-0.6}}
	if !reflect.DeepEqual(merged.Logps, want) {
		t.Fatalf("logps %v, want %v (sample order, trimmed)", merged.Logps, want)
	}
}

func TestMergeCountsTensorParallelCopiesOnce(t *testing.T) {
	mesh, _ := NewMesh(map[string]int{"dp": 2, "tp": 2})
	outputs := []*workerv1.ForwardOutput{
		output(t, 2, 1, [][]float32{{-1}}), output(t, 2, 1, [][]float32{{-1}}),
		output(t, 6, 2, [][]float32{{-2}}), output(t, 6, 2, [][]float32{{-2}}),
	}
	merged, _ := MergeOutputs(mesh, outputs, nil)
	if merged.NumTokens != 3 || merged.LossSum != 8 || len(merged.Logps) != 2 {
		t.Fatalf("merged %+v", merged)
	}
}
