#!/usr/bin/env node
'use strict';
// Trains a LoRA adapter on a mesh of Twinkle workers from Node, speaking only
// the protocol in protos/ (docs/protocol.md): Init, AddAdapter, SetOptimizer,
// ForwardBackward + ClipGradAndStep per micro-batch, a ForwardOnly evaluation,
// Save, optionally ExportWeights, and Reset to release the workers at the end
// (also after a failure). Prints one JSON object per line.
//
//   node train.js --workers 127.0.0.1:50051,127.0.0.1:50052 --mesh dp=2 \
//                 --data job.json [--seed 0] [--token T] [--export-weights out.safetensors] [--stream]
//
// job.json: {"batches": [[{"input_ids": [...], "labels": [...]}, ...], ...],
//            "model": {...}, "lora": {...}, "optimizer": {...}, "train": {...}, "save": {...}}
// Every section but "batches" is optional; DEFAULT_JOB shows the keys.

const fs = require('node:fs');
const net = require('node:net');
const { parseArgs } = require('node:util');

const { Coordinator, toStruct } = require('./lib/coordinator');
const { DeviceMesh, sliceBounds } = require('./lib/mesh');
const { batchToTensorMap, decodeTensor } = require('./lib/tensor');

const DEFAULT_JOB = {
  model: {
    model_id: '', // a directory on the workers' host; empty: build from config_json
    model_class: '', // empty: AutoModelForCausalLM
    config_json: '', // a transformers config as a JSON string, or an object
    device: 'cpu',
    mixed_precision: 'MIXED_PRECISION_NO',
    strategy: 'STRATEGY_ACCELERATE',
    seed: 0,
  },
  adapter_name: 'default',
  lora: { r: 8, lora_alpha: 16, lora_dropout: 0, target_modules: ['all-linear'] },
  optimizer: { optimizer: 'AdamW', lr: 1e-3, weight_decay: 0 },
  train: { max_grad_norm: 1.0, gradient_accumulation_steps: 1 },
  save: { name: 'node-adapter', output_dir: '' },
};

function readJob(file) {
  const job = JSON.parse(fs.readFileSync(file, 'utf8'));
  const merged = { ...DEFAULT_JOB, ...job };
  for (const section of ['model', 'lora', 'optimizer', 'train', 'save']) {
    merged[section] = { ...DEFAULT_JOB[section], ...(job[section] ?? {}) };
  }
  if (typeof merged.model.config_json !== 'string') {
    merged.model.config_json = JSON.stringify(merged.model.config_json);
  }
  if (!Array.isArray(merged.batches) || merged.batches.length === 0) {
    throw new Error(`${file}: "batches" must be a non-empty list of micro-batches`);
  }
  return merged;
}

// A TCP port that is free now on this machine, for the rendezvous of rank 0.
function freeLocalPort(host) {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, host, () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

const LOOPBACK = new Set(['127.0.0.1', 'localhost', '::1', '[::1]']);

function hostOf(address) {
  const at = address.lastIndexOf(':');
  return address.slice(0, at);
}

function emit(event, fields) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
}

// Splits a micro-batch by data rank and builds each global rank's inputs:
// peers with the same data rank (tp/pp/cp) get the same slice.
function inputsByRank(mesh, samples) {
  const byDataRank = [];
  for (let d = 0; d < mesh.dataWorldSize; d++) {
    const [start, end] = sliceBounds(samples.length, d, mesh.dataWorldSize);
    byDataRank.push(batchToTensorMap(samples.slice(start, end)));
  }
  return (rank) => byDataRank[mesh.dataRank(rank)];
}

// The global loss of a micro-batch: token-loss sums over the collect ranks
// (one per data rank) divided by their token count. Per-sample logps come back
// in data-rank order, which is the original sample order; each row is trimmed
// to its sample's length (slices are padded to their own longest sample).
function mergeOutputs(mesh, outputs, samples) {
  let lossSum = 0;
  let numTokens = 0;
  const logps = [];
  for (const rank of mesh.collectRanks()) {
    const output = outputs[rank];
    lossSum += Number(output.loss_sum);
    numTokens += Number(output.num_tokens);
    const tensor = output.outputs?.tensors?.logps;
    if (tensor) {
      const { shape, values } = decodeTensor(tensor);
      for (let row = 0; row < shape[0]; row++) {
        const length = samples[logps.length].input_ids.length;
        logps.push(values.slice(row * shape[1], row * shape[1] + length));
      }
    }
  }
  return { loss: numTokens > 0 ? lossSum / numTokens : 0, lossSum, numTokens, logps };
}

// Writes tensors {name: {dtype, shape, data}} as a .safetensors file: the wire
// bytes are already what safetensors stores (little-endian, row-major).
const SAFETENSORS_DTYPE = {
  DATA_TYPE_FLOAT32: 'F32', DATA_TYPE_FLOAT64: 'F64', DATA_TYPE_FLOAT16: 'F16', DATA_TYPE_BFLOAT16: 'BF16',
  DATA_TYPE_INT64: 'I64', DATA_TYPE_INT32: 'I32', DATA_TYPE_INT16: 'I16', DATA_TYPE_INT8: 'I8',
  DATA_TYPE_UINT8: 'U8', DATA_TYPE_BOOL: 'BOOL',
};

