"""ClientOptions: README's table lists exactly its fields and defaults, and TransformersModel's keyword
arguments reach it by name (the rest stay the model's)."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from twinkle_client.options import ClientOptions
from twinkle_protocol.errors import InvalidArgument

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _readme_table() -> dict[str, str]:
    text = README.read_text()
    table = text.split("<!-- client-options:start -->")[1].split("<!-- client-options:end -->")[0]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", table, flags=re.MULTILINE)
    return dict(rows)


def test_the_readme_table_lists_every_option_with_its_default() -> None:
    fields = {field.name: repr(field.default) for field in dataclasses.fields(ClientOptions)}
    documented = {name: default.replace('"', "'") for name, default in _readme_table().items()}
    assert documented == fields


def test_every_option_has_a_docstring_line() -> None:
    doc = ClientOptions.__doc__ or ""
    missing = [field.name for field in dataclasses.fields(ClientOptions) if f"        {field.name}: " not in doc]
    assert missing == []


def test_options_are_popped_by_name_and_the_rest_stay_the_models() -> None:
    kwargs = {"seed": 3, "timeout": 7, "lease_seconds": 2, "attn_implementation": "eager"}
    options = ClientOptions.pop_from(kwargs, ClientOptions(device="cuda"))
    assert kwargs == {"attn_implementation": "eager"}
    assert (options.seed, options.timeout, options.device) == (3, 7, "cuda")
    assert options.lease_seconds == 2.0 and isinstance(options.lease_seconds, float)


def test_an_unknown_launcher_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match="launcher 'slurm' is unknown"):
        ClientOptions.pop_from({"launcher": "slurm"})
