'use strict';
// Tensor codec for twinkle.worker.v1.Tensor: a dtype, an int64 shape and the
// raw little-endian, row-major bytes (docs/protocol.md, "Tensor encoding").
// Written against Buffer's explicit little-endian accessors, so it is correct
// on any host byte order.

// dtype name (as proto-loader gives enums with enums: String) -> bytes per element.
const ITEM_SIZE = {
  DATA_TYPE_FLOAT32: 4,
  DATA_TYPE_FLOAT64: 8,
  DATA_TYPE_FLOAT16: 2,
  DATA_TYPE_BFLOAT16: 2,
  DATA_TYPE_INT64: 8,
  DATA_TYPE_INT32: 4,
  DATA_TYPE_INT16: 2,
  DATA_TYPE_INT8: 1,
  DATA_TYPE_UINT8: 1,
  DATA_TYPE_BOOL: 1,
};

const scratch = Buffer.alloc(4);

// float32 -> bfloat16 bits, rounding to nearest even as torch does; NaN stays NaN.
function bfloat16Bits(value) {
  scratch.writeFloatLE(value, 0);
  const bits = scratch.readUInt32LE(0);
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) return 0x7fc0;
  const rounded = bits + 0x7fff + ((bits >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}

function fromBfloat16Bits(bits) {
  scratch.writeUInt32LE((bits << 16) >>> 0, 0);
  return scratch.readFloatLE(0);
}

function fromFloat16Bits(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

function numElements(shape) {
  return shape.reduce((a, b) => a * Number(b), 1);
}

// Builds a Tensor message from a flat array of numbers (row-major) and a shape.
function encodeTensor(dtype, shape, values) {
  const itemSize = ITEM_SIZE[dtype];
  if (!itemSize) throw new Error(`unsupported dtype ${dtype}`);
  const n = numElements(shape);
  if (values.length !== n) {
    throw new Error(`shape [${shape}] needs ${n} values, got ${values.length}`);
  }
  const data = Buffer.alloc(n * itemSize);
  for (let i = 0; i < n; i++) {
    const v = values[i];
    const at = i * itemSize;
    switch (dtype) {
      case 'DATA_TYPE_FLOAT32': data.writeFloatLE(v, at); break;
      case 'DATA_TYPE_FLOAT64': data.writeDoubleLE(v, at); break;
      case 'DATA_TYPE_BFLOAT16': data.writeUInt16LE(bfloat16Bits(v), at); break;
      case 'DATA_TYPE_INT64': data.writeBigInt64LE(BigInt(v), at); break;
      case 'DATA_TYPE_INT32': data.writeInt32LE(v, at); break;
      case 'DATA_TYPE_INT16': data.writeInt16LE(v, at); break;
      case 'DATA_TYPE_INT8': data.writeInt8(v, at); break;
      case 'DATA_TYPE_UINT8': data.writeUInt8(v, at); break;
      case 'DATA_TYPE_BOOL': data.writeUInt8(v ? 1 : 0, at); break;
      default: throw new Error(`encoding ${dtype} is not implemented in this example`);
    }
  }
  return { dtype, shape: shape.map(String), data };
}

// Returns {dtype, shape: number[], values: number[]} (int64 as Number: exact below 2**53).
function decodeTensor(tensor) {
  const dtype = tensor.dtype;
  const itemSize = ITEM_SIZE[dtype];
  if (!itemSize) throw new Error(`unsupported dtype ${dtype}`);
  const shape = tensor.shape.map(Number);
  const n = numElements(shape);
  const data = tensor.data;
  if (data.length !== n * itemSize) {
    throw new Error(`tensor of shape [${shape}] ${dtype} needs ${n * itemSize} bytes, got ${data.length}`);
  }
  const values = new Array(n);
  for (let i = 0; i < n; i++) {
    const at = i * itemSize;
    switch (dtype) {
      case 'DATA_TYPE_FLOAT32': values[i] = data.readFloatLE(at); break;
      case 'DATA_TYPE_FLOAT64': values[i] = data.readDoubleLE(at); break;
      case 'DATA_TYPE_FLOAT16': values[i] = fromFloat16Bits(data.readUInt16LE(at)); break;
      case 'DATA_TYPE_BFLOAT16': values[i] = fromBfloat16Bits(data.readUInt16LE(at)); break;
      case 'DATA_TYPE_INT64': values[i] = Number(data.readBigInt64LE(at)); break;
      case 'DATA_TYPE_INT32': values[i] = data.readInt32LE(at); break;
      case 'DATA_TYPE_INT16': values[i] = data.readInt16LE(at); break;
      case 'DATA_TYPE_INT8': values[i] = data.readInt8(at); break;
      case 'DATA_TYPE_UINT8': values[i] = data.readUInt8(at); break;
      case 'DATA_TYPE_BOOL': values[i] = data.readUInt8(at) !== 0 ? 1 : 0; break;
      default: throw new Error(`decoding ${dtype} is not implemented`);
    }
  }
  return { dtype, shape, values };
}

// Right-pads samples ({input_ids, labels, attention_mask?}) to their longest
// and returns the int64 [B, T] TensorMap of ForwardBackwardRequest.inputs.
function batchToTensorMap(samples) {
  const rows = samples.length;
  const width = Math.max(...samples.map((s) => s.input_ids.length));
  const columns = { input_ids: [], attention_mask: [], labels: [] };
  const padding = { input_ids: 0, attention_mask: 0, labels: -100 };
  for (const sample of samples) {
    const length = sample.input_ids.length;
    const row = {
      input_ids: sample.input_ids,
      attention_mask: sample.attention_mask ?? new Array(length).fill(1),
      labels: sample.labels,
    };
    for (const key of Object.keys(columns)) {
      if (row[key] === undefined) throw new Error(`sample without ${key}`);
      if (row[key].length !== length) {
        throw new Error(`${key} has ${row[key].length} entries, input_ids has ${length}`);
      }
      columns[key].push(...row[key], ...new Array(width - length).fill(padding[key]));
    }
  }
  const tensors = {};
  for (const [key, values] of Object.entries(columns)) {
    tensors[key] = encodeTensor('DATA_TYPE_INT64', [rows, width], values);
  }
  return { tensors };
}

module.exports = {
  ITEM_SIZE,
  encodeTensor,
  decodeTensor,
  batchToTensorMap,
  bfloat16Bits,
  fromBfloat16Bits,
  fromFloat16Bits,
};