function writeSafetensors(file, tensors) {
  const header = {};
  const chunks = [];
  let offset = 0;
  for (const name of Object.keys(tensors).sort()) {
    const { dtype, shape, data } = tensors[name];
    header[name] = { dtype: SAFETENSORS_DTYPE[dtype], shape, data_offsets: [offset, offset + data.length] };
    chunks.push(data);
    offset += data.length;
  }
  let json = Buffer.from(JSON.stringify(header));
  json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  fs.writeFileSync(file, Buffer.concat([length, json, ...chunks]));
}

// Reassembles the chunks of one rank's ExportWeights stream into whole tensors.
// The first chunk of a tensor names it; later chunks may leave name, dtype and
// shape empty and continue the current tensor.
function exportWeights(worker, adapterName) {
  return new Promise((resolve, reject) => {
    const tensors = {};
    let current = null;
    // The export runs collectives: numbered like every such call, so it runs in its turn.
    const request = { adapter_name: adapterName, chunk_bytes: 0, context: worker.nextContext() };
    const stream = worker.client.ExportWeights(request, worker.metadata());
    stream.on('data', (piece) => {
      if (piece.name && piece.name !== current?.name) {
        current = {
          name: piece.name,
          dtype: piece.dtype,
          shape: piece.shape.map(Number),
          data: Buffer.alloc(Number(piece.total_bytes)),
          received: 0,
        };
        tensors[piece.name] = current;
      }
      if (!current) {
        stream.cancel();
        reject(new Error('ExportWeights: the first chunk carries no tensor name'));
        return;
      }
      piece.data.copy(current.data, Number(piece.offset));
      current.received += piece.data.length;
    });
    stream.on('error', (error) => reject(new Error(`rank ${worker.rank} ExportWeights: ${error.details ?? error.message}`)));
    stream.on('end', () => {
      for (const [name, tensor] of Object.entries(tensors)) {
        if (tensor.received !== tensor.data.length) {
          reject(new Error(`ExportWeights: ${name} has ${tensor.received} of ${tensor.data.length} bytes`));
          return;
        }
      }
      resolve(tensors);
    });
  });
}

