package main

// The job spec a scheduler hands to twinkle-sched, and its batch file.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"example.com/twinkle"
	workerv1 "example.com/twinkle/gen/twinkle/worker/v1"
)

// Job is the JSON job spec (README of examples/go has an example).
type Job struct {
	Model struct {
		ModelID        string          `json:"model_id"`        // a model directory on the workers' hosts
		ConfigJSON     json.RawMessage `json:"config_json"`     // or a transformers config (object or string)
		ModelClass     string          `json:"model_class"`     // from the workers' allow-list
		MixedPrecision string          `json:"mixed_precision"` // "no", "bf16" (default), "fp16", "fp8"
		Seed           int64           `json:"seed"`
		Device         string          `json:"device"`
	} `json:"model"`
	Mesh        string `json:"mesh"` // e.g. "fsdp=2,dp=2"; empty: dp = number of workers
	AdapterName string `json:"adapter_name"`
	Lora        struct {
		R             int32    `json:"r"`
		LoraAlpha     float64  `json:"lora_alpha"`
		LoraDropout   float64  `json:"lora_dropout"`
		TargetModules []string `json:"target_modules"`
	} `json:"lora"`
	Optimizer struct {
		Optimizer   string   `json:"optimizer"`
		LR          *float64 `json:"lr"`
		WeightDecay *float64 `json:"weight_decay"`
	} `json:"optimizer"`
	BatchFile                 string  `json:"batch_file"` // JSON lines of samples; relative to the spec
	MicroBatchSize            int     `json:"micro_batch_size"`
	Steps                     int     `json:"steps"` // optimizer steps
	GradientAccumulationSteps int     `json:"gradient_accumulation_steps"`
	MaxGradNorm               float64 `json:"max_grad_norm"`
	Checkpoint                struct {
		Name       string `json:"name"`
		OutputDir  string `json:"output_dir"`
		EverySteps int    `json:"every_steps"`
	} `json:"checkpoint"`
	Save struct {
		Name      string `json:"name"`
		OutputDir string `json:"output_dir"`
	} `json:"save"`
	RendezvousTimeoutSeconds float64 `json:"rendezvous_timeout_seconds"`

	samples []twinkle.Sample
}

var precisions = map[string]workerv1.MixedPrecision{
	"":     workerv1.MixedPrecision_MIXED_PRECISION_UNSPECIFIED,
	"no":   workerv1.MixedPrecision_MIXED_PRECISION_NO,
	"bf16": workerv1.MixedPrecision_MIXED_PRECISION_BF16,
	"fp16": workerv1.MixedPrecision_MIXED_PRECISION_FP16,
	"fp8":  workerv1.MixedPrecision_MIXED_PRECISION_FP8,
}

