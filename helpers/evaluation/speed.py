"""Speed and memory of a causal LM: prefill throughput, greedy generation tokens/s, peak memory.

Single measurements (`prefill_throughput`, `generation_speed`) return plain
dicts. `interleaved_benchmark` is the trustworthy comparison: one worker
process per model, warm-up, repeats alternated between models, and
`summarise` gives medians, interquartile ranges and per-round ratios to dense.
Memory is the process's peak resident set size on CPU and
torch.cuda.max_memory_allocated on CUDA (`helpers.infra.memory`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from torch import nn

from helpers.compression.checkpoints import load_model
from helpers.infra.integrity import cpu_model
from helpers.infra.memory import peak_memory_mb, reset_peak_memory
from helpers.infra.progress import progress_bar
from helpers.infra.storage import markdown_table
from helpers.models.adapters import get_adapter
from helpers.models.loading import pick_device


def device_name(device: torch.device | str, threads: bool = True) -> str:
    """A readable name for the device: GPU model, or CPU model (and, with `threads`, this process's thread count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} CPU" + (f", {torch.get_num_threads()} threads" if threads else "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(func: Callable[[], Any], device: torch.device | str) -> tuple[Any, float]:
    """Run `func()` and return (result, wall seconds), synchronising CUDA around it."""
    device = torch.device(device)
    _sync(device)
    start = time.perf_counter()
    result = func()
    _sync(device)
    return result, time.perf_counter() - start


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prefill_throughput(model: nn.Module, input_ids: torch.Tensor, repeats: int = 1) -> dict[str, float]:
    """Tokens per second of a full forward pass over `input_ids` (batch, seqlen), best of `repeats`."""
    device = _model_device(model)
    ids = input_ids.to(device)
    with torch.no_grad():
        model(input_ids=ids[:, :8], use_cache=False)  # warm-up
        best = min(timed(lambda: model(input_ids=ids, use_cache=False), device)[1] for _ in range(repeats))
    return {"prefill_tokens_per_s": ids.numel() / best, "prefill_latency_s": best, "prefill_tokens": ids.numel()}


def generation_speed(
    model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32, batch_size: int = 1
) -> dict[str, float]:
    """Greedy `generate` with the KV cache: new tokens per second for a batch of identical-length prompts."""
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] < batch_size:
        raise ValueError(f"prompt_ids must be (>= batch_size, prompt_len); got {tuple(prompt_ids.shape)}.")
    device = _model_device(model)
    ids = prompt_ids[:batch_size].to(device)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
        reset_peak_memory(device)
        out, seconds = timed(
            lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs), device
        )
    generated = (out.shape[1] - ids.shape[1]) * batch_size
    return {
        "batch_size": batch_size,
        "new_tokens": generated,
        "generation_tokens_per_s": generated / seconds,
        "latency_per_token_ms": 1000 * seconds / (out.shape[1] - ids.shape[1]),
        "peak_memory_mb": peak_memory_mb(device),
    }


# ---------------------------------------------------------------------------------------------
# Interleaved benchmark: one worker process per model, requests alternated between them
# ---------------------------------------------------------------------------------------------


