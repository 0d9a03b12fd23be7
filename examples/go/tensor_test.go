package twinkle

// The codec against docs/protocol.md section 7: the worked example's bytes, the DataType table.

import (
	"bytes"
	"encoding/hex"
	"math"
	"reflect"
	"strings"
	"testing"

	workerv1 "example.com/twinkle/gen/twinkle/worker/v1"
)

func TestWorkedExampleBytes(t *testing.T) {
	tensor, err := Int64Tensor([]int64{2, 2}, []int64{1, 2, 3, 0})
	if err != nil {
		t.Fatal(err)
	}
	want, _ := hex.DecodeString(strings.ReplaceAll(
		"0100000000000000 0200000000000000 0300000000000000 0000000000000000", " ", ""))
	if int32(tensor.Dtype) != 5 || !bytes.Equal(tensor.Data, want) {
		t.Fatalf("got dtype %v data % x", tensor.Dtype, tensor.Data)
	}
	back, err := Int64s("input_ids", tensor)
	if err != nil || !reflect.DeepEqual(back, []int64{1, 2, 3, 0}) {
		t.Fatalf("decoded %v, %v", back, err)
	}
}

func TestNegativeValuesAreTwosComplementLittleEndian(t *testing.T) {
	tensor, _ := Int64Tensor([]int64{1}, []int64{-100})
	if want := []byte{0x9c, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}; !bytes.Equal(tensor.Data, want) {
		t.Fatalf("-100 encoded as % x", tensor.Data)
	}
}

func TestDataTypeTable(t *testing.T) {
	table := []struct {
		dtype workerv1.DataType
		value int32
		bytes int
	}{
		{workerv1.DataType_DATA_TYPE_UNSPECIFIED, 0, 0},
		{workerv1.DataType_DATA_TYPE_FLOAT32, 1, 4},
		{workerv1.DataType_DATA_TYPE_FLOAT64, 2, 8},
		{workerv1.DataType_DATA_TYPE_FLOAT16, 3, 2},
		{workerv1.DataType_DATA_TYPE_BFLOAT16, 4, 2},
		{workerv1.DataType_DATA_TYPE_INT64, 5, 8},
		{workerv1.DataType_DATA_TYPE_INT32, 6, 4},
		{workerv1.DataType_DATA_TYPE_INT16, 7, 2},
		{workerv1.DataType_DATA_TYPE_INT8, 8, 1},
		{workerv1.DataType_DATA_TYPE_UINT8, 9, 1},
		{workerv1.DataType_DATA_TYPE_BOOL, 10, 1},
	}
	for _, row := range table {
		if int32(row.dtype) != row.value || ItemSize(row.dtype) != row.bytes {
			t.Errorf("%v: value %d size %d, want %d and %d", row.dtype, int32(row.dtype), ItemSize(row.dtype), row.value, row.bytes)
		}
	}
}

func TestFloat32RoundTripAndSizeCheck(t *testing.T) {
	tensor, _ := Float32Tensor([]int64{3}, []float32{1.5, -2, float32(math.Inf(1))})
	values, err := Float32s("logps", tensor)
	if err != nil || values[0] != 1.5 || values[1] != -2 || !math.IsInf(float64(values[2]), 1) {
		t.Fatalf("got %v, %v", values, err)
	}
	if tensor.Data[0] != 0 || tensor.Data[3] != 0x3f || tensor.Data[2] != 0xc0 { // 1.5 = 0x3fc00000
		t.Fatalf("1.5 encoded as % x", tensor.Data[:4])
	}
	short := &workerv1.Tensor{Dtype: workerv1.DataType_DATA_TYPE_FLOAT32, Shape: []int64{2}, Data: make([]byte, 7)}
	if _, err := Float32s("logps", short); err == nil || !strings.Contains(err.Error(), "logps") {
		t.Fatalf("7 bytes for [2] float32 accepted: %v", err)
	}
	if _, err := Int64Tensor([]int64{2, 2}, []int64{1}); err == nil {
		t.Fatal("4 elements from 1 value accepted")
	}
}

func TestBFloat16IsTheUpperHalfRoundedToNearestEven(t *testing.T) {
	if got := BFloat16ToFloat32(0x3f80); got != 1 {
		t.Fatalf("0x3f80 = %v", got)
	}
	cases := map[float32]uint16{
		1:                                0x3f80,
		math.Float32frombits(0x3f808000): 0x3f80, // a tie rounds to the even mantissa
		math.Float32frombits(0x3f818000): 0x3f82, // a tie rounds up to the even one
		math.Float32frombits(0x3f808001): 0x3f81, // above the tie: up
	}
	for value, want := range cases {
		if got := Float32ToBFloat16(value); got != want {
			t.Errorf("%08x -> %04x, want %04x", math.Float32bits(value), got, want)
		}
	}
	if nan := Float32ToBFloat16(float32(math.NaN())); !math.IsNaN(float64(BFloat16ToFloat32(nan))) {
		t.Fatal("NaN lost")
	}
	encoded := &workerv1.Tensor{Dtype: workerv1.DataType_DATA_TYPE_BFLOAT16, Shape: []int64{1}, Data: []byte{0x80, 0x3f}}
	if values, err := Float32s("x", encoded); err != nil || values[0] != 1 {
		t.Fatalf("bfloat16 tensor decoded to %v, %v", values, err)
	}
}
