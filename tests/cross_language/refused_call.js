'use strict';
// Provokes refusals on a 2-rank mesh from Node and prints, per call and rank, what
// the Node client (examples/node/lib) read from the status: code, reason, metadata.
//
//   node refused_call.js <examples/node> <addr0,addr1> <config.json>
//
// Init both ranks (dp=2), then SetOptimizer and ForwardBackward naming adapter
// 'nope' on rank 1 only (rank 0: the full model). Prints one JSON line per rank
// and call: {"call", "rank", "ok", "code", "reason", "domain", "metadata"}.

const fs = require('node:fs');
const path = require('node:path');

const [nodeDir, workers, configFile] = process.argv.slice(2);
const { Coordinator } = require(path.join(nodeDir, 'lib', 'coordinator'));
const { DeviceMesh } = require(path.join(nodeDir, 'lib', 'mesh'));
const { batchToTensorMap } = require(path.join(nodeDir, 'lib', 'tensor'));

async function each(coordinator, method, requestFor) {
  const settled = await Promise.allSettled(
    coordinator.workers.map((worker) => worker.mutate(method, requestFor(worker.rank))),
  );
  settled.forEach((result, rank) => {
    const error = result.reason;
    const line = error
      ? { call: method, rank, ok: false, code: error.code, reason: error.reason, domain: error.domain, metadata: error.metadata }
      : { call: method, rank, ok: true };
    process.stdout.write(`${JSON.stringify(line)}\n`);
  });
}

async function main() {
  const mesh = new DeviceMesh({ dp: 2 });
  const coordinator = new Coordinator(workers.split(','), mesh, { timeoutSeconds: 300 });
  try {
    const status = await coordinator.workers[0].query('GetStatus', {});
    await coordinator.all('Init', (rank) => ({
      config_json: fs.readFileSync(configFile, 'utf8'),
      model_class: 'Qwen2ForCausalLM',
      mixed_precision: 'MIXED_PRECISION_NO',
      mesh: mesh.toProto(),
      rank,
      rendezvous: { master_addr: '127.0.0.1', master_port: status.free_port, timeout_seconds: 120 },
    }));
    const adapter = (rank) => (rank === 1 ? 'nope' : '');
    await each(coordinator, 'SetOptimizer', (rank) => ({ optimizer: 'AdamW', lr: 1e-3, adapter_name: adapter(rank) }));
    const inputs = batchToTensorMap([{ input_ids: [5, 6, 7, 8], labels: [6, 7, 8, -100] }]);
    await each(coordinator, 'ForwardBackward', (rank) => ({ inputs, adapter_name: adapter(rank) }));
  } finally {
    await coordinator.release();
    coordinator.close();
  }
}

main().catch((error) => {
  process.stderr.write(`${error.stack}\n`);
  process.exitCode = 1;
});
