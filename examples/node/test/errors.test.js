'use strict';
const test = require('node:test');
const assert = require('node:assert');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs');
const { errorInfo, DETAILS_KEY } = require('../lib/errors');

// A google.rpc.Status as a worker sends it, encoded here from the same .proto files.
function failedCall(reason, metadata) {
  const root = new protobuf.Root();
  const protos = path.resolve(__dirname, '..', '..', '..', 'protos');
  root.resolvePath = (origin, target) => (target.startsWith('google/rpc/') ? path.join(protos, target) : target);
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  const ErrorInfo = root.lookupType('google.rpc.ErrorInfo');
  const Status = root.lookupType('google.rpc.Status');
  const info = ErrorInfo.encode({ reason, domain: 'twinkle.worker.v1', metadata }).finish();
  const status = Status.encode({
    code: grpc.status.NOT_FOUND,
    message: 'unknown adapter',
    details: [{ type_url: 'type.googleapis.com/google.rpc.ErrorInfo', value: info }],
  }).finish();
  const trailer = new grpc.Metadata();
  trailer.set(DETAILS_KEY, Buffer.from(status));
  return { code: grpc.status.NOT_FOUND, details: 'unknown adapter', metadata: trailer };
}

test('errorInfo reads reason, domain and metadata from the status trailer', () => {
  const info = errorInfo(failedCall('UNKNOWN_ADAPTER', { rank: '1', field: 'adapter_name' }));
  assert.deepStrictEqual(info, {
    reason: 'UNKNOWN_ADAPTER',
    domain: 'twinkle.worker.v1',
    metadata: { rank: '1', field: 'adapter_name' },
  });
});

test('errorInfo is null for a status without details', () => {
  assert.strictEqual(errorInfo({ code: grpc.status.UNAVAILABLE, metadata: new grpc.Metadata() }), null);
  assert.strictEqual(errorInfo(new Error('no call')), null);
});
