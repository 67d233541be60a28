"""Streamed slicing of synthetic models too big for memory: peak RSS, wall time and CPU-seconds (docs/streaming.md).

A model of a real shape (a ~1B Llama-3.2-1B shape, or Llama-3-8B's) is built
from its config with random weights and written as bfloat16 safetensors shards,
one layer at a time (never whole in memory); it is then sliced at `--sp` with a
small random-token calibration set, streamed in float32, and the script prints
the model's size on disk, the predicted and measured peak RSS, wall time and
CPU-seconds, and the parameter count written against the ledger's prediction.
`--check` also rotates at 0% and compares logits with the dense model's (both
through the streamed forward): random weights say nothing about quality, but
rotation without slicing must leave the outputs unchanged at any size.

    python scripts/bench_stream.py --shape 1b --check
    python scripts/bench_stream.py --shape 8b

Each stage runs in its own process, so each peak is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from helpers.infra.storage import DATA_DIR

SHAPES = {  # the configs of Llama-3.2-1B and Llama-3-8B (random weights); "smoke" checks the script in seconds
    "smoke": dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
    "150m": dict(num_hidden_layers=8, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32_000, tie_word_embeddings=True),
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128_256, tie_word_embeddings=True),
    "8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14_336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128_256, tie_word_embeddings=False),
}  # fmt: skip
STD = 0.02  # the initialiser's scale: a residual stream that neither explodes nor vanishes over 32 layers


def make(folder: Path, shape: str) -> None:
    """Write config.json and bfloat16 shards (one per layer, one for the ends) with an index, tensor by tensor."""
    from helpers.compression.streaming import skeleton
    from helpers.infra.shards import INDEX_FILE, ShardWriter

    config = AutoConfig.for_model("llama", max_position_embeddings=4096, **SHAPES[shape])
    model = skeleton(config, torch.float32)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():  # a tied head is stored once, as the embedding
        layer = name.split(".")[2] if name.startswith("model.layers.") else "ends"
        groups.setdefault(layer, []).append(name)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, (group, names) in enumerate(groups.items()):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        writer = ShardWriter(tmp / file, {n: (torch.bfloat16, tuple(params[n].shape)) for n in names}, {"format": "pt"})
        for name in names:
            shape_ = params[name].shape
            if "norm" in name:
                values = 1 + 0.1 * torch.randn(shape_, generator=gen)
            else:
                values = STD * torch.randn(shape_, generator=gen)
            writer.write(name, values.to(torch.bfloat16))
            weight_map[name] = file
        writer.close()
        print(f"  wrote {group} ({file})", flush=True)
    (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    tmp.rename(folder)


def calibration(config, windows: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (windows, seqlen), generator=torch.Generator().manual_seed(seed))


def slice_stage(folder: Path, out: Path, sp: float, windows: int, seqlen: int, batch_size: int) -> dict:
    """Slice `folder` at `sp`, streamed; measure this process's peak RSS, wall time and CPU-seconds."""
    from helpers.compression.allocation import ModelShape, constant_dims
    from helpers.compression.ledger import ledger_totals, parameter_ledger
    from helpers.compression.sliced_io import sliced_skeleton
    from helpers.compression.streaming import skeleton, stream_memory, stream_slice
    from helpers.infra.memory import peak_memory_mb, reset_peak_memory
    from helpers.infra.shards import CheckpointReader

    config = AutoConfig.from_pretrained(folder)
    ids = calibration(config, windows, seqlen)
    predicted = stream_memory(config, windows, seqlen, batch_size).host_peak()
    shutil.rmtree(out, ignore_errors=True)
    reset_peak_memory("cpu")
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    stream_slice(
        folder,
        out,
        ids,
        constant_dims(ModelShape.from_config(config), sp).tolist(),
        batch_size=batch_size,
        progress=True,
    )
    end = resource.getrusage(resource.RUSAGE_SELF)
    written = CheckpointReader(out).numel()
    ledger = ledger_totals(parameter_ledger(sliced_skeleton(out, lambda c: skeleton(c, torch.float32))))["total"]
    return {
        "wall_s": time.perf_counter() - start,
        "cpu_s": end.ru_utime + end.ru_stime - cpu.ru_utime - cpu.ru_stime,
        "peak_rss_gib": peak_memory_mb("cpu") / 1024,
        "predicted_gib": predicted / 2**30,
        "params_written": written,
        "params_ledger": ledger,
        "dense_params": CheckpointReader(folder).numel(),
    }


