package twinkle

// The tensor codec of docs/protocol.md section 7: dtype + int64 shape + raw little-endian
// bytes in row-major order, nothing else.

import (
	"encoding/binary"
	"fmt"
	"math"

	workerv1 "example.com/twinkle/gen/twinkle/worker/v1"
)

// ItemSize is the size in bytes of one element of dtype; 0 for DATA_TYPE_UNSPECIFIED or unknown values.
func ItemSize(dtype workerv1.DataType) int {
	switch dtype {
	case workerv1.DataType_DATA_TYPE_FLOAT64, workerv1.DataType_DATA_TYPE_INT64:
		return 8
	case workerv1.DataType_DATA_TYPE_FLOAT32, workerv1.DataType_DATA_TYPE_INT32:
		return 4
	case workerv1.DataType_DATA_TYPE_FLOAT16, workerv1.DataType_DATA_TYPE_BFLOAT16, workerv1.DataType_DATA_TYPE_INT16:
		return 2
	case workerv1.DataType_DATA_TYPE_INT8, workerv1.DataType_DATA_TYPE_UINT8, workerv1.DataType_DATA_TYPE_BOOL:
		return 1
	}
	return 0
}

func elements(shape []int64) (int, error) {
	count := 1
	for _, dim := range shape {
		if dim < 0 {
			return 0, fmt.Errorf("negative dim %d in shape %v", dim, shape)
		}
		count *= int(dim)
	}
	return count, nil
}

// Int64Tensor encodes values (row-major, len = product(shape)) as a DATA_TYPE_INT64 tensor.
func Int64Tensor(shape []int64, values []int64) (*workerv1.Tensor, error) {
	count, err := elements(shape)
	if err != nil {
		return nil, err
	}
	if count != len(values) {
		return nil, fmt.Errorf("shape %v holds %d elements, got %d values", shape, count, len(values))
	}
	data := make([]byte, 8*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint64(data[8*i:], uint64(v))
	}
	return &workerv1.Tensor{Dtype: workerv1.DataType_DATA_TYPE_INT64, Shape: shape, Data: data}, nil
}

// Float32Tensor encodes values as a DATA_TYPE_FLOAT32 tensor.
func Float32Tensor(shape []int64, values []float32) (*workerv1.Tensor, error) {
	count, err := elements(shape)
	if err != nil {
		return nil, err
	}
	if count != len(values) {
		return nil, fmt.Errorf("shape %v holds %d elements, got %d values", shape, count, len(values))
	}
	data := make([]byte, 4*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(v))
	}
	return &workerv1.Tensor{Dtype: workerv1.DataType_DATA_TYPE_FLOAT32, Shape: shape, Data: data}, nil
}

// checkSize verifies len(data) == product(shape) * itemsize(dtype), as a worker does.
func checkSize(name string, t *workerv1.Tensor) (int, error) {
	size := ItemSize(t.GetDtype())
	if size == 0 {
		return 0, fmt.Errorf("tensor %s: dtype %v is not a data type", name, t.GetDtype())
	}
	count, err := elements(t.GetShape())
	if err != nil {
		return 0, fmt.Errorf("tensor %s: %v", name, err)
	}
	if len(t.GetData()) != count*size {
		return 0, fmt.Errorf("tensor %s: %d bytes, but shape %v of %v needs %d",
			name, len(t.GetData()), t.GetShape(), t.GetDtype(), count*size)
	}
	return count, nil
}

// Int64s decodes a DATA_TYPE_INT64 tensor.
func Int64s(name string, t *workerv1.Tensor) ([]int64, error) {
	if t.GetDtype() != workerv1.DataType_DATA_TYPE_INT64 {
		return nil, fmt.Errorf("tensor %s is %v, not DATA_TYPE_INT64", name, t.GetDtype())
	}
	count, err := checkSize(name, t)
	if err != nil {
		return nil, err
	}
	values := make([]int64, count)
	for i := range values {
		values[i] = int64(binary.LittleEndian.Uint64(t.Data[8*i:]))
	}
	return values, nil
}

// Float32s decodes a DATA_TYPE_FLOAT32 or DATA_TYPE_BFLOAT16 tensor into float32 values.
func Float32s(name string, t *workerv1.Tensor) ([]float32, error) {
	count, err := checkSize(name, t)
	if err != nil {
		return nil, err
	}
	values := make([]float32, count)
	switch t.GetDtype() {
	case workerv1.DataType_DATA_TYPE_FLOAT32:
		for i := range values {
			values[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.Data[4*i:]))
		}
	case workerv1.DataType_DATA_TYPE_BFLOAT16:
		for i := range values {
			values[i] = BFloat16ToFloat32(binary.LittleEndian.Uint16(t.Data[2*i:]))
		}
	default:
		return nil, fmt.Errorf("tensor %s is %v, not DATA_TYPE_FLOAT32 or DATA_TYPE_BFLOAT16", name, t.GetDtype())
	}
	return values, nil
}

// BFloat16ToFloat32 widens bfloat16 bits: they are the upper half of a float32.
func BFloat16ToFloat32(bits uint16) float32 {
	return math.Float32frombits(uint32(bits) << 16)
}

// Float32ToBFloat16 rounds to nearest even, as torch does; NaN stays a (quiet) NaN.
func Float32ToBFloat16(value float32) uint16 {
	bits := math.Float32bits(value)
	if value != value {
		return uint16(bits>>16) | 0x0040
	}
	return uint16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
}