def causal_attention_flops(config, batch: int, length: int) -> float:
    """FLOPs of QK^T and AV over a causal prompt: each query meets itself and the keys before it (within a window)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    total = 0
    for kind in kinds:
        window = config.sliding_window if kind == "sliding_attention" else length
        pairs = sum(min(i, window) for i in range(1, length + 1))
        total += 2 * 2 * batch * pairs * heads * head_dim  # two products, 2 FLOPs per multiply-add
    return float(total)


def prefill_flops(model: nn.Module, batch: int, length: int) -> dict[str, float]:
    """FLOPs of one prefill (next-token logits only): matrix products as run, plus causal attention.

    The products are counted by `torch.utils.flop_counter` on a real forward
    (every linear layer the model actually runs); attention, which slicing
    leaves alone, comes from the config. If two models ran at equal FLOP rates,
    the ratio of their totals would be their prefill speed ratio: the ceiling
    on slicing's speed-up.
    """
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(100, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=ids.to(_model_device(model)), use_cache=False, logits_to_keep=1)
    matmul = float(sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" not in str(op)))
    attention = causal_attention_flops(model.config, batch, length)
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def flop_table(models: dict[str, nn.Module], length: int, baseline: str = "dense") -> pd.DataFrame:
    """Per model: GFLOPs of a 1 x `length` prefill and of one token's forward, and the speed-ups they allow.

    A one-token forward runs every weight matrix once, head included: the
    multiply-adds of a decoding step per sequence, and the weights it reads
    (attention over the cache aside). Ceilings assume equal FLOP rates.
    """
    rows = []
    for label, model in models.items():
        prefill = prefill_flops(model, 1, length)
        rows.append(
            {
                "model": label,
                "prefill_matmul_gflop": prefill["matmul"] / 1e9,
                "prefill_attention_gflop": prefill["attention"] / 1e9,
                "prefill_gflop": prefill["total"] / 1e9,
                "token_gflop": prefill_flops(model, 1, 1)["total"] / 1e9,
            }
        )
    table = pd.DataFrame(rows).set_index("model")
    for kind in ("prefill", "token"):
        table[f"{kind}_ceiling"] = table.loc[baseline, f"{kind}_gflop"] / table[f"{kind}_gflop"]
    return table.reset_index()


def flop_markdown(table: pd.DataFrame, length: int) -> str:
    """The FLOP table as Markdown."""
    return markdown_table(
        f"model | 1 x {length} prefill GFLOP: products + attention = total | prefill ceiling "
        "| one token's forward GFLOP | generation ceiling",
        [
            [
                r.model,
                f"{r.prefill_matmul_gflop:.2f} + {r.prefill_attention_gflop:.2f} = {r.prefill_gflop:.2f}",
                f"{r.prefill_ceiling:.3f}",
                f"{r.token_gflop:.4f}",
                f"{r.token_ceiling:.3f}",
            ]
            for r in table.itertuples()
        ],
    )


def layer_linears(model: nn.Module) -> list[nn.Linear]:
    """Every linear layer inside the decoder layers (shortcuts and maps included): the products slicing narrows."""
    layers = get_adapter(model).layers(model)
    return [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]


def _round_order(labels: list[str], repeat: int) -> list[str]:
    """The order in which round `repeat` runs the models: rotated each round, so none always goes first."""
    shift = repeat % len(labels)
    return labels[shift:] + labels[:shift]


def _paired_baseline(samples: pd.DataFrame, keys: list[str], column: str, baseline: str = "dense") -> pd.Series:
    """Per sample, `column` of the `baseline` model's sample from the same round (`keys`), aligned to `samples`."""
    base = samples[samples["model"] == baseline].set_index(keys)[column]
    return pd.Series(base.loc[samples.set_index(keys).index].to_numpy(), index=samples.index)