def check_stage(folder: Path, rotated: Path, windows: int, seqlen: int, batch_size: int) -> dict:
    """Rotate at 0% (every dim kept) and compare the logits of both folders through the streamed forward."""
    from helpers.compression.streaming import stream_slice
    from helpers.evaluation.streamed import streamed_logits

    config = AutoConfig.from_pretrained(folder)
    shutil.rmtree(rotated, ignore_errors=True)
    stream_slice(folder, rotated, calibration(config, windows, seqlen), [config.hidden_size] * config.num_hidden_layers,
                 batch_size=batch_size, progress=True)  # fmt: skip
    held_out = calibration(config, 2, 32, seed=7)
    dense = torch.cat(list(streamed_logits(folder, held_out, progress=False)))
    again = torch.cat(list(streamed_logits(rotated, held_out, progress=False)))
    return {"max_abs_diff": (dense - again).abs().max().item(), "logit_scale": dense.abs().max().item()}


def _gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--sp", type=float, default=0.3)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--root", type=Path, default=DATA_DIR / "cache" / "bench_stream")
    parser.add_argument("--check", action="store_true", help="also rotate at 0%% and compare logits")
    parser.add_argument("--stage", choices=["make", "slice", "check"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    dense, out = args.root / f"{args.shape}-dense", args.root / f"{args.shape}-sliced"
    calib = (args.calib_windows, args.calib_seqlen, args.batch_size)
    if args.stage == "make":
        return make(dense, args.shape)
    if args.stage == "slice":
        return print(json.dumps(slice_stage(dense, out, args.sp, *calib)))
    if args.stage == "check":
        return print(json.dumps(check_stage(dense, args.root / f"{args.shape}-rotated", *calib)))
    base = [sys.executable, __file__, *sys.argv[1:]]
    if not dense.exists():
        print(f"building the synthetic {args.shape} model in {dense}", flush=True)
        subprocess.run([*base, "--stage", "make"], check=True)
    result = json.loads(subprocess.run([*base, "--stage", "slice"], check=True, stdout=subprocess.PIPE).stdout)
    head = (
        f"| model | layers x d | on disk (bf16) | sliced at {args.sp:.0%} (fp32) | peak RSS | predicted | wall | CPU |"
    )
    print("\n" + head)
    print("|---|---|---|---|---|---|---|---|")
    config = AutoConfig.from_pretrained(dense)
    print(
        f"| synthetic {args.shape} | {config.num_hidden_layers} x {config.hidden_size} | {_gib(dense):.2f} GiB "
        f"| {_gib(out):.2f} GiB | {result['peak_rss_gib']:.2f} GiB | {result['predicted_gib']:.2f} GiB "
        f"| {result['wall_s'] / 60:.1f} min | {result['cpu_s'] / 60:.1f} min |"
    )
    same = result["params_written"] == result["params_ledger"]
    print(f"\nparameters: dense {result['dense_params']:,}; written {result['params_written']:,}; "
          f"ledger {result['params_ledger']:,} ({'equal' if same else 'DIFFERENT'})")  # fmt: skip
    if args.check:
        check = json.loads(subprocess.run([*base, "--stage", "check"], check=True, stdout=subprocess.PIPE).stdout)
        diff, scale = check["max_abs_diff"], check["logit_scale"]
        print(f"rotation at 0%: max |logit difference| {diff:.2e} (logits up to {scale:.2f})")


if __name__ == "__main__":
    main()
