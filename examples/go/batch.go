package twinkle

// Slicing a micro-batch by data rank, padding each slice, and merging the answers
// (docs/protocol.md sections 5 and 8).

import (
	"fmt"

	workerv1 "example.com/twinkle/gen/twinkle/worker/v1"
)

// IgnoreIndex marks a label that carries no loss.
const IgnoreIndex = -100

// Sample is one training sample: labels[t] is the target of position t (already shifted), or -100.
type Sample struct {
	InputIDs []int64 `json:"input_ids"`
	Labels   []int64 `json:"labels"`
}

// CausalLabels gives the usual causal-LM labels of ids: ids shifted left by one, the last -100.
func CausalLabels(ids []int64) []int64 {
	labels := make([]int64, len(ids))
	for t := range ids {
		if t+1 < len(ids) {
			labels[t] = ids[t+1]
		} else {
			labels[t] = IgnoreIndex
		}
	}
	return labels
}

// Validate checks a sample before anything is sent: a call one rank refuses leaves its peers
// waiting for the agreement, so the scheduler refuses bad data itself.
func (s Sample) Validate(index int, vocabSize int64) error {
	if len(s.InputIDs) == 0 {
		return fmt.Errorf("sample %d: input_ids is empty", index)
	}
	if len(s.Labels) != len(s.InputIDs) {
		return fmt.Errorf("sample %d: %d labels for %d input_ids", index, len(s.Labels), len(s.InputIDs))
	}
	for t, id := range s.InputIDs {
		if id < 0 || (vocabSize > 0 && id >= vocabSize) {
			return fmt.Errorf("sample %d: input_ids[%d] = %d is outside the vocabulary [0, %d)", index, t, id, vocabSize)
		}
	}
	for t, label := range s.Labels {
		if label != IgnoreIndex && (label < 0 || (vocabSize > 0 && label >= vocabSize)) {
			return fmt.Errorf("sample %d: labels[%d] = %d is neither -100 nor in [0, %d)", index, t, label, vocabSize)
		}
	}
	return nil
}

// PadSlice right-pads samples to the longest of them and encodes the [b, T] int64 tensors
// input_ids (pad 0), attention_mask (1 token, 0 pad) and labels (pad -100).
func PadSlice(samples []Sample) (*workerv1.TensorMap, error) {
	if len(samples) == 0 {
		return nil, fmt.Errorf("an empty slice")
	}
	width := 0
	for _, s := range samples {
		if len(s.InputIDs) > width {
			width = len(s.InputIDs)
		}
	}
	n := len(samples) * width
	ids, mask, labels := make([]int64, n), make([]int64, n), make([]int64, n)
	for i, s := range samples {
		for t := 0; t < width; t++ {
			k := i*width + t
			if t < len(s.InputIDs) {
				ids[k], mask[k], labels[k] = s.InputIDs[t], 1, s.Labels[t]
			} else {
				labels[k] = IgnoreIndex
			}
		}
	}
	shape := []int64{int64(len(samples)), int64(width)}
	tensors := map[string]*workerv1.Tensor{}
	for name, values := range map[string][]int64{"input_ids": ids, "attention_mask": mask, "labels": labels} {
		tensor, err := Int64Tensor(shape, values)
		if err != nil {
			return nil, err
		}
		tensors[name] = tensor
	}
	return &workerv1.TensorMap{Tensors: tensors}, nil
}

// SliceBatch gives each global rank of the mesh its padded slice of the micro-batch: ranks
// that share a data rank (tp/cp/pp peers) get the same slice.
func SliceBatch(mesh Mesh, samples []Sample) ([]*workerv1.TensorMap, error) {
	dws := mesh.DataWorldSize()
	byDataRank := make([]*workerv1.TensorMap, dws)
	for d := 0; d < dws; d++ {
		start, end, err := SliceBounds(len(samples), d, dws)
		if err != nil {
			return nil, err
		}
		if byDataRank[d], err = PadSlice(samples[start:end]); err != nil {
			return nil, err
		}
	}
	slices := make([]*workerv1.TensorMap, mesh.WorldSize())
	for rank := range slices {
		d, err := mesh.DataRank(rank)
		if err != nil {
			return nil, err
		}
		slices[rank] = byDataRank[d]
	}
	return slices, nil
}

// Merged is one micro-batch's answer over the whole mesh.
type Merged struct {
	Loss      float64     // sum of token losses / sum of tokens, over the collect ranks
	LossSum   float64     // sum of token losses
	NumTokens int64       // label tokens in the micro-batch
	Logps     [][]float32 // per sample, in the original sample order, trimmed to each sample's length
}

// MergeOutputs merges the ranks' ForwardOutputs (outputs[r] from global rank r) over the collect
// ranks in data-rank order: losses as sum / sum (never the mean of means), and the per-sample
// logps concatenated back into sample order and trimmed to lengths[i] (nil: no trimming).
func MergeOutputs(mesh Mesh, outputs []*workerv1.ForwardOutput, lengths []int) (Merged, error) {
	var merged Merged
	if len(outputs) != mesh.WorldSize() {
		return merged, fmt.Errorf("%d outputs for a mesh of %d ranks", len(outputs), mesh.WorldSize())
	}
	for _, rank := range mesh.CollectRanks() {
		out := outputs[rank]
		merged.LossSum += out.GetLossSum()
		merged.NumTokens += out.GetNumTokens()
		logps, ok := out.GetOutputs().GetTensors()["logps"]
		if !ok {
			continue
		}
		values, err := Float32s("logps", logps)
		if err != nil {
			return merged, fmt.Errorf("rank %d: %v", rank, err)
		}
		if len(logps.GetShape()) != 2 {
			return merged, fmt.Errorf("rank %d: logps has shape %v, not [b, T]", rank, logps.GetShape())
		}
		rows, width := int(logps.Shape[0]), int(logps.Shape[1])
		for i := 0; i < rows; i++ {
			row := values[i*width : (i+1)*width]
			if lengths != nil {
				k := len(merged.Logps)
				if k >= len(lengths) || lengths[k] > width {
					return merged, fmt.Errorf("rank %d: logps row %d does not match the batch", rank, i)
				}
				row = row[:lengths[k]]
			}
			merged.Logps = append(merged.Logps, row)
		}
	}
	if merged.NumTokens > 0 {
		merged.Loss = merged.LossSum / float64(merged.NumTokens)
	}
	return merged, nil
}