// LoadJob reads the spec and its batch file, fills in defaults and checks what can be checked
// before any call: a bad job is refused before the workers see anything.
func LoadJob(path string) (*Job, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	job := &Job{}
	decoder := json.NewDecoder(bytes.NewReader(data))
	decoder.DisallowUnknownFields()
	if err := decoder.Decode(job); err != nil {
		return nil, fmt.Errorf("job spec %s: %v", path, err)
	}
	if job.AdapterName == "" {
		job.AdapterName = "default"
	}
	if job.Optimizer.Optimizer == "" {
		job.Optimizer.Optimizer = "AdamW"
	}
	if job.GradientAccumulationSteps == 0 {
		job.GradientAccumulationSteps = 1
	}
	if job.Lora.R == 0 {
		job.Lora.R = 8
	}
	if len(job.Lora.TargetModules) == 0 {
		job.Lora.TargetModules = []string{"all-linear"}
	}
	if _, ok := precisions[job.Model.MixedPrecision]; !ok {
		return nil, fmt.Errorf("job spec: model.mixed_precision %q is not one of no, bf16, fp16, fp8", job.Model.MixedPrecision)
	}
	switch {
	case job.Steps < 1:
		return nil, fmt.Errorf("job spec: steps must be at least 1, got %d", job.Steps)
	case job.MicroBatchSize < 1:
		return nil, fmt.Errorf("job spec: micro_batch_size must be at least 1, got %d", job.MicroBatchSize)
	case job.GradientAccumulationSteps < 1:
		return nil, fmt.Errorf("job spec: gradient_accumulation_steps must be at least 1, got %d", job.GradientAccumulationSteps)
	case job.Model.ModelID == "" && len(job.Model.ConfigJSON) == 0:
		return nil, fmt.Errorf("job spec: model needs model_id or config_json")
	case job.Checkpoint.EverySteps > 0 && job.Checkpoint.Name == "":
		return nil, fmt.Errorf("job spec: checkpoint.every_steps needs checkpoint.name")
	case job.BatchFile == "":
		return nil, fmt.Errorf("job spec: batch_file is missing")
	}
	batchFile := job.BatchFile
	if !filepath.IsAbs(batchFile) {
		batchFile = filepath.Join(filepath.Dir(path), batchFile)
	}
	if job.samples, err = readSamples(batchFile); err != nil {
		return nil, err
	}
	if need := job.MicroBatches() * job.MicroBatchSize; len(job.samples) < need {
		return nil, fmt.Errorf("batch file %s holds %d samples; %d steps x %d micro-batches x %d samples need %d",
			batchFile, len(job.samples), job.Steps, job.GradientAccumulationSteps, job.MicroBatchSize, need)
	}
	return job, nil
}

// readSamples reads JSON lines {"input_ids": [...], "labels": [...]}; without labels, the
// causal-LM labels of the ids.
func readSamples(path string) ([]twinkle.Sample, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("batch file: %v", err)
	}
	defer file.Close()
	var samples []twinkle.Sample
	scanner := bufio.NewScanner(file)
	scanner.Buffer(make([]byte, 1<<20), 64<<20)
	for line := 1; scanner.Scan(); line++ {
		text := strings.TrimSpace(scanner.Text())
		if text == "" {
			continue
		}
		var sample twinkle.Sample
		if err := json.Unmarshal([]byte(text), &sample); err != nil {
			return nil, fmt.Errorf("batch file %s line %d: %v", path, line, err)
		}
		if sample.Labels == nil {
			sample.Labels = twinkle.CausalLabels(sample.InputIDs)
		}
		if err := sample.Validate(len(samples), 0); err != nil {
			return nil, fmt.Errorf("batch file %s line %d: %v", path, line, err)
		}
		samples = append(samples, sample)
	}
	return samples, scanner.Err()
}

// MicroBatches in the whole job.
func (j *Job) MicroBatches() int { return j.Steps * j.GradientAccumulationSteps }

// MicroBatch m: samples [m*B, (m+1)*B) of the batch file.
func (j *Job) MicroBatch(m int) []twinkle.Sample {
	return j.samples[m*j.MicroBatchSize : (m+1)*j.MicroBatchSize]
}

func (j *Job) configJSON() (string, error) {
	if len(j.Model.ConfigJSON) == 0 {
		return "", nil
	}
	var text string
	if err := json.Unmarshal(j.Model.ConfigJSON, &text); err == nil {
		return text, nil // given as a string already
	}
	var object map[string]interface{}
	if err := json.Unmarshal(j.Model.ConfigJSON, &object); err != nil {
		return "", fmt.Errorf("job spec: model.config_json is neither a JSON object nor a string")
	}
	return string(j.Model.ConfigJSON), nil
}

// checkpointDir is the checkpoint's directory relative to the workers' output root.
func (j *Job) checkpointDir() string {
	if j.Checkpoint.OutputDir == "" {
		return j.Checkpoint.Name
	}
	return filepath.Join(j.Checkpoint.OutputDir, j.Checkpoint.Name)
}
