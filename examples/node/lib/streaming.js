'use strict';
// The header + raw-bytes framing of ForwardBackwardStream / ForwardOnlyStream
// (docs/protocol.md, "Streaming"): the first message is the unary message with
// every Tensor's data left empty; then `data` messages carry the tensors' bytes,
// tensor after tensor in the order of their TensorMap keys sorted by byte value.

const { ITEM_SIZE } = require('./tensor');

const CHUNK_BYTES = 1 << 20;

function byteOrder(a, b) {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

function byteSize(tensor) {
  const itemSize = ITEM_SIZE[tensor.dtype];
  if (!itemSize) throw new Error(`stream: unsupported dtype ${tensor.dtype}`);
  return tensor.shape.reduce((a, b) => a * Number(b), 1) * itemSize;
}

// Splits a TensorMap into its header form (no data) and the list of data chunks.
function splitTensorMap(tensorMap) {
  const keys = Object.keys(tensorMap.tensors).sort(byteOrder);
  const header = { tensors: {} };
  const chunks = [];
  for (const key of keys) {
    const { data, ...rest } = tensorMap.tensors[key];
    header.tensors[key] = { ...rest, data: Buffer.alloc(0) };
    for (let start = 0; start < data.length; start += CHUNK_BYTES) {
      chunks.push(data.subarray(start, start + CHUNK_BYTES));
    }
  }
  return { header, chunks };
}

// Puts the received bytes back into the header's TensorMap, in key order.
function fillTensorMap(tensorMap, bytes) {
  const keys = Object.keys(tensorMap?.tensors ?? {}).sort(byteOrder);
  const expected = keys.reduce((sum, key) => sum + byteSize(tensorMap.tensors[key]), 0);
  if (bytes.length !== expected) {
    throw new Error(`stream: ${bytes.length} bytes received, the header's tensors hold ${expected}`);
  }
  let offset = 0;
  for (const key of keys) {
    const size = byteSize(tensorMap.tensors[key]);
    tensorMap.tensors[key].data = bytes.subarray(offset, offset + size);
    offset += size;
  }
}

// One framed call on a duplex gRPC call object: writes the header message and
// the data chunks (from splitTensorMap), reads the response's header and bytes,
// and refills the response's TensorMap (found by responseMap).
function framedCall(call, header, chunks, responseMap) {
  return new Promise((resolve, reject) => {
    let response = null;
    const received = [];
    call.on('data', (message) => {
      if (message.part === 'header') response = message.header;
      else received.push(message.data);
    });
    call.on('error', reject);
    call.on('end', () => {
      try {
        if (!response) throw new Error('stream: the response has no header');
        fillTensorMap(responseMap(response), Buffer.concat(received));
        resolve(response);
      } catch (error) {
        reject(error);
      }
    });
    const messages = [{ header }, ...chunks.map((data) => ({ data }))];
    (async () => {
      for (const message of messages) {
        if (!call.write(message)) await new Promise((done) => call.once('drain', done));
      }
      call.end();
    })().catch(reject);
  });
}

module.exports = { CHUNK_BYTES, byteOrder, splitTensorMap, fillTensorMap, framedCall };