async function train(args) {
  const job = readJob(args.data);
  const addresses = args.workers.split(',').filter(Boolean);
  const mesh = args.mesh ? DeviceMesh.parse(args.mesh) : new DeviceMesh({ dp: addresses.length });
  const seed = args.seed !== undefined ? Number(args.seed) : job.model.seed;
  // Refuse what can be refused before any worker is touched.
  for (const [index, samples] of job.batches.entries()) {
    if (samples.length < mesh.dataWorldSize) {
      throw new Error(
        `batch ${index} has ${samples.length} samples, fewer than the data world size ${mesh.dataWorldSize}`,
      );
    }
  }
  const tls =
    args['tls-ca'] || args['tls-cert'] || args.tls
      ? { ca: args['tls-ca'], cert: args['tls-cert'], key: args['tls-key'], serverName: args['tls-server-name'] }
      : null;
  const coordinator = new Coordinator(addresses, mesh, {
    token: args.token ?? process.env.TWINKLE_TOKEN ?? '',
    timeoutSeconds: Number(args.timeout),
    tls,
    onInDoubt: (call) => emit('in_doubt', call), // resent with its number: it runs once
  });
  const adapterName = job.adapter_name;
  // --stream sends batches and receives outputs as raw bytes after a header
  // (the framing for payloads too big for one message); same results.
  const forwardBackward = args.stream ? 'ForwardBackwardStream' : 'ForwardBackward';
  const forwardOnly = args.stream ? 'ForwardOnlyStream' : 'ForwardOnly';
  try {
    // Rank 0 hosts the rendezvous: ask it for a port that is free on its host.
    const masterAddr = hostOf(addresses[0]).replace(/^\[|\]$/g, '');
    let masterPort = Number(args['master-port'] ?? 0);
    if (!masterPort && mesh.worldSize > 1) {
      const status = await coordinator.workers[0].query('GetStatus', {});
      masterPort = status.free_port || (LOOPBACK.has(masterAddr) ? await freeLocalPort(masterAddr) : 0);
      if (!masterPort) throw new Error('rank 0 reported no free port: pass --master-port');
    }

    const init = await coordinator.all('Init', (rank) => ({
      ...job.model,
      seed: String(seed),
      mesh: mesh.toProto(),
      rank,
      rendezvous: { master_addr: masterAddr, master_port: masterPort, timeout_seconds: 120 },
    }));
    init.forEach((response, rank) =>
      emit('init', {
        rank,
        data_rank: response.data_rank,
        data_world_size: response.data_world_size,
        num_parameters: Number(response.num_parameters),
        strategy: response.strategy_description,
      }),
    );
    // Token ids and labels are checked against the model's vocabulary before any
    // collective runs: a bad id on one rank must not leave the others waiting in
    // an all-reduce.
    const vocabSize = Number(init[0].vocab_size);
    const outside = (id) => id < 0 || id >= vocabSize;
    for (const [index, samples] of job.batches.entries()) {
      for (const sample of samples) {
        if (sample.input_ids.some(outside) || sample.labels.some((label) => label !== -100 && outside(label))) {
          throw new Error(`batch ${index}: token ids and labels must lie in [0, ${vocabSize}) (labels: or -100)`);
        }
      }
    }

    const { extra, ...lora } = job.lora;
    const adapter = await coordinator.all('AddAdapter', () => ({
      adapter_name: adapterName,
      lora_config: { ...lora, extra: toStruct(extra) },
      gradient_accumulation_steps: job.train.gradient_accumulation_steps,
    }));
    emit('adapter', { name: adapterName, num_trainable_parameters: Number(adapter[0].num_trainable_parameters) });

    const { optimizer, lr, weight_decay, ...kwargs } = job.optimizer;
    await coordinator.all('SetOptimizer', () => ({
      adapter_name: adapterName,
      optimizer,
      lr,
      weight_decay,
      kwargs: toStruct(kwargs),
    }));

    for (const [index, samples] of job.batches.entries()) {
      const inputsFor = inputsByRank(mesh, samples);
      const forward = await coordinator.all(forwardBackward, (rank) => ({
        adapter_name: adapterName,
        inputs: inputsFor(rank),
        gradient_accumulation_steps: job.train.gradient_accumulation_steps,
      }));
      const merged = mergeOutputs(mesh, forward.map((response) => response.output), samples);
      const step = await coordinator.all('ClipGradAndStep', () => ({
        adapter_name: adapterName,
        max_grad_norm: job.train.max_grad_norm,
        gradient_accumulation_steps: job.train.gradient_accumulation_steps,
      }));
      emit('step', {
        micro_batch: index,
        loss: merged.loss,
        loss_sum: merged.lossSum,
        num_tokens: merged.numTokens,
        applied: step[0].applied,
        grad_norm: step[0].grad_norm,
        lr: step[0].lr,
        optimizer_step: Number(step[0].optimizer_step),
      });
    }

    const evaluation = await coordinator.all(forwardOnly, (rank) => ({
      adapter_name: adapterName,
      inputs: inputsByRank(mesh, job.batches[0])(rank),
    }));
    const evaluated = mergeOutputs(mesh, evaluation.map((response) => response.output), job.batches[0]);
    emit('eval', { loss: evaluated.loss, num_tokens: evaluated.numTokens, logps: evaluated.logps });

    const saved = await coordinator.all('Save', () => ({
      adapter_name: adapterName,
      name: job.save.name,
      output_dir: job.save.output_dir,
    }));
    emit('saved', { saved: saved[0].saved, path: saved[0].path });

    if (args['export-weights']) {
      // Every rank is asked at once (under FSDP the export gathers shards in a
      // collective); rank 0 streams the weights, the others send nothing.
      const exported = await Promise.all(coordinator.workers.map((worker) => exportWeights(worker, adapterName)));
      const tensors = exported[0];
      writeSafetensors(args['export-weights'], tensors);
      emit('exported', { file: args['export-weights'], tensors: Object.keys(tensors).length });
    }
  } finally {
    for (const error of await coordinator.release()) process.stderr.write(`release: ${error.message}\n`);
    coordinator.close();
  }
}

const USAGE = `usage: node train.js --workers HOST:PORT[,HOST:PORT...] --data JOB.json
       [--mesh dp=N[,fsdp=N,tp=N,...]] [--seed N] [--token TOKEN] [--master-port P]
       [--timeout SECONDS] [--export-weights FILE.safetensors] [--stream]
       [--tls] [--tls-ca CA.pem] [--tls-cert CLIENT.pem --tls-key CLIENT.key] [--tls-server-name NAME]`;

async function main() {
  const { values } = parseArgs({
    options: {
      workers: { type: 'string' },
      mesh: { type: 'string' },
      data: { type: 'string' },
      seed: { type: 'string' },
      token: { type: 'string' },
      'master-port': { type: 'string' },
      timeout: { type: 'string', default: '600' },
      'export-weights': { type: 'string' },
      stream: { type: 'boolean', default: false },
      tls: { type: 'boolean', default: false },
      'tls-ca': { type: 'string' },
      'tls-cert': { type: 'string' },
      'tls-key': { type: 'string' },
      'tls-server-name': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help || !values.workers || !values.data) {
    process.stderr.write(`${USAGE}\n`);
    process.exitCode = values.help ? 0 : 2;
    return;
  }
  try {
    await train(values);
    emit('done', {});
  } catch (error) {
    emit('error', {
      message: error.message,
      code: error.code ?? null,
      rank: error.rank ?? null,
      reason: error.reason ?? null,
      metadata: error.metadata ?? {},
    });
    process.stderr.write(`${error.stack}\n`);
    process.exitCode = 1;
  }
}

if (require.main === module) main();

module.exports = { inputsByRank, mergeOutputs, writeSafetensors, readJob };
