"""Safe checkpoint loading/saving, model and data resolution (riverscape.checkpoint)."""
from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import riverscape as rs
from riverscape.analysis_options import AnalyzeOptions
from riverscape.checkpoint import (
    FORMAT_NAME,
    check_model_data,
    load_checkpoint,
    make_spec,
    read_checkpoint,
    resolve_data,
    save_checkpoint,
)
from riverscape.errors import CheckpointError, InputError

FACTORY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make(width=3):
        return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))

    def tensors(n=10):
        g = torch.Generator().manual_seed(0)
        return torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)

    def dataset(n=10):
        return torch.utils.data.TensorDataset(*tensors(n))

    def not_data():
        return 42

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "factory.py"
    path.write_text(FACTORY_SOURCE)
    return path


def small_net(width: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))


def assert_same_state(model: nn.Module, reference: dict) -> None:
    state = model.state_dict()
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key  # bit-identical, no tolerance


@pytest.fixture(scope="module")
def short_run():
    """The digits MLP after 20 Adam steps (a real trajectory in ~0.1 s)."""
    ds = rs.load_dataset("digits")
    kwargs = ds.model_kwargs("mlp")
    torch.manual_seed(0)
    result = rs.train(rs.build_model("mlp", **kwargs), ds, steps=20, lr=1e-2, record_every=5, seed=0)
    return ds, kwargs, result


# ------------------------------------------------------------------- riverscape format


def test_riverscape_round_trip_is_bit_identical(tmp_path, short_run):
    ds, kwargs, result = short_run
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, result.model, model_spec=make_spec("mlp", kwargs), data_spec="digits", loss="cross_entropy",
                    train_result=result, train_config={"steps": 20}, metrics={"acc": 0.5})
    raw = torch.load(path, weights_only=True)  # the format promise: no pickled code
    assert raw["format"] == FORMAT_NAME and raw["version"] == 1
    assert raw["model"] == {"name": "mlp", "kwargs": kwargs} and raw["data"] == {"name": "digits", "kwargs": {}}

    rng_before = torch.random.get_rng_state()
    loaded = load_checkpoint(path)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # building the model did not shift the global RNG
    assert loaded.source_format == "riverscape"
    assert loaded.model is not result.model and not loaded.model.training
    assert_same_state(loaded.model, result.model.state_dict())
    assert torch.equal(loaded.trajectory, result.trajectory)
    assert loaded.trajectory_steps == result.steps == [0, 5, 10, 15, 20]
    assert loaded.loss == "cross_entropy" and loaded.data_spec == {"name": "digits", "kwargs": {}}
    assert loaded.train == {"steps": 20} and loaded.metrics == {"acc": 0.5}
    assert loaded.loss_history == pytest.approx(result.loss_history, rel=0, abs=0)
    assert not list(tmp_path.glob(".*partial"))  # the temporary file was renamed away


def test_float64_weights_keep_their_precision(tmp_path):
    net = small_net().double()
    path = tmp_path / "f64.pt"
    sd = {"weight": net[0].weight.detach(), "bias": net[0].bias.detach()}
    torch.save(sd, path)
    loaded = load_checkpoint(path, model="torch.nn:Linear", model_kwargs={"in_features": 4, "out_features": 5})
    assert_same_state(loaded.model, sd)
    assert any("float64" in note for note in loaded.notes)


def test_save_rejects_values_that_weights_only_cannot_read(tmp_path):
    path = tmp_path / "bad.pt"
    with pytest.raises(InputError, match=r"checkpoint\.extra_module is a Linear"):
        save_checkpoint(path, small_net(), model_spec="mlp", data_spec=None, loss=None, extra={"extra_module": nn.Linear(1, 1)})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="overwrite"):
        save_checkpoint(path, small_net(), model_spec="mlp", data_spec=None, loss=None, extra={"state_dict": 1})


# ------------------------------------------------------------------- foreign formats


