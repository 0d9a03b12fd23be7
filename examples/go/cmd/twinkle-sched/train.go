package main

// The training job: the calls of docs/protocol.md section 4, each fanned out to every rank.

import (
	"context"
	"fmt"
	"math"

	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"example.com/twinkle"
	workerv1 "example.com/twinkle/gen/twinkle/worker/v1"
)

type trainer struct {
	client *twinkle.Client
	job    *Job
	resume bool
}

func (t *trainer) same(build func(*workerv1.CallContext) proto.Message) twinkle.Build {
	return func(_ int, context *workerv1.CallContext) proto.Message { return build(context) }
}

func (t *trainer) run(ctx context.Context) error {
	if err := t.init(ctx); err != nil {
		return err
	}
	if err := t.setUp(ctx); err != nil {
		return err
	}
	first := 0
	if t.resume {
		var err error
		if first, err = t.resumeFrom(ctx); err != nil {
			return err
		}
	}
	for m := first; m < t.job.MicroBatches(); m++ {
		if err := t.microBatch(ctx, m); err != nil {
			return err
		}
	}
	return t.save(ctx)
}

func (t *trainer) init(ctx context.Context) error {
	c, job := t.client, t.job
	rank0, err := c.Workers[0].Service.GetStatus(ctx, &workerv1.GetStatusRequest{})
	if err != nil {
		return &twinkle.RankError{Method: "GetStatus", Rank: 0, Address: c.Workers[0].Address,
			Code: status.Code(err), Detail: status.Convert(err).Message()}
	}
	rendezvous := &workerv1.Rendezvous{MasterAddr: c.Targets.MasterAddr, MasterPort: int32(c.Targets.MasterPort),
		TimeoutSeconds: job.RendezvousTimeoutSeconds}
	if rendezvous.MasterAddr == "" {
		rendezvous.MasterAddr = twinkle.HostOf(c.Workers[0].Address)
	}
	if rendezvous.MasterPort == 0 {
		rendezvous.MasterPort = rank0.GetFreePort()
	}
	config, err := job.configJSON()
	if err != nil {
		return err
	}
	sizes := make([]int32, len(c.Mesh.DimSizes))
	for i, size := range c.Mesh.DimSizes {
		sizes[i] = int32(size)
	}
	c.RestartSequence()
	replies, err := twinkle.All[workerv1.InitResponse](ctx, c, "Init", true,
		func(rank int, context *workerv1.CallContext) proto.Message {
			return &workerv1.InitRequest{
				Context: context, ModelId: job.Model.ModelID, ModelClass: job.Model.ModelClass, ConfigJson: config,
				Device: job.Model.Device, MixedPrecision: precisions[job.Model.MixedPrecision], Seed: job.Model.Seed,
				Mesh: &workerv1.DeviceMesh{DimNames: c.Mesh.DimNames, DimSizes: sizes}, Rank: int32(rank),
				Rendezvous: rendezvous,
			}
		})
	if err != nil {
		return err
	}
	for rank, reply := range replies {
		want, _ := c.Mesh.DataRank(rank)
		if int(reply.GetDataRank()) != want || int(reply.GetDataWorldSize()) != c.Mesh.DataWorldSize() {
			return fmt.Errorf("rank %d reports data rank %d of %d; the mesh says %d of %d", rank,
				reply.GetDataRank(), reply.GetDataWorldSize(), want, c.Mesh.DataWorldSize())
		}
		emit("init", map[string]interface{}{"rank": rank, "data_rank": reply.GetDataRank(),
			"data_world_size": reply.GetDataWorldSize(), "vocab_size": reply.GetVocabSize()})
	}
	vocab := replies[0].GetVocabSize()
	for m := 0; m < job.MicroBatches(); m++ { // refuse bad token ids before any rank sees them
		for i, sample := range job.MicroBatch(m) {
			if err := sample.Validate(m*job.MicroBatchSize+i, vocab); err != nil {
				return fmt.Errorf("batch file: %v", err)
			}
		}
	}
	return nil
}

func (t *trainer) setUp(ctx context.Context) error {
	job := t.job
	lora := &workerv1.LoraConfig{R: job.Lora.R, LoraAlpha: job.Lora.LoraAlpha, LoraDropout: job.Lora.LoraDropout,
		TargetModules: job.Lora.TargetModules}
	adapters, err := twinkle.All[workerv1.AddAdapterResponse](ctx, t.client, "AddAdapter", true,
		t.same(func(context *workerv1.CallContext) proto.Message {
			return &workerv1.AddAdapterRequest{Context: context, AdapterName: job.AdapterName,
				Source:                    &workerv1.AddAdapterRequest_LoraConfig{LoraConfig: lora},
				GradientAccumulationSteps: int32(job.GradientAccumulationSteps)}
		}))
	if err != nil {
		return err
	}
	emit("adapter", map[string]interface{}{"adapter_name": job.AdapterName,
		"trainable_parameters": adapters[0].GetNumTrainableParameters()})
	kwargs, _ := structpb.NewStruct(map[string]interface{}{})
	_, err = twinkle.All[workerv1.SetOptimizerResponse](ctx, t.client, "SetOptimizer", true,
		t.same(func(context *workerv1.CallContext) proto.Message {
			return &workerv1.SetOptimizerRequest{Context: context, AdapterName: job.AdapterName,
				Optimizer: job.Optimizer.Optimizer, Lr: job.Optimizer.LR, WeightDecay: job.Optimizer.WeightDecay,
				Kwargs: kwargs}
		}))
	return err
}

