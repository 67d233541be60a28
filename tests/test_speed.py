"""The speed benchmark: per-round ratios, medians and IQR by hand; interleaved workers on tiny models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.compression.sliced_io import save_sliced
from helpers.compression.slicing import rotate_and_slice
from helpers.evaluation.speed import Workload, interleaved_benchmark, speed_markdown, summarise
from helpers.models.loading import tiny_model


def test_summary_pairs_each_sample_with_dense_from_the_same_round():
    dense = [100.0, 50.0, 80.0, 90.0, 70.0]  # a busy machine: round 1 is slow for everyone
    sliced = [130.0, 60.0, 100.0, 120.0, 84.0]
    rows = [
        {"model": m, "dtype": "float32", "mode": "eager", "workload": "prefill 1x8", "repeat": r}
        | {"tokens_per_s": v, "peak_memory_mb": 1}
        for m, values in (("dense", dense), ("sliced", sliced))
        for r, v in enumerate(values)
    ]
    summary = summarise(pd.DataFrame(rows)).set_index("model")
    ratios = np.array(sliced) / np.array(dense)  # 1.3, 1.2, 1.25, 1.333, 1.2
    assert summary.loc["sliced", "ratio_to_dense"] == pytest.approx(np.median(ratios))
    assert summary.loc["sliced", "ratio_q1"] == pytest.approx(1.2)
    assert summary.loc["sliced", "ratio_q3"] == pytest.approx(1.3)
    assert summary.loc["sliced", "tokens_per_s"] == pytest.approx(100.0)
    assert summary.loc["dense", "ratio_to_dense"] == 1.0 and summary.loc["dense", "repeats"] == 5
    assert "| float32 | eager | prefill 1x8 | sliced | 100.0 [84.0, 120.0] | 1.250 [1.200, 1.300] |" in speed_markdown(
        summary.reset_index()
    )


def test_interleaved_benchmark_runs_every_model_in_its_own_worker(tmp_path):
    folders = {}
    for label, dims in (("dense", [64] * 4), ("sliced", [32] * 4)):
        model = tiny_model("llama", tie_word_embeddings=True)
        rotate_and_slice(model, torch.randint(0, 128, (4, 16)), dims, progress=False)
        folders[label] = str(save_sliced(model, None, tmp_path / label))
    workloads = (Workload("prefill", 2, 16), Workload("generate", 2, 4, 3))
    samples = interleaved_benchmark(folders, "float32", workloads, repeats=2, threads=1, progress=False)
    assert len(samples) == 2 * 2 * 2  # models x workloads x repeats (the warm-up round is dropped)
    assert set(samples["workload"]) == {"prefill 2x16", "generate b2 (3 new)"}
    assert (samples["tokens_per_s"] > 0).all() and (samples["peak_memory_mb"] > 50).all()
    assert set(samples["mode"]) == {"eager"}


def test_interleaved_benchmark_names_the_modes_it_takes():
    with pytest.raises(ValueError, match="mode must be one of eager, compiled, got 'fast'"):
        interleaved_benchmark({"dense": "unused"}, workloads=(), mode="fast")


def test_prefill_flops_match_the_closed_form_for_dense_and_sliced():
    """Matrix products counted per linear layer by hand; attention over (n + 1) / 2 keys per query (causal)."""
    from helpers.evaluation.speed import prefill_flops

    batch, n, vocab, d, ffn, layers, heads, head_dim, kv = 2, 24, 128, 64, 96, 4, 4, 16, 32
    attention = layers * batch * 2 * n * (n + 1) * head_dim * heads  # QK^T and AV, 2 FLOPs per multiply-add
    head = 2 * batch * vocab * d  # logits for the last position only

    def linear_flops(d_in: int, d_out: int) -> int:  # one layer, per token: q k v, o, gate up, down, shortcuts
        return 2 * (d_in * (d + 2 * kv) + d * d_in + 2 * d_in * ffn + ffn * d_out + d_in * d_in + d_in * d_out)

    dense = tiny_model("llama")
    got = prefill_flops(dense, batch, n)
    dense_linear = 2 * (d * (d + 2 * kv) + d * d + 3 * d * ffn)  # no shortcut matrices in a dense layer
    assert got["matmul"] == batch * n * layers * dense_linear + head
    assert got["attention"] == pytest.approx(attention)

    sliced = tiny_model("llama")
    rotate_and_slice(sliced, torch.randint(0, vocab, (4, 16)), [32] * layers, progress=False)
    got = prefill_flops(sliced, batch, n)
    per_token = (layers - 1) * linear_flops(32, 32) + linear_flops(32, d)  # the last layer writes full width
    assert got["matmul"] == batch * n * per_token + head
    assert got["total"] == pytest.approx(got["matmul"] + attention)


def test_flop_table_ceilings_are_ratios_to_the_baseline():
    """Ceilings divide the baseline's FLOPs by each model's; a one-token forward is the closed-form weight count."""
    from helpers.evaluation.speed import flop_table, prefill_flops

    models = {}
    for label, width in (("rotated", 64), ("sliced", 32)):  # rotated: full width, shortcut matrices included
        models[label] = tiny_model("llama")
        rotate_and_slice(models[label], torch.randint(0, 128, (4, 16)), [width] * 4, progress=False)
    table = flop_table(models, 16, baseline="rotated").set_index("model")
    prefill = {k: prefill_flops(m, 1, 16)["total"] for k, m in models.items()}
    assert table.loc["sliced", "prefill_ceiling"] == pytest.approx(prefill["rotated"] / prefill["sliced"])
    weights = 4 * (64 * 128 + 64 * 64 + 3 * 64 * 96 + 2 * 64 * 64) + 128 * 64  # every matrix once, head included
    attention = 4 * 2 * 2 * 4 * 16  # 4 layers, QK^T and AV, 2 FLOPs per multiply-add, 4 heads of 16, one pair
    assert table.loc["rotated", "token_gflop"] * 1e9 == pytest.approx(2 * weights + attention)


def test_product_rates_count_every_layer_product_and_pair_rounds():
    """GFLOP per model is the closed-form sum over the layers' linear layers; time ratios pair rounds with dense."""
    from helpers.evaluation.speed import product_rates, product_summary

    d, ffn, kv, layers, rows = 64, 96, 32, 4, 8
    dense, sliced = tiny_model("llama"), tiny_model("llama")
    rotate_and_slice(sliced, torch.randint(0, 128, (4, 16)), [32] * layers, progress=False)
    samples = product_rates({"dense": dense, "sliced": sliced}, rows, repeats=3, progress=False)
    assert len(samples) == 6 and set(samples["repeat"]) == {0, 1, 2}  # the warm-up round is not a sample

    def per_layer(d_in: int, d_out: int, shortcuts: bool) -> int:  # multiply-adds per row: q k v, o, gate up, down
        return d_in * (d + 2 * kv) + d * d_in + 2 * d_in * ffn + ffn * d_out + shortcuts * (d_in * d_in + d_in * d_out)

    expected = {
        "dense": layers * per_layer(d, d, False),
        "sliced": (layers - 1) * per_layer(32, 32, True) + per_layer(32, d, True),  # the last layer writes d
    }
    got = samples.groupby("model")["gflop"].first()
    for label, mults in expected.items():
        assert got[label] * 1e9 == pytest.approx(2 * rows * mults)
    summary = product_summary(samples).set_index("model")
    seconds = samples.pivot(index="repeat", columns="model", values="seconds")
    assert summary.loc["sliced", "speedup"] == pytest.approx(np.median(seconds["dense"] / seconds["sliced"]))
    assert summary.loc["sliced", "flop_ratio"] == pytest.approx(expected["dense"] / expected["sliced"])
    assert summary.loc["dense", "gflop_per_s"] == pytest.approx(got["dense"] / seconds["dense"].median())
    bf16 = product_rates({"dense": dense, "sliced": sliced}, rows, "bfloat16", repeats=1, progress=False)
    assert bf16.groupby("model")["gflop"].first().equals(got)  # same products in another dtype
    assert all(p.dtype == torch.float32 for p in sliced.parameters())  # timed on copies: the model is unchanged
