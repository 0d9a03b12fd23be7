'use strict';
// A minimal coordinator over the WorkerService of every rank of a mesh: loads
// the .proto files at run time (no generated code), numbers each worker's calls,
// sends a call to all ranks concurrently, and follows the Python client's retry
// rule (docs/protocol.md, section 9): UNAVAILABLE is resent with the same
// sequence number; a call whose outcome stayed unknown (UNAVAILABLE after the
// retries, DEADLINE_EXCEEDED, CANCELLED) is "in doubt" and is resent, with its
// own number, before the next call, so it runs exactly once. Plaintext, or TLS
// with a CA (and optionally a client certificate for mutual TLS).

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { errorInfo } = require('./errors');
const { framedCall, splitTensorMap } = require('./streaming');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'protos');

// keepCase: field names exactly as in the .proto (snake_case); longs as strings
// so int64 values above 2**53 survive; enums as their names.
function loadWorkerService(protoRoot = PROTO_ROOT) {
  const definition = protoLoader.loadSync(['twinkle/worker/v1/worker.proto'], {
    includeDirs: [protoRoot],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  // protobufjs supplies google/protobuf/struct.proto itself, with camelCase field
  // names whatever keepCase says; read them from the loaded descriptor.
  const valueFields = definition['google.protobuf.Value'].type.field.map((field) => field.name);
  structKeys = valueFields.includes('number_value') ? SNAKE_KEYS : CAMEL_KEYS;
  return grpc.loadPackageDefinition(definition).twinkle.worker.v1.WorkerService;
}

const SNAKE_KEYS = { null: 'null_value', number: 'number_value', string: 'string_value', bool: 'bool_value', struct: 'struct_value', list: 'list_value' };
const CAMEL_KEYS = { null: 'nullValue', number: 'numberValue', string: 'stringValue', bool: 'boolValue', struct: 'structValue', list: 'listValue' };
let structKeys = CAMEL_KEYS;

// A JavaScript object -> google.protobuf.Struct as proto-loader expects it.
function toValue(value) {
  const k = structKeys;
  if (value === null || value === undefined) return { [k.null]: 'NULL_VALUE' };
  if (typeof value === 'number') return { [k.number]: value };
  if (typeof value === 'string') return { [k.string]: value };
  if (typeof value === 'boolean') return { [k.bool]: value };
  if (Array.isArray(value)) return { [k.list]: { values: value.map(toValue) } };
  return { [k.struct]: toStruct(value) };
}

function toStruct(object) {
  const fields = {};
  for (const [key, value] of Object.entries(object ?? {})) fields[key] = toValue(value);
  return { fields };
}

// A failed call of one rank. `rank`: the rank it was sent to; `reason`, `domain`,
// `metadata` (with `rank` and, where there is one, `field`): the ErrorInfo the
// worker sent (lib/errors.js), null / {} when the status carried none.
class RankError extends Error {
  constructor(rank, address, method, cause) {
    super(`rank ${rank} (${address}) ${method}: ${grpc.status[cause.code] ?? cause.code}: ${cause.details ?? cause.message}`);
    this.rank = rank;
    this.code = cause.code;
    const info = errorInfo(cause);
    this.reason = info?.reason ?? null;
    this.domain = info?.domain ?? null;
    this.metadata = info?.metadata ?? {};
  }
}

// Outcomes that leave a sequenced call unconfirmed: it may or may not have run.
const IN_DOUBT = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED, grpc.status.CANCELLED]);

// Channel credentials: plaintext, or TLS with `tls.ca` (PEM file of the CA that
// signed the workers' certificates; the system roots when absent) and, for
// mutual TLS, `tls.cert` + `tls.key` (this client's certificate).
function credentialsFor(tls) {
  if (!tls) return grpc.credentials.createInsecure();
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(tls.ca), read(tls.key), read(tls.cert));
}

class Worker {
  constructor(Service, rank, address, { token, timeoutSeconds, retries, sessionId, tls, onInDoubt }) {
    this.rank = rank;
    this.address = address;
    this.sessionId = sessionId;
    const options = {
      'grpc.max_send_message_length': 64 * 1024 * 1024,
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
    };
    if (tls?.serverName) options['grpc.ssl_target_name_override'] = tls.serverName;
    this.client = new Service(address, credentialsFor(tls), options);
    this.token = token;
    this.timeoutSeconds = timeoutSeconds;
    this.retries = retries;
    this.lastSequenceNumber = 0;
    this.inDoubt = []; // [{method, request}] sent, outcome unknown: resent before the next call
    this.onInDoubt = onInDoubt ?? (() => {});
  }

  metadata() {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    // Lets a worker owned by another session refuse the call before reading it.
    metadata.set('twinkle-session-id', this.sessionId);
    return metadata;
  }

  // The next CallContext: a new sequence number of this worker, and the session.
  nextContext() {
    this.lastSequenceNumber += 1;
    return { sequence_number: String(this.lastSequenceNumber), session_id: this.sessionId };
  }

