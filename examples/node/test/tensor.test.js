'use strict';
// Tensor codec: byte layout of docs/protocol.md, checked against hand-written bytes.
const test = require('node:test');
const assert = require('node:assert/strict');
const { encodeTensor, decodeTensor, batchToTensorMap, bfloat16Bits } = require('../lib/tensor');

test('int64 is 8 little-endian bytes per element, row-major', () => {
  const tensor = encodeTensor('DATA_TYPE_INT64', [2, 2], [1, -1, 256, 2 ** 40]);
  assert.deepEqual(tensor.shape, ['2', '2']);
  assert.equal(
    tensor.data.toString('hex'),
    '0100000000000000' + 'ffffffffffffffff' + '0001000000000000' + '0000000000010000',
  );
  assert.deepEqual(decodeTensor(tensor).values, [1, -1, 256, 2 ** 40]);
});

test('float32 round-trips and bfloat16 is the upper half of float32', () => {
  const f32 = encodeTensor('DATA_TYPE_FLOAT32', [3], [1.5, -2, 0.1]);
  assert.equal(f32.data.subarray(0, 4).toString('hex'), '0000c03f');
  assert.deepEqual(decodeTensor(f32).values, [1.5, -2, Math.fround(0.1)]);
  assert.equal(bfloat16Bits(1.0), 0x3f80);
  assert.equal(bfloat16Bits(-2.0), 0xc000);
  const bf16 = encodeTensor('DATA_TYPE_BFLOAT16', [2], [1.0, 3.140625]);
  assert.equal(bf16.data.toString('hex'), '803f' + '4940');
  assert.deepEqual(decodeTensor(bf16).values, [1.0, 3.140625]);
});

test('float16 decodes normal, subnormal and special values', () => {
  const half = { dtype: 'DATA_TYPE_FLOAT16', shape: ['4'], data: Buffer.from('003c00c00100007c', 'hex') };
  assert.deepEqual(decodeTensor(half).values, [1, -2, 2 ** -24, Infinity]);
});

test('a size that does not match the shape is refused', () => {
  assert.throws(() => encodeTensor('DATA_TYPE_INT64', [2, 2], [1, 2, 3]), /needs 4 values/);
  const bad = { dtype: 'DATA_TYPE_FLOAT32', shape: ['3'], data: Buffer.alloc(8) };
  assert.throws(() => decodeTensor(bad), /needs 12 bytes/);
});

test('a batch is right-padded: ids 0, mask 0, labels -100', () => {
  const map = batchToTensorMap([
    { input_ids: [5, 6, 7], labels: [6, 7, -100] },
    { input_ids: [8], labels: [-100] },
  ]);
  const ids = decodeTensor(map.tensors.input_ids);
  assert.deepEqual(ids.shape, [2, 3]);
  assert.deepEqual(ids.values, [5, 6, 7, 8, 0, 0]);
  assert.deepEqual(decodeTensor(map.tensors.attention_mask).values, [1, 1, 1, 1, 0, 0]);
  assert.deepEqual(decodeTensor(map.tensors.labels).values, [6, 7, -100, -100, -100, -100]);
});
