'use strict';
// DeviceMesh arithmetic a coordinator needs: which data rank each global rank
// serves, which ranks report results, and which samples each data rank gets.
// The rules are the ones in docs/protocol.md ("Mesh and data"); the Python
// client implements the same rules in twinkle_client/mesh.py.

// Twinkle's dim order, outermost first. A dim is present only when given,
// except dp, which is always present.
const DIM_ORDER = ['fsdp', 'pp', 'dp', 'cp', 'tp'];

class DeviceMesh {
  // sizes: {dp: 2, fsdp: 2, ...}; unknown dims are refused, dp defaults to 1.
  constructor(sizes) {
    for (const name of Object.keys(sizes)) {
      if (!DIM_ORDER.includes(name)) {
        throw new Error(`unknown mesh dim "${name}" (known: ${DIM_ORDER.join(', ')})`);
      }
    }
    this.dimNames = DIM_ORDER.filter((name) => name === 'dp' || sizes[name] !== undefined);
    this.dimSizes = this.dimNames.map((name) => (sizes[name] === undefined ? 1 : Number(sizes[name])));
    for (const [i, size] of this.dimSizes.entries()) {
      if (!Number.isInteger(size) || size < 1) {
        throw new Error(`mesh dim ${this.dimNames[i]} must be a positive integer, got ${size}`);
      }
    }
    this.worldSize = this.dimSizes.reduce((a, b) => a * b, 1);
  }

  // Parses "fsdp=2,dp=2" (any order; the canonical order is applied).
  static parse(text) {
    const sizes = {};
    for (const part of text.split(',').filter(Boolean)) {
      const [name, value] = part.split('=');
      sizes[name.trim()] = Number(value);
    }
    return new DeviceMesh(sizes);
  }

  size(name) {
    const i = this.dimNames.indexOf(name);
    return i < 0 ? 1 : this.dimSizes[i];
  }

  // Coordinates of global rank r: its row-major position in arange(world).reshape(sizes).
  coordinates(rank) {
    if (!Number.isInteger(rank) || rank < 0 || rank >= this.worldSize) {
      throw new Error(`rank ${rank} outside a mesh of ${this.worldSize} ranks`);
    }
    const coords = {};
    let rest = rank;
    for (let i = this.dimNames.length - 1; i >= 0; i--) {
      coords[this.dimNames[i]] = rest % this.dimSizes[i];
      rest = Math.floor(rest / this.dimSizes[i]);
    }
    return coords;
  }

  get dataWorldSize() {
    return this.size('dp') * this.size('fsdp');
  }

  // dp_r * fsdp_size + fsdp_r when fsdp > 1, else dp_r.
  dataRank(rank) {
    const c = this.coordinates(rank);
    const fsdpSize = this.size('fsdp');
    return fsdpSize > 1 ? c.dp * fsdpSize + c.fsdp : c.dp;
  }

  // One global rank per data rank, in data-rank order: the smallest rank with
  // that data rank. Its output is the answer for that data rank; tp/cp peers
  // return copies that are not counted. (Workers refuse tp, pp and cp > 1 today;
  // with pipeline stages this would have to pick a rank of the last stage.)
  collectRanks() {
    const chosen = new Array(this.dataWorldSize).fill(-1);
    for (let rank = 0; rank < this.worldSize; rank++) {
      const d = this.dataRank(rank);
      if (chosen[d] < 0) chosen[d] = rank;
    }
    return chosen;
  }

  toProto() {
    return { dim_names: this.dimNames, dim_sizes: this.dimSizes };
  }
}

// [start, end) of the samples that data rank `dataRank` of `dataWorldSize` gets
// from a batch of n: contiguous balanced blocks, the first n % dws ranks one larger.
function sliceBounds(n, dataRank, dataWorldSize) {
  if (n < dataWorldSize) {
    throw new Error(
      `batch of ${n} samples is smaller than the data world size ${dataWorldSize}; ` +
        `increase the batch to at least ${dataWorldSize}`,
    );
  }
  const base = Math.floor(n / dataWorldSize);
  const extra = n % dataWorldSize;
  const start = dataRank * base + Math.min(dataRank, extra);
  const end = start + base + (dataRank < extra ? 1 : 0);
  return [start, end];
}

module.exports = { DIM_ORDER, DeviceMesh, sliceBounds };
