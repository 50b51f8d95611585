"""Atomic writers (riverscape.io.atomic) and the JSON conversion (riverscape.io.jsonable)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from riverscape.io.atomic import atomic_path, write_bytes_atomic, write_text_atomic
from riverscape.io.jsonable import JsonRecord, Record, to_jsonable


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != name)


# ------------------------------------------------------------------------------ atomic writes
@pytest.mark.parametrize("write, payload, read", [
    (write_text_atomic, "héllo\nwörld", lambda p: p.read_text(encoding="utf-8")),
    (write_bytes_atomic, b"\x00\x01binary", lambda p: p.read_bytes()),
])
def test_atomic_writers_write_replace_and_create_folders(tmp_path, write, payload, read):
    target = tmp_path / "sub" / "dir" / "out.dat"
    assert write(target, payload) == target
    assert read(target) == payload
    write(str(target), payload * 2)  # replaces, accepts str paths
    assert read(target) == payload * 2
    assert _leftovers(target.parent, "out.dat") == []


def test_atomic_file_has_the_usual_permissions(tmp_path):
    target = write_text_atomic(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_path(target) as temporary:
            temporary.write_text("half-writ")
            raise error
    assert target.read_text() == "old"
    assert _leftovers(tmp_path, "results.json") == []


def test_failed_encoding_leaves_the_old_file(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "π", encoding="ascii")
    assert target.read_text() == "old" and _leftovers(tmp_path, "t.txt") == []


def test_failed_rename_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "page.html"
    target.write_text("old")

    def busy(*args, **kwargs):
        raise PermissionError("file in use")

    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(PermissionError):
        write_bytes_atomic(target, b"new")
    assert target.read_text() == "old" and _leftovers(tmp_path, "page.html") == []


def test_failure_without_an_old_file_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "fig.png", suffix=".png") as temporary:
            assert temporary.suffix == ".png" and temporary.parent == tmp_path and temporary.name.startswith(".fig.png.")
            raise ValueError("matplotlib failed")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ JSON values
def test_non_finite_floats_become_none():
    value = to_jsonable({"nan": float("nan"), "inf": math.inf, "ninf": -math.inf, "ok": 1.5, "np": np.float32("nan")})
    assert value == {"nan": None, "inf": None, "ninf": None, "ok": 1.5, "np": None}
    json.dumps(value, allow_nan=False)


def test_tensors_and_arrays_become_lists():
    grad = torch.tensor([1.0, float("inf")], requires_grad=True)
    value = to_jsonable({
        "tensor": torch.arange(4).reshape(2, 2),
        "scalar": torch.tensor(2.5),
        "grad": grad * 2,
        "bf16": torch.tensor([0.5], dtype=torch.bfloat16),
        "array": np.array([[1.0, np.nan]]),
        "np_int": np.int64(3),
        "np_bool": np.bool_(True),
    })
    assert value == {"tensor": [[0, 1], [2, 3]], "scalar": 2.5, "grad": [2.0, None], "bf16": [0.5],
                     "array": [[1.0, None]], "np_int": 3, "np_bool": True}
    assert type(value["np_int"]) is int and type(value["np_bool"]) is bool


@dataclass
class _Point:
    x: float
    where: Path


class _WithToDict:
    def to_dict(self) -> dict:
        return {"values": (1, float("nan"))}


def test_nested_containers_paths_and_records():
    value = to_jsonable({1: ({"a": (1, 2)}, [Path("runs/x"), _WithToDict()]), "point": _Point(float("inf"), Path("p"))})
    assert value == {"1": [{"a": [1, 2]}, ["runs/x", {"values": [1, None]}]], "point": {"x": None, "where": "p"}}
    assert json.loads(json.dumps(value, allow_nan=False)) == value


def test_unknown_objects_are_refused():
    with pytest.raises(TypeError, match="cannot store a object"):
        to_jsonable({"v": object()})
    with pytest.raises(TypeError):
        to_jsonable(_Point)  # a dataclass type, not an instance


# ------------------------------------------------------------------------------ the to_dict mixins
@dataclass(frozen=True)
class _Inner(Record):
    low: float
    bounds: tuple


@dataclass(frozen=True)
class _Outer(Record):
    name: str
    inner: _Inner
    value: float


@dataclass(frozen=True)
class _Profile(JsonRecord):
    t: torch.Tensor
    loss: float
    inner: _Inner
    where: Path


def test_record_keeps_values_and_nests_dataclasses():
    # asdict semantics: NaN and tuples are kept as they are, nested dataclasses become dicts
    d = _Outer("a", _Inner(float("nan"), (1, 2)), 0.5).to_dict()
    assert list(d) == ["name", "inner", "value"] and d["name"] == "a" and d["value"] == 0.5
    assert math.isnan(d["inner"]["low"]) and d["inner"]["bounds"] == (1, 2)


def test_json_record_gives_plain_json_values():
    d = _Profile(torch.tensor([0.0, 1.0]), math.inf, _Inner(1.5, (3,)), Path("p")).to_dict()
    assert d == {"t": [0.0, 1.0], "loss": None, "inner": {"low": 1.5, "bounds": [3]}, "where": "p"}
    assert list(d) == ["t", "loss", "inner", "where"]
    json.dumps(d, allow_nan=False)