// resumeFrom restores the job's checkpoint (weights, optimizer, scheduler, counters) and
// returns the first micro-batch still to train.
func (t *trainer) resumeFrom(ctx context.Context) (int, error) {
	job := t.job
	replies, err := twinkle.All[workerv1.ResumeFromCheckpointResponse](ctx, t.client, "ResumeFromCheckpoint", true,
		t.same(func(context *workerv1.CallContext) proto.Message {
			return &workerv1.ResumeFromCheckpointRequest{Context: context, CheckpointDir: job.checkpointDir(),
				AdapterName: job.AdapterName}
		}))
	if err != nil {
		return 0, err
	}
	state := replies[0]
	consumed := int(state.GetConsumedTrainSamples())
	if consumed%job.MicroBatchSize != 0 || consumed/job.MicroBatchSize != int(state.GetCurStep())*job.GradientAccumulationSteps {
		return 0, fmt.Errorf("checkpoint %s: %d samples consumed at optimizer step %d do not fit micro-batches of %d "+
			"with %d per step", job.checkpointDir(), consumed, state.GetCurStep(), job.MicroBatchSize,
			job.GradientAccumulationSteps)
	}
	emit("resumed", map[string]interface{}{"checkpoint": job.checkpointDir(), "optimizer_step": state.GetCurStep(),
		"consumed_train_samples": consumed})
	return consumed / job.MicroBatchSize, nil
}

func (t *trainer) microBatch(ctx context.Context, m int) error {
	c, job := t.client, t.job
	samples := job.MicroBatch(m)
	slices, err := twinkle.SliceBatch(c.Mesh, samples)
	if err != nil {
		return err
	}
	ga := int32(job.GradientAccumulationSteps)
	forward, err := twinkle.All[workerv1.ForwardBackwardResponse](ctx, c, "ForwardBackward", true,
		func(rank int, context *workerv1.CallContext) proto.Message {
			return &workerv1.ForwardBackwardRequest{Context: context, AdapterName: job.AdapterName,
				Inputs: slices[rank], GradientAccumulationSteps: ga}
		})
	if err != nil {
		return err
	}
	outputs := make([]*workerv1.ForwardOutput, len(forward))
	for rank, reply := range forward {
		outputs[rank] = reply.GetOutput()
	}
	merged, err := twinkle.MergeOutputs(c.Mesh, outputs, nil)
	if err != nil {
		return err
	}
	steps, err := twinkle.All[workerv1.ClipGradAndStepResponse](ctx, c, "ClipGradAndStep", true,
		t.same(func(context *workerv1.CallContext) proto.Message {
			return &workerv1.ClipGradAndStepRequest{Context: context, AdapterName: job.AdapterName,
				MaxGradNorm: job.MaxGradNorm, GradientAccumulationSteps: ga}
		}))
	if err != nil {
		return err
	}
	step := steps[0] // identical on every rank
	emit("step", map[string]interface{}{"micro_batch": m, "loss": merged.Loss, "num_tokens": merged.NumTokens,
		"applied": step.GetApplied(), "grad_norm": finite(step.GetGradNorm()), "lr": step.GetLr(),
		"optimizer_step": step.GetOptimizerStep(), "micro_step": step.GetMicroStep()})
	every := int64(job.Checkpoint.EverySteps)
	if step.GetApplied() && every > 0 && step.GetOptimizerStep()%every == 0 {
		return t.checkpoint(ctx, (m+1)*job.MicroBatchSize)
	}
	return nil
}

// checkpoint saves weights, optimizer, scheduler and RNG under one fixed name; the worker
// swaps it into place atomically, so the previous one stays whole until the new one is.
func (t *trainer) checkpoint(ctx context.Context, consumed int) error {
	job := t.job
	replies, err := twinkle.All[workerv1.SaveResponse](ctx, t.client, "Save", true,
		t.same(func(context *workerv1.CallContext) proto.Message {
			return &workerv1.SaveRequest{Context: context, AdapterName: job.AdapterName, Name: job.Checkpoint.Name,
				OutputDir: job.Checkpoint.OutputDir, SaveOptimizer: true, ConsumedTrainSamples: int64(consumed)}
		}))
	if err != nil {
		return err
	}
	emit("checkpoint", map[string]interface{}{"path": replies[0].GetPath(), "consumed_train_samples": consumed})
	return nil
}

func (t *trainer) save(ctx context.Context) error {
	job := t.job
	if job.Save.Name == "" {
		return nil
	}
	replies, err := twinkle.All[workerv1.SaveResponse](ctx, t.client, "Save", true,
		t.same(func(context *workerv1.CallContext) proto.Message {
			return &workerv1.SaveRequest{Context: context, AdapterName: job.AdapterName, Name: job.Save.Name,
				OutputDir: job.Save.OutputDir}
		}))
	if err != nil {
		return err
	}
	emit("saved", map[string]interface{}{"path": replies[0].GetPath()})
	return nil
}

// finite keeps JSON valid: encoding/json refuses NaN and infinities.
func finite(value float64) interface{} {
	if math.IsNaN(value) || math.IsInf(value, 0) {
		return fmt.Sprint(value)
	}
	return value
}
