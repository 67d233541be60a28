"""Streamed slicing (one layer at a time from safetensors) against in-memory slicing, its memory, its refusal."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import noisy_model

from helpers.compression.allocation import ModelShape, constant_dims
from helpers.compression.sliced_io import load_sliced
from helpers.compression.slicing import rotate_and_slice
from helpers.compression.streaming import DoesNotFitError, stream_memory, stream_slice
from helpers.infra.shards import CheckpointReader, ShardWriter
from helpers.models.adapters import supported_model_types
from helpers.models.loading import tiny_model

DIMS = [48, 40, 56, 32]
TOL = 1e-4


def windows(n: int = 6, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2  # a BOS-like first token, as Gemma windows start
    return ids


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", supported_model_types())
@pytest.mark.parametrize(("tied", "final_dim"), [(False, None), (True, 40)])
def test_streamed_equals_in_memory_on_every_family(tmp_path, model_type, tied, final_dim):
    """Same dims, layout and logits as rotate_and_slice on the same weights (tied checkpoints, a sliced head too)."""
    model = noisy_model(model_type, tied=tied)
    model.save_pretrained(tmp_path / "dense")
    info = stream_slice(tmp_path / "dense", tmp_path / "streamed", windows(), DIMS, final_dim=final_dim, progress=False)
    reference = rotate_and_slice(model, windows(), DIMS, final_dim=final_dim, progress=False)
    streamed, _ = load_sliced(tmp_path / "streamed", device="cpu")
    assert (info.dims, info.tied, info.final_dim) == (reference.dims, reference.tied, reference.final_dim)
    for name, values in reference.eigenvalues.items():
        assert torch.allclose(torch.from_numpy(info.eigenvalues[name]), torch.from_numpy(values), rtol=1e-9)
    held_out = windows(2, 24, seed=5)
    diff = (logits(streamed, held_out) - logits(model, held_out)).abs().max().item()
    print(f"{model_type} tied={tied} final_dim={final_dim}: max |logit difference| {diff:.2e}")
    assert diff < TOL
    params = {name: p.shape for name, p in streamed.state_dict().items()}
    assert params == {name: p.shape for name, p in model.state_dict().items()}


@pytest.mark.slow
def test_streamed_equals_in_memory_on_the_default_model(tmp_path, book_windows):
    """SmolLM2-135M at 30%: streamed from its safetensors cache equals in-memory slicing of the loaded model."""
    from helpers.compression.checkpoints import load_model
    from helpers.infra.textdata import load_windows
    from helpers.models.loading import DEFAULT_MODEL, resolve_model

    model, tokenizer = load_model(device="cpu")
    dims = constant_dims(ModelShape.from_config(model.config), 0.3).tolist()
    stream_slice(resolve_model(DEFAULT_MODEL), tmp_path / "s", book_windows, dims, progress=False)
    rotate_and_slice(model, book_windows, dims, progress=False)
    streamed, _ = load_sliced(tmp_path / "s", device="cpu")
    held_out = load_windows(tokenizer, "pride-and-prejudice", 64, 18)[16:]  # past book_windows' 8 x 128 tokens
    a, b = logits(model, held_out), logits(streamed, held_out)
    diff = (a - b).abs().max().item()
    print(
        f"SmolLM2-135M 30%: max |logit difference| streamed vs in memory {diff:.2e} (logits span {a.abs().max():.1f})"
    )
    assert streamed.slicing_info.dims == dims
    assert diff < 1e-3


PEAK = """
import sys, torch
torch.set_num_threads(1)  # one heap arena: the peak does not depend on how threads interleave
from helpers.compression.streaming import stream_slice
from helpers.infra.memory import peak_memory_mb, reset_peak_memory
source, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
reset_peak_memory("cpu")
stream_slice(source, out, ids, [576] * n, progress=False)
print(peak_memory_mb("cpu"))
"""


def test_streamed_peak_memory_does_not_grow_with_depth(tmp_path):
    """Twice the layers adds less than one layer's weights to the peak resident set (helpers.infra.memory)."""
    peaks, layer_mb = {}, None
    for n in (3, 6):
        model = tiny_model(
            "llama", hidden_size=768, intermediate_size=3072, num_hidden_layers=n, num_attention_heads=12
        )
        layer_mb = sum(p.numel() for p in model.model.layers[0].parameters()) * 4 / 2**20
        model.save_pretrained(tmp_path / f"dense{n}")
        del model
        code = textwrap.dedent(PEAK)
        args = [sys.executable, "-c", code, str(tmp_path / f"dense{n}"), str(tmp_path / f"out{n}"), str(n)]
        peaks[n] = float(subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()[-1])
    growth = peaks[6] - peaks[3]
    print(f"peak RSS {peaks[3]:.0f} MiB (3 layers), {peaks[6]:.0f} MiB (6 layers); one layer {layer_mb:.1f} MiB")
    assert growth < layer_mb