def test_bare_state_dict_with_file_factory(tmp_path, factory_file):
    net = small_net(width=5)
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(CheckpointError, match="holds weights but not the architecture: pass --model"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, model=f"{factory_file}:make", model_kwargs={"width": 5})
    assert loaded.source_format == "state_dict" and loaded.model_spec == {"factory": f"{factory_file}:make", "kwargs": {"width": 5}}
    assert_same_state(loaded.model, net.state_dict())
    x = torch.randn(3, 4)
    assert torch.equal(loaded.model(x), net(x))


def test_module_factory_and_builtin_name(tmp_path):
    linear = nn.Linear(4, 2)
    path = tmp_path / "linear.pt"
    torch.save(linear.state_dict(), path)
    loaded = load_checkpoint(path, model="torch.nn:Linear", model_kwargs={"in_features": 4, "out_features": 2})
    assert_same_state(loaded.model, linear.state_dict())
    mlp = rs.build_model("mlp", in_dim=4, out_dim=2, hidden=(3,))
    torch.save(mlp.state_dict(), path)
    loaded = load_checkpoint(path, model="mlp", model_kwargs={"in_dim": 4, "out_dim": 2, "hidden": [3]})
    assert_same_state(loaded.model, mlp.state_dict())


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_nested_state_dict(tmp_path, factory_file, key):
    net = small_net()
    path = tmp_path / "nested.pt"
    torch.save({"epoch": 7, key: net.state_dict(), "optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}}, path)
    loaded = load_checkpoint(path, model=f"{factory_file}:make", model_kwargs={"width": 5})
    assert loaded.source_format == f"nested:{key}"
    assert_same_state(loaded.model, net.state_dict())


def test_dataparallel_prefix_is_stripped(tmp_path, factory_file):
    net = small_net()
    path = tmp_path / "dp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    loaded = load_checkpoint(path, model=f"{factory_file}:make", model_kwargs={"width": 5})
    assert_same_state(loaded.model, net.state_dict())
    assert loaded.notes == ("stripped the 'module.' prefix from all 4 state-dict keys",)


def test_safetensors(tmp_path, factory_file):
    net = small_net()
    path = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = load_checkpoint(path, model=f"{factory_file}:make", model_kwargs={"width": 5})
    assert loaded.source_format == "safetensors"
    assert_same_state(loaded.model, net.state_dict())
    with pytest.raises(CheckpointError, match="not the architecture"):
        load_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(path, model=f"{factory_file}:make")


def test_mismatched_state_dict_names_keys_and_shapes(tmp_path, factory_file):
    state = small_net(width=5).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    path = tmp_path / "mismatch.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=f"{factory_file}:make", model_kwargs={"width": 6})
    message = str(info.value)
    assert "1 missing keys (2.bias)" in message
    assert "1 unexpected keys (extra.weight)" in message
    assert "0.weight (5, 4) in the checkpoint vs (6, 4) in the model" in message
    assert "\n" not in message


# ------------------------------------------------------------------------ bad files


def _write_bad(kind: str, path, good_bytes: bytes) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good_bytes[: len(good_bytes) // 2])
    elif kind == "garbage":
        path.write_bytes(bytes(range(7, 256)) * 3)
    elif kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
    elif kind == "tensor":
        torch.save(torch.zeros(2, 3), path)
    elif kind == "dict":
        torch.save({"epoch": 3, "notes": "no weights here"}, path)


@pytest.mark.parametrize(
    "kind, phrase",
    [
        ("missing", "checkpoint not found"),
        ("empty", "is empty (0 bytes)"),
        ("truncated", "is truncated or corrupt"),
        ("garbage", "neither a PyTorch file (zip or pickle) nor safetensors"),
        ("text", "is a text file, not a checkpoint (it starts with 'epoch,loss')"),
        ("tensor", "holds a single tensor of shape (2, 3)"),
        ("dict", "is a dict without a state dict (keys: ['epoch', 'notes'])"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path, kind, phrase):
    good = tmp_path / "good.pt"
    torch.save(small_net().state_dict(), good)
    path = tmp_path / f"{kind}.pt"
    _write_bad(kind, path, good.read_bytes())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model="torch.nn:Linear")
    assert phrase in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("legacy", [False, True])
def test_every_truncation_is_a_checkpoint_error(tmp_path, legacy):
    """Cut a checkpoint at many lengths: always a CheckpointError, never another exception."""
    good = tmp_path / "good.pt"
    torch.save({"state_dict": small_net().state_dict(), "epoch": 1}, good, _use_new_zipfile_serialization=not legacy)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    for length in range(1, len(data), 23):
        cut.write_bytes(data[:length])
        with pytest.raises(CheckpointError):
            read_checkpoint(cut)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        read_checkpoint(tmp_path)


# ------------------------------------------------------------------------- security


class _CreatesMarker:
    """Unpickling this runs ``open(marker, "w")``: arbitrary code with a visible side effect."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_executing_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": small_net().state_dict(), "payload": _CreatesMarker(str(marker))}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model="torch.nn:Linear")
    assert "could execute arbitrary code" in str(info.value) and "--trust-checkpoint" in str(info.value)
    assert "(it needs io.open)" in str(info.value)
    assert not marker.exists()  # the payload never ran
    # The guard is what stopped it: trusting the file does run the payload.
    read_checkpoint(path, trust_checkpoint=True)
    assert marker.exists()


def test_pickled_module_needs_trust(tmp_path):
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    path = tmp_path / "full.pt"
    torch.save(net, path)
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(it needs torch\.nn\.modules\.container\.Sequential\)"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, trust_checkpoint=True)
    assert loaded.source_format == "pickled-module" and loaded.model_spec is None
    assert_same_state(loaded.model, net.state_dict())
    assert net.training  # the original module object was not touched


def test_factory_stored_in_checkpoint_is_not_imported_without_consent(tmp_path, factory_file):
    net = small_net()
    path = tmp_path / "ckpt.pt"
    spec = f"{factory_file}:make"
    save_checkpoint(path, net, model_spec=make_spec(spec, {"width": 5}), data_spec=f"{factory_file}:tensors", loss="cross_entropy")
    with pytest.raises(CheckpointError, match=f"confirm with --model {spec}"):
        load_checkpoint(path)
    assert_same_state(load_checkpoint(path, model=spec, model_kwargs={"width": 5}).model, net.state_dict())
    loaded = load_checkpoint(path, trust_checkpoint=True)
    assert_same_state(loaded.model, net.state_dict())
    with pytest.raises(CheckpointError, match="confirm with --data"):
        resolve_data(loaded.data_spec, allow_factory=False)


# ---------------------------------------------------------------------- model specs


@pytest.mark.parametrize(
    "spec, phrase",
    [
        ("nosuchmodel", "unknown model 'nosuchmodel'; built-in models are ['mlp'"),
        ("torch.nn:NoSuchLayer", "'torch.nn' has no attribute 'NoSuchLayer'"),
        ("no_such_package_xyz:make", "cannot import module 'no_such_package_xyz'"),
        ("missing_dir/file.py:make", "model factory file not found: 'missing_dir/file.py'"),
        ("{factory}:NOT_CALLABLE", "is a int, not a callable"),
        ("{factory}:", "must look like 'package.module:function'"),
        ("torch.nn:Linear", "cannot build model 'torch.nn:Linear' with kwargs {}"),
    ],
)
def test_bad_model_specs(tmp_path, factory_file, spec, phrase):
    path = tmp_path / "w.pt"
    torch.save(small_net().state_dict(), path)
    with pytest.raises(InputError) as info:
        load_checkpoint(path, model=spec.format(factory=factory_file))
    assert phrase in str(info.value)


def test_factory_must_return_a_module(tmp_path, factory_file):
    path = tmp_path / "w.pt"
    torch.save(small_net().state_dict(), path)
    with pytest.raises(InputError, match="returned a tuple, not a torch.nn.Module"):
        load_checkpoint(path, model=f"{factory_file}:tensors")


# ---------------------------------------------------------------------------- data


def test_resolve_builtin_and_factory_data(factory_file):
    digits = resolve_data("digits")
    assert digits.loss == "cross_entropy" and digits.dataset.name == "digits"
    assert digits.train[0].shape == (1348, 64) and digits.evaluation[0].shape == (449, 64)
    pair = resolve_data(f"{factory_file}:tensors", {"n": 6})
    assert pair.train[0].shape == (6, 4) and pair.test is None and pair.evaluation is pair.train
    loader = resolve_data(f"{factory_file}:dataset")
    assert isinstance(loader.train, torch.utils.data.DataLoader) and len(loader.train.dataset) == 10
    with pytest.raises(InputError, match="unknown dataset 'nope'"):
        resolve_data("nope")
    with pytest.raises(InputError, match="returned a int; return \\(inputs, targets\\) tensors"):
        resolve_data(f"{factory_file}:not_data")


def test_check_model_data_catches_shape_and_nan(factory_file):
    data = resolve_data(f"{factory_file}:tensors")
    net = small_net()
    with torch.no_grad():  # same operations on the same 8 samples: exactly equal
        expected = float(nn.functional.cross_entropy(net(data.train[0][:8]), data.train[1][:8]))
    assert check_model_data(net, data.train, "cross_entropy") == expected
    with pytest.raises(InputError, match=r"data shape does not fit the model: input batch \(8, 64\) float32"):
        check_model_data(net, resolve_data("digits").train, "cross_entropy")
    with pytest.raises(InputError, match="model output does not fit the targets"):
        check_model_data(net, (data.train[0], torch.randint(0, 5, (10, 3))), "cross_entropy")
    broken = small_net()
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN/inf"):
        check_model_data(broken, data.train, "cross_entropy")
    assert torch.isnan(broken[0].weight[0, 0])  # probing did not modify the module


# ---------------------------------------------------------------- analyze options


@pytest.mark.parametrize("bits", [0, 99, -1, True, 2.0])
def test_options_reject_bad_bits(bits):
    with pytest.raises(InputError, match="bits must be integers from 1 to 16"):
        AnalyzeOptions(bits=(4, bits))


def test_options_validate_and_normalise():
    options = AnalyzeOptions(bits=[2, 8, 2, 4], include=["0.*,fc*", "head"], max_samples=None)
    assert options.bits == (8, 4, 2) and options.include == ("0.*", "fc*", "head")
    assert options.to_dict()["bits"] == [8, 4, 2]
    q = options.quantizer(2)
    assert isinstance(q, rs.quant.UniformQuantizer) and (q.bits, q.range, q.per_channel, q.symmetric) == (2, "mse", True, True)
    for bad, phrase in [
        ({"bits": ()}, "at least one bit-width"),
        ({"range_method": "max"}, "unknown range method 'max'; choose one of ['minmax', 'mse', 'percentile']"),
        ({"qat_estimator": "sgd"}, "unknown QAT estimator 'sgd'"),
        ({"top_k": 0}, "top_k must be an integer from 1 to 500"),
        ({"grid_steps": 2}, "grid_steps must be an integer from 3 to 401"),
        ({"grid_span": float("nan")}, "grid_span must be a positive finite number"),
        ({"max_samples": -1}, "max_samples must be an integer >= 0"),
        ({"budget": "fast"}, "budget must be one of quick, standard, thorough"),
        ({"skip": "curvature"}, "cannot skip 'curvature'"),
        ({"ptq_methods": "awq"}, "unknown PTQ method 'awq'; choose from rtn, gptq, adaround"),
        ({"device": "toaster"}, "unknown device 'toaster'"),
    ]:
        with pytest.raises(InputError, match=phrase.replace("[", r"\[").replace("(", r"\(")):
            AnalyzeOptions(**bad)
