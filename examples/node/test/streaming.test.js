'use strict';
// The header + raw-bytes framing: key order, chunking, and reassembly.
const test = require('node:test');
const assert = require('node:assert/strict');
const { splitTensorMap, fillTensorMap, byteOrder, CHUNK_BYTES } = require('../lib/streaming');
const { encodeTensor, decodeTensor } = require('../lib/tensor');

test('tensors go in byte order of their keys, data stripped from the header', () => {
  const map = {
    tensors: {
      labels: encodeTensor('DATA_TYPE_INT64', [1, 2], [7, -100]),
      attention_mask: encodeTensor('DATA_TYPE_INT64', [1, 2], [1, 0]),
      Z: encodeTensor('DATA_TYPE_UINT8', [1], [9]),
    },
  };
  const { header, chunks } = splitTensorMap(map);
  assert.deepEqual(Object.keys(header.tensors), ['Z', 'attention_mask', 'labels']);
  assert.ok(byteOrder('Z', 'a') < 0, 'upper case sorts before lower case by byte value');
  for (const tensor of Object.values(header.tensors)) assert.equal(tensor.data.length, 0);
  const bytes = Buffer.concat(chunks);
  assert.equal(bytes.toString('hex'), '09' + '0100000000000000' + '0000000000000000' + '0700000000000000' + '9cffffffffffffff');
  fillTensorMap(header, bytes);
  assert.deepEqual(decodeTensor(header.tensors.labels).values, [7, -100]);
  assert.deepEqual(decodeTensor(header.tensors.Z).values, [9]);
});

test('large tensors are cut into 1 MiB chunks and reassemble exactly', () => {
  const n = (CHUNK_BYTES / 4) * 2 + 3;
  const values = Array.from({ length: n }, (_, i) => i * 0.5);
  const { header, chunks } = splitTensorMap({ tensors: { logps: encodeTensor('DATA_TYPE_FLOAT32', [n], values) } });
  assert.deepEqual(chunks.map((c) => c.length), [CHUNK_BYTES, CHUNK_BYTES, 12]);
  fillTensorMap(header, Buffer.concat(chunks));
  assert.deepEqual(decodeTensor(header.tensors.logps).values, values);
});

test('a byte count that does not match the header is refused', () => {
  const { header } = splitTensorMap({ tensors: { x: encodeTensor('DATA_TYPE_INT32', [2], [1, 2]) } });
  assert.throws(() => fillTensorMap(header, Buffer.alloc(7)), /7 bytes received, the header's tensors hold 8/);
});