def _on(linear: nn.Linear, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    """`linear` itself where it already has this device and dtype, else a converted copy (the model stays as it is)."""
    if linear.weight.device == device and linear.weight.dtype == dtype:
        return linear
    return copy.deepcopy(linear).to(device, dtype)


def product_rates(
    models: dict[str, nn.Module],
    rows: int,
    dtype: str = "float32",
    repeats: int = 7,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Seconds of every model's decoder-layer products alone (random inputs of `rows` rows), interleaved rounds.

    Each round runs each model's `layer_linears` once, in an order rotated each
    round, after one warm-up round. Set against their FLOP ratio, the time ratio
    says whether narrower products run at dense's FLOP rate (docs/method.md
    section 7). Runs on `device` (default: CUDA if present, as the workloads
    do), converting copies where needed. One row per (model, repeat): seconds and GFLOP.
    """
    torch_dtype, device = getattr(torch, dtype), pick_device(device)
    generator = torch.Generator().manual_seed(0)
    work = {label: [_on(m, device, torch_dtype) for m in layer_linears(model)] for label, model in models.items()}
    widths = {m.in_features for linears in work.values() for m in linears}
    inputs = {w: torch.randn(rows, w, generator=generator).to(device, torch_dtype) for w in sorted(widths)}
    gflop = {
        label: 2 * rows * sum(m.in_features * m.out_features for m in linears) / 1e9 for label, linears in work.items()
    }

    def run(linears: list[nn.Linear]) -> None:  # outputs are dropped as they come
        for linear in linears:
            linear(inputs[linear.in_features])

    labels, samples = list(work), []
    with torch.no_grad():
        for repeat in progress_bar(range(-1, repeats), desc=f"products {dtype}", unit="round", disable=not progress):
            for label in _round_order(labels, repeat):
                seconds = timed(functools.partial(run, work[label]), device)[1]
                if repeat >= 0:  # round -1 is the warm-up
                    samples.append(
                        {
                            "dtype": dtype,
                            "rows": rows,
                            "model": label,
                            "repeat": repeat,
                            "seconds": seconds,
                            "gflop": gflop[label],
                        }
                    )
    return pd.DataFrame(samples)


def product_summary(samples: pd.DataFrame, baseline: str = "dense") -> pd.DataFrame:
    """Per model: GFLOP, median GFLOP/s, FLOP ratio to `baseline`, and median [IQR] of the per-round time ratio."""
    keys = ["dtype", "rows", "repeat"]
    samples = samples.assign(
        speedup=_paired_baseline(samples, keys, "seconds", baseline) / samples["seconds"],
        flop_ratio=_paired_baseline(samples, keys, "gflop", baseline) / samples["gflop"],
    )
    groups = samples.groupby(["dtype", "rows", "model"], sort=False)
    summary = pd.DataFrame(
        {
            "gflop": groups["gflop"].first(),
            "seconds": groups["seconds"].median(),
            "flop_ratio": groups["flop_ratio"].first(),
            "speedup": groups["speedup"].median(),
            "speedup_q1": groups["speedup"].quantile(0.25),
            "speedup_q3": groups["speedup"].quantile(0.75),
            "repeats": groups["seconds"].size(),
        }
    )
    return summary.assign(gflop_per_s=summary["gflop"] / summary["seconds"]).reset_index()


def product_markdown(summary: pd.DataFrame) -> str:
    """The product summary as Markdown: FLOPs, rate, and the time ratio beside the FLOP ratio."""
    return markdown_table(
        "dtype | rows | model | layer products GFLOP | GFLOP/s (median) | FLOP ratio to dense "
        "| time ratio to dense, median [IQR] | n",
        [
            [
                r.dtype,
                r.rows,
                r.model,
                f"{r.gflop:.2f}",
                f"{r.gflop_per_s:.1f}",
                f"{r.flop_ratio:.3f}",
                f"{r.speedup:.3f} [{r.speedup_q1:.3f}, {r.speedup_q3:.3f}]",
                r.repeats,
            ]
            for r in summary.itertuples()
        ],
    )


def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    """Wall seconds to read a prompt batch and produce the next token's logits (what generation's prefill does)."""
    with torch.no_grad():
        return timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), _model_device(model))[1]


def generate_seconds(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Wall seconds of greedy `generate` with the KV cache, exactly `new_tokens` new tokens per prompt."""
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return timed(
            lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs),
            _model_device(model),
        )[1]


MODES = ("eager", "compiled")  # how `interleaved_benchmark` runs every model: as loaded, or torch.compile'd


def compile_for_speed(model: nn.Module) -> nn.Module:
    """`torch.compile` the forward (static shapes) and generate with a static KV cache, so decoding reuses one graph.

    The first call of every new shape compiles (minutes on a CPU): warm up each workload before timing it.
    """
    model.forward = torch.compile(model.forward, dynamic=False)
    model.generation_config.cache_implementation = "static"
    return model


def _worker(conn, source: str, dtype: str, threads: int, device: str, mode: str) -> None:
    """Worker process: load one model, then answer (kind, batch, length, new_tokens) requests with seconds."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _ = load_model(source, device=device, dtype=getattr(torch, dtype))
    if mode == "compiled":
        compile_for_speed(model)
    vocab = model.config.vocab_size
    reset_peak_memory(device)
    conn.send("ready")
    while (request := conn.recv()) is not None:
        kind, batch, length, new_tokens = request
        ids = torch.randint(100, vocab, (batch, length), generator=torch.Generator().manual_seed(batch)).to(device)
        seconds = prefill_seconds(model, ids) if kind == "prefill" else generate_seconds(model, ids, new_tokens)
        conn.send({"seconds": seconds, "peak_memory_mb": peak_memory_mb(device)})


class Worker:
    """A model living in its own process (so its peak memory and allocator state are its own)."""

    def __init__(self, source: str, dtype: str, threads: int, device: str, mode: str = "eager") -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, source, dtype, threads, device, mode)
        self.process = ctx.Process(target=_worker, args=args, daemon=True)
        self.process.start()
        if not self.conn.poll(600) or self.conn.recv() != "ready":
            self.close()
            raise RuntimeError(f"speed worker for {source} ({dtype}) did not start.")

    def request(self, kind: str, batch: int, length: int, new_tokens: int = 0) -> dict:
        """Run one timed measurement in the worker; returns seconds and the worker's peak memory so far."""
        self.conn.send((kind, batch, length, new_tokens))
        return self.conn.recv()

    def close(self) -> None:
        """Stop the worker process."""
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(None)
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


