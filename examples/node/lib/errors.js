'use strict';
// Reads the google.rpc.ErrorInfo (AIP-193) that a worker attaches to every error
// status: the google.rpc.Status in the `grpc-status-details-bin` trailer, decoded
// with the .proto files in protos/google/rpc. Its `reason` (e.g.
// OWNED_BY_OTHER_SESSION, UNKNOWN_ADAPTER, PEER_FAILED) and `metadata.rank` /
// `metadata.field` tell the failures apart without parsing the message
// (docs/protocol.md, "Errors").

const fs = require('node:fs');
const path = require('node:path');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', '..', 'protos');
const DETAILS_KEY = 'grpc-status-details-bin';
const ERROR_INFO_URL = 'type.googleapis.com/google.rpc.ErrorInfo';

let types = null;

// google.rpc.Status and google.rpc.ErrorInfo, loaded once; google/protobuf/*
// imports resolve to protobufjs's bundled copies.
function statusTypes(protoRoot = PROTO_ROOT) {
  if (types) return types;
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => {
    const local = path.join(protoRoot, target);
    return fs.existsSync(local) ? local : protobuf.util.path.resolve(origin, target);
  };
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  types = { Status: root.lookupType('google.rpc.Status'), ErrorInfo: root.lookupType('google.rpc.ErrorInfo') };
  return types;
}

// The ErrorInfo of a failed @grpc/grpc-js call as { reason, domain, metadata },
// or null when its status carries none (e.g. a connection that failed).
function errorInfo(error) {
  const values = error?.metadata?.get ? error.metadata.get(DETAILS_KEY) : [];
  if (!values.length) return null;
  const { Status, ErrorInfo } = statusTypes();
  const status = Status.decode(values[0]);
  const detail = status.details.find((any) => any.type_url === ERROR_INFO_URL);
  if (!detail) return null;
  const info = ErrorInfo.toObject(ErrorInfo.decode(detail.value), { defaults: true });
  return { reason: info.reason, domain: info.domain, metadata: info.metadata ?? {} };
}

module.exports = { errorInfo, DETAILS_KEY };
