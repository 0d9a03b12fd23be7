'use strict';
// Mesh rules of docs/protocol.md, checked on the examples the doc gives.
const test = require('node:test');
const assert = require('node:assert/strict');
const { DeviceMesh, sliceBounds } = require('../lib/mesh');

test('dims follow fsdp, pp, dp, cp, tp and dp is always present', () => {
  const mesh = new DeviceMesh({ tp: 2, fsdp: 4 });
  assert.deepEqual(mesh.dimNames, ['fsdp', 'dp', 'tp']);
  assert.deepEqual(mesh.dimSizes, [4, 1, 2]);
  assert.equal(mesh.worldSize, 8);
  assert.deepEqual(DeviceMesh.parse('dp=2,fsdp=2').dimNames, ['fsdp', 'dp']);
  assert.throws(() => new DeviceMesh({ ep: 2 }), /unknown mesh dim/);
});

test('data ranks of fsdp=2, dp=4 are 0,2,4,6,1,3,5,7', () => {
  const mesh = new DeviceMesh({ fsdp: 2, dp: 4 });
  assert.equal(mesh.dataWorldSize, 8);
  assert.deepEqual([...Array(8).keys()].map((r) => mesh.dataRank(r)), [0, 2, 4, 6, 1, 3, 5, 7]);
});

test('tp peers share a data rank; one collect rank per data rank', () => {
  const mesh = new DeviceMesh({ fsdp: 2, dp: 2, tp: 2 });
  assert.deepEqual([...Array(8).keys()].map((r) => mesh.dataRank(r)), [0, 0, 2, 2, 1, 1, 3, 3]);
  assert.deepEqual(mesh.collectRanks(), [0, 4, 2, 6]);
});

test('slices are contiguous and balanced, the first B % n one larger', () => {
  assert.deepEqual([0, 1, 2].map((d) => sliceBounds(7, d, 3)), [[0, 3], [3, 5], [5, 7]]);
  assert.deepEqual([0, 1].map((d) => sliceBounds(4, d, 2)), [[0, 2], [2, 4]]);
  assert.throws(() => sliceBounds(3, 0, 4), /smaller than the data world size 4/);
});