@dataclasses.dataclass(frozen=True)
class Workload:
    """One timed measurement: prefill of batch x length tokens, or generation of new_tokens after a prompt."""

    kind: str  # "prefill" or "generate"
    batch: int
    length: int  # prompt length in tokens
    new_tokens: int = 0

    @property
    def name(self) -> str:
        if self.kind == "prefill":
            return f"prefill {self.batch}x{self.length}"
        return f"generate b{self.batch} ({self.new_tokens} new)"

    def tokens(self) -> int:
        """Tokens counted for tokens/s: prompt tokens for prefill, new tokens for generation."""
        return self.batch * (self.length if self.kind == "prefill" else self.new_tokens)


WORKLOADS = (
    Workload("prefill", 1, 512),
    Workload("prefill", 8, 512),
    Workload("generate", 1, 32, 64),
    Workload("generate", 16, 32, 64),
)


def interleaved_benchmark(
    models: dict[str, str],
    dtype: str = "float32",
    workloads: tuple[Workload, ...] = WORKLOADS,
    repeats: int = 5,
    threads: int = 1,
    device: str | None = None,
    progress: bool = True,
    mode: str = "eager",
) -> pd.DataFrame:
    """Tokens/s samples of several models, each in its own worker, requests alternated between them.

    `models` maps a label to a model name or folder. Every workload runs once
    per model as warm-up, then `repeats` rounds in which each model runs it
    once, in an order rotated each round, so that a busy machine slows every
    model alike. `mode`: one of MODES; "compiled" runs every model through
    `compile_for_speed` (the warm-up round compiles). Returns one row per (model, workload, repeat).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
    device = str(pick_device(device))
    workers: dict[str, Worker] = {}
    rows = []
    try:
        for label, source in models.items():
            workers[label] = Worker(source, dtype, threads, device, mode)
        labels = list(workers)
        steps = [(w, r) for w in workloads for r in range(-1, repeats)]
        for workload, repeat in progress_bar(steps, desc=f"speed {dtype} {mode}", unit="round", disable=not progress):
            for label in _round_order(labels, repeat):
                result = workers[label].request(workload.kind, workload.batch, workload.length, workload.new_tokens)
                if repeat >= 0:  # round -1 is the warm-up
                    rows.append(
                        {
                            "model": label,
                            "dtype": dtype,
                            "mode": mode,
                            "workload": workload.name,
                            "repeat": repeat,
                            "tokens_per_s": workload.tokens() / result["seconds"],
                            "peak_memory_mb": result["peak_memory_mb"],
                        }
                    )
    finally:
        for worker in workers.values():
            worker.close()
    return pd.DataFrame(rows)


def summarise(samples: pd.DataFrame, baseline: str = "dense") -> pd.DataFrame:
    """Median and interquartile range of tokens/s, and of the per-round ratio to `baseline`, per model and workload.

    Ratios pair each sample with the baseline's sample from the same round,
    so the machine's load in that round cancels.
    """
    keys = ["dtype", "mode", "workload", "repeat"]
    samples = samples.assign(ratio=samples["tokens_per_s"] / _paired_baseline(samples, keys, "tokens_per_s", baseline))
    groups = samples.groupby(["dtype", "mode", "workload", "model"], sort=False)
    return pd.DataFrame(
        {
            "tokens_per_s": groups["tokens_per_s"].median(),
            "tokens_per_s_q1": groups["tokens_per_s"].quantile(0.25),
            "tokens_per_s_q3": groups["tokens_per_s"].quantile(0.75),
            "ratio_to_dense": groups["ratio"].median(),
            "ratio_q1": groups["ratio"].quantile(0.25),
            "ratio_q3": groups["ratio"].quantile(0.75),
            "peak_memory_mb": groups["peak_memory_mb"].max(),
            "repeats": groups["tokens_per_s"].size(),
        }
    ).reset_index()


def speed_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table: median tokens/s [IQR], ratio to dense [IQR], peak memory."""
    return markdown_table(
        "dtype | mode | workload | model | tokens/s median [IQR] | ratio to dense median [IQR] | peak MiB | n",
        [
            [
                r.dtype,
                r.mode,
                r.workload,
                r.model,
                f"{r.tokens_per_s:.1f} [{r.tokens_per_s_q1:.1f}, {r.tokens_per_s_q3:.1f}]",
                f"{r.ratio_to_dense:.3f} [{r.ratio_q1:.3f}, {r.ratio_q3:.3f}]",
                f"{r.peak_memory_mb:.0f}",
                r.repeats,
            ]
            for r in summary.itertuples()
        ],
    )