  unary(method, request) {
    return new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + this.timeoutSeconds * 1000);
      this.client[method](request, this.metadata(), { deadline }, (error, response) =>
        error ? reject(error) : resolve(response),
      );
    });
  }

  // ForwardBackwardStream / ForwardOnlyStream: the request's `inputs` and the
  // response's `output.outputs` travel as raw bytes after a header message.
  framed(method, request) {
    const call = this.client[method](this.metadata(), {
      deadline: new Date(Date.now() + this.timeoutSeconds * 1000),
    });
    const { header, chunks } = splitTensorMap(request.inputs);
    return framedCall(call, { ...request, inputs: header }, chunks, (response) => response.output.outputs);
  }

  waitForReady(seconds) {
    return new Promise((resolve, reject) => {
      this.client.waitForReady(new Date(Date.now() + seconds * 1000), (error) =>
        error ? reject(error) : resolve(),
      );
    });
  }

  // A mutating call: first resends the calls in doubt (their outcome must be
  // known before a new number is used), then takes the next sequence number.
  // On UNAVAILABLE (the request may not have arrived) it resends the same number
  // once the channel is ready again; on DEADLINE_EXCEEDED or CANCELLED (it may be
  // running) it resends the same number too: the worker joins the running call
  // or returns its stored outcome, so it runs once. A call still unconfirmed
  // after `retries` resends stays in doubt and fails this call.
  async mutate(method, request) {
    await this.confirmInDoubt();
    const full = { ...request, context: this.nextContext() };
    return this.sendNumbered(method, full);
  }

  async sendNumbered(method, full) {
    const send = method.endsWith('Stream') ? () => this.framed(method, full) : () => this.unary(method, full);
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await send();
        this.inDoubt = this.inDoubt.filter((call) => call.request !== full);
        return response;
      } catch (error) {
        const doubtful = IN_DOUBT.has(error.code);
        if (!doubtful) this.inDoubt = this.inDoubt.filter((call) => call.request !== full);
        if (!doubtful || attempt >= this.retries) {
          if (doubtful && !this.inDoubt.some((call) => call.request === full)) this.inDoubt.push({ method, request: full });
          throw new RankError(this.rank, this.address, method, error);
        }
        this.onInDoubt({ rank: this.rank, method, sequence_number: full.context.sequence_number, code: error.code });
        if (error.code === grpc.status.UNAVAILABLE) await this.waitForReady(this.timeoutSeconds).catch(() => {});
      }
    }
  }

  // Resends every call in doubt with its own number; an answer (even an error)
  // settles it. One still unconfirmed fails the new call before it is sent.
  async confirmInDoubt() {
    for (const call of [...this.inDoubt]) {
      try {
        await this.sendNumbered(call.method, call.request);
      } catch (error) {
        if (IN_DOUBT.has(error.code)) throw error;
      }
    }
  }

  async query(method, request) {
    try {
      return await this.unary(method, request);
    } catch (error) {
      throw new RankError(this.rank, this.address, method, error);
    }
  }

  close() {
    this.client.close();
  }
}

class Coordinator {
  // addresses[r] serves global rank r of `mesh`. The session id marks this
  // client as the owner of the workers from Init until release() (Reset).
  constructor(addresses, mesh, { token = '', timeoutSeconds = 600, retries = 2, tls = null, onInDoubt } = {}) {
    if (addresses.length !== mesh.worldSize) {
      throw new Error(`mesh of ${mesh.worldSize} ranks needs ${mesh.worldSize} workers, got ${addresses.length}`);
    }
    const Service = loadWorkerService();
    this.mesh = mesh;
    this.sessionId = crypto.randomUUID().replace(/-/g, '');
    this.workers = addresses.map(
      (address, rank) =>
        new Worker(Service, rank, address, { token, timeoutSeconds, retries, sessionId: this.sessionId, tls, onInDoubt }),
    );
  }

  // Sends one request per rank, all at once (the ranks meet in collectives, so
  // calling them one after another would deadlock). requestFor(rank) builds each.
  // Waits for every rank, then reports the first failure, naming its rank.
  async all(method, requestFor) {
    const settled = await Promise.allSettled(
      this.workers.map((worker) => worker.mutate(method, requestFor(worker.rank))),
    );
    const failed = settled.find((result) => result.status === 'rejected');
    if (failed) throw failed.reason;
    return settled.map((result) => result.value);
  }

  async queryAll(method, request) {
    return Promise.all(this.workers.map((worker) => worker.query(method, request)));
  }

  // Ends this client's session on every rank (Reset drops the model), so that
  // another client can Init the workers without waiting for the lease to lapse.
  // Best effort: returns the errors instead of throwing them.
  async release() {
    const context = { sequence_number: '0', session_id: this.sessionId };
    const settled = await Promise.allSettled(this.workers.map((worker) => worker.query('Reset', { context })));
    return settled.filter((result) => result.status === 'rejected').map((result) => result.reason);
  }

  close() {
    for (const worker of this.workers) worker.close();
  }
}

module.exports = { Coordinator, RankError, loadWorkerService, toStruct, PROTO_ROOT };