def test_a_run_that_cannot_fit_is_refused_before_reading_weights(tmp_path):
    """A config-only folder (no weights to read) is refused with the formula's numbers, and nothing is written."""
    model = tiny_model("llama", vocab_size=50_000)
    model.config.save_pretrained(tmp_path / "config-only")
    with pytest.raises(DoesNotFitError) as refused:
        stream_slice(tmp_path / "config-only", tmp_path / "out", windows(), DIMS, memory_limit=2**20)
    message = str(refused.value)
    table_gib = 50_000 * 64 * 4 / 2**30  # V x d float32, computed from the config by hand
    layer_gib = sum(p.numel() for p in model.model.layers[0].parameters()) * 4 / 2**30
    assert f"{table_gib:.2f} GiB" in message and f"{layer_gib:.2f} GiB" in message
    assert "0.00 GiB is available" in message
    assert not (tmp_path / "out").exists()


def test_memory_terms_follow_the_formula():
    """Table V x d, layer weights and covariances as the formula in docs/streaming.md states, for an 8B shape."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "llama",
        vocab_size=128_256,
        hidden_size=4096,
        intermediate_size=14_336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    memory = stream_memory(config, 16, 256, 8)
    assert memory.table == 128_256 * 4096 * 4
    assert memory.layer == (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14_336 + 2 * 4096) * 4
    assert memory.covariance == 3 * 4096 * 4096 * 8
    assert memory.host_peak() < 6 * 2**30  # the goal for this shape


def test_shard_writer_and_reader_agree_with_safetensors(tmp_path):
    """Tensor-by-tensor files load with safetensors' own reader, and our reader reads safetensors' files."""
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.int64), "c": torch.randn(2)}
    writer = ShardWriter(tmp_path / "w.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    for name in ["c", "a", "b"]:  # any order
        writer.write(name, tensors[name])
    writer.close()
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    (tmp_path / "ref").mkdir()
    save_file(tensors, tmp_path / "ref" / "model.safetensors")
    reader = CheckpointReader(tmp_path / "ref")
    assert all(torch.equal(reader.read(k), v) for k, v in tensors.items())
    assert reader.numel() == 15 + 7 + 2


def test_shard_writer_refuses_a_wrong_shape_and_a_missing_tensor(tmp_path):
    writer = ShardWriter(tmp_path / "w.safetensors", {"x": (torch.float32, (2, 2)), "y": (torch.float32, (3,))})
    with pytest.raises(ValueError, match="layout says"):
        writer.write("x", torch.zeros(2, 3))
    writer.write("x", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="never written"):
        writer.close()


def test_cli_slice_stream_prints_the_prediction_and_writes_a_loadable_folder(tmp_path, capsys):
    """`python -m helpers slice --stream` on a tiny checkpoint folder: the formula first, then the sliced folder."""
    from transformers import AutoTokenizer

    from helpers.cli import main
    from helpers.models.loading import DEFAULT_MODEL, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    argv = ["slice", "--model", str(tmp_path / "tiny"), "--sp", "0.25", "--stream", "--calib-seqlen", "16"]
    assert main([*argv, "--calib-windows", "8", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.index("predicted peak memory") < printed.index("wrote")
    assert json.loads((tmp_path / "out" / "slicing.json").read_text())["dims"] == [48] * 4
    assert load_sliced(tmp_path / "out", device="cpu")[0].slicing_info.dims == [48] * 4
    assert main([*argv, "--calib-windows", "8", "--out", str(tmp_path / "out2"), "--max-memory", "0.001"]) == 2
    assert "is available" in capsys.readouterr().err and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("model_type", supported_model_types())
def test_streamed_perplexity_equals_the_whole_model(tmp_path, model_type):
    """One layer at a time (activations on disk) gives the perplexity of the loaded model, dense and sliced."""
    from helpers.compression.sliced_io import save_sliced
    from helpers.evaluation.perplexity import perplexity_on_ids
    from helpers.evaluation.streamed import streamed_perplexity

    model = noisy_model(model_type, tied=True)
    model.save_pretrained(tmp_path / "dense")
    ids = windows(5, 24, seed=3)  # batches of 2, 2 and 1 window
    for folder in ("dense", "sliced"):
        if folder == "sliced":
            rotate_and_slice(model, windows(), DIMS, progress=False)
            save_sliced(model, None, tmp_path / "sliced")
        whole = perplexity_on_ids(model, ids, batch_size=2, progress=False)
        streamed = streamed_perplexity(tmp_path / folder, ids, batch_size=2, offload_dir=tmp_path, progress=False)
        print(f"{model_type} {folder}: perplexity {whole.perplexity:.6f} whole, {streamed.perplexity:.6f} streamed")
        assert streamed.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
        assert streamed.window_nll == pytest.approx(whole.window_nll, rel=1e-5)
