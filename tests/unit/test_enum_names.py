"""twinkle_protocol.names: every value of the Strategy and MixedPrecision enums has its one name,
names and values map back and forth, and an unset field reads as the proto comments say."""

from __future__ import annotations

from twinkle_protocol import names
from twinkle_protocol._proto import worker_pb2


def test_every_enum_value_has_a_name_and_maps_back() -> None:
    for enum, table, name_of in (
        (worker_pb2.Strategy, names.STRATEGIES, names.strategy_name),
        (worker_pb2.MixedPrecision, names.PRECISIONS, names.precision_name),
    ):
        set_values = [value for value in enum.values() if value != 0]  # 0: UNSPECIFIED
        assert sorted(table.values()) == sorted(set_values), enum.DESCRIPTOR.name
        for name, value in table.items():
            assert name_of(value) == name


def test_an_unset_field_means_the_documented_default() -> None:
    assert names.strategy_name(worker_pb2.STRATEGY_UNSPECIFIED) == "accelerate"
    assert names.precision_name(worker_pb2.MIXED_PRECISION_UNSPECIFIED) == "bf16"
