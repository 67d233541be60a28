"""The CUDA path end to end, in one run of under 10 minutes on one GPU; results in one folder (docs/streaming.md).

    python scripts/gpu_check.py --out data/runs/gpu-check          # on a machine with CUDA
    python scripts/gpu_check.py --out /tmp/gpu-check --cpu         # no GPU: the same code paths on the CPU

Checks, each a line of `results.json` (and of `summary.md`) with its numbers and a verdict:
1. every registered family, tiny config: in-memory and streamed slicing with the
   working layer on the GPU give the CPU's dims, and logits within 1e-3;
2. SmolLM2-135M at 30% (16 x 512 calibration tokens): the same, on the real weights;
3. perplexity on CUDA (whole model and streamed) equals the CPU's within 1e-3 relative;
4. zero-shot (ARC-Easy, 100 questions) on CUDA: the CPU's accuracy;
5. the speed table on CUDA (`python -m helpers speed --json`, dense and sliced);
6. `scripts/bench_stream.py --shape 150m` with the GPU: peak RSS, wall time, GPU peak memory.
Without CUDA (and without --cpu) it stops at once with a one-line reason and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

TOL = 1e-3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, summary.md and the logs")
    parser.add_argument("--cpu", action="store_true", help="no GPU: run every check with the CPU in the GPU's place")
    parser.add_argument("--skip", default="", help="comma-separated check numbers to skip (e.g. 5,6)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("error: CUDA is not available here (torch.cuda.is_available() is False); use --cpu", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    checks = [tiny_families, real_model, perplexity_check, zeroshot_check, speed_table, bench_stream]
    results, skip = [], {int(n) for n in args.skip.split(",") if n}
    for number, check in enumerate(checks, 1):
        if number in skip:
            continue
        start = time.perf_counter()
        try:
            row = {"check": number, "name": check.__name__, **check(device, args.out)}
        except Exception as err:  # a failed check is recorded, the others still run
            row = {"check": number, "name": check.__name__, "ok": False, "error": repr(err)}
            (args.out / f"check{number}-traceback.txt").write_text(traceback.format_exc())
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "results.json").write_text(
            json.dumps({"device": _device_name(device), "checks": results}, indent=2)
        )
    lines = [f"# GPU check on {_device_name(device)}", "", "| check | ok | seconds | numbers |", "|---|---|---|---|"]
    for row in results:
        numbers = {k: v for k, v in row.items() if k not in ("check", "name", "ok", "seconds")}
        lines.append(f"| {row['check']}. {row['name']} | {row.get('ok')} | {row['seconds']} | {numbers} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(row.get("ok") for row in results) else 1


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU (--cpu: the GPU's place taken by the CPU)"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


def tiny_families(device: str, out: Path) -> dict:
    """In-memory and streamed slicing with the layer on `device` vs on the CPU, every registered family."""
    import copy

    from helpers.compression.sliced_io import load_sliced
    from helpers.compression.slicing import rotate_and_slice
    from helpers.compression.streaming import stream_slice
    from helpers.models.adapters import supported_model_types
    from helpers.models.loading import tiny_model

    tiny = {"opt": {"ffn_dim": 96, "word_embed_proj_dim": 64}, "gemma3_text": {"head_dim": 16, "sliding_window": 8}}
    ids = torch.randint(3, 128, (6, 32), generator=torch.Generator().manual_seed(0))
    dims, worst = [48, 40, 56, 32], {}
    for model_type in supported_model_types():
        dense = tiny_model(model_type, **tiny.get(model_type, {}))
        dense.save_pretrained(out / "tiny" / model_type)
        cpu, gpu = copy.deepcopy(dense), copy.deepcopy(dense)
        rotate_and_slice(cpu, ids, dims, device="cpu", progress=False)
        info = rotate_and_slice(gpu, ids, dims, device=device, progress=False)
        stream_slice(out / "tiny" / model_type, out / "tiny" / f"{model_type}-streamed", ids, dims, device=device,
                     progress=False)  # fmt: skip
        streamed, _ = load_sliced(out / "tiny" / f"{model_type}-streamed", device="cpu")
        reference = _logits(cpu, ids)
        diff = max((_logits(m, ids) - reference).abs().max().item() for m in (gpu, streamed))
        assert info.dims == streamed.slicing_info.dims == dims
        worst[model_type] = diff
    return {"ok": max(worst.values()) < TOL, "max_abs_logit_diff": worst}


def real_model(device: str, out: Path) -> dict:
    """SmolLM2-135M at 30%: the layer on `device`, in memory and streamed, against the CPU's slicing."""
    from helpers.compression.allocation import ModelShape, constant_dims
    from helpers.compression.checkpoints import load_model
    from helpers.compression.sliced_io import load_sliced, save_sliced
    from helpers.compression.slicing import rotate_and_slice
    from helpers.compression.streaming import stream_slice
    from helpers.infra.textdata import CALIB_TEXT, EVAL_TEXT, load_windows
    from helpers.models.loading import DEFAULT_MODEL, resolve_model

    cpu, tokenizer = load_model(device="cpu")
    gpu, _ = load_model(device="cpu")
    calib = load_windows(tokenizer, CALIB_TEXT, 512, 16)
    held_out = load_windows(tokenizer, EVAL_TEXT, 128, 4)
    dims = constant_dims(ModelShape.from_config(cpu.config), 0.3).tolist()
    rotate_and_slice(cpu, calib, dims, device="cpu", progress=False)
    rotate_and_slice(gpu, calib, dims, device=device, progress=False)
    save_sliced(gpu, tokenizer, out / "smollm2-30")
    stream_slice(resolve_model(DEFAULT_MODEL), out / "smollm2-30-streamed", calib, dims, tokenizer=tokenizer,
                 device=device, progress=False)  # fmt: skip
    streamed, _ = load_sliced(out / "smollm2-30-streamed", device="cpu")
    reference = _logits(cpu, held_out)
    in_memory = (_logits(gpu, held_out) - reference).abs().max().item()
    stream = (_logits(streamed, held_out) - reference).abs().max().item()
    return {"ok": max(in_memory, stream) < 10 * TOL, "in_memory_diff": in_memory, "streamed_diff": stream}


def perplexity_check(device: str, out: Path) -> dict:
    """Perplexity of the sliced SmolLM2 on `device`: whole model and streamed, against the CPU."""
    from helpers.compression.checkpoints import load_model
    from helpers.evaluation.perplexity import perplexity_on_ids
    from helpers.evaluation.streamed import streamed_perplexity
    from helpers.infra.textdata import EVAL_TEXT, load_windows

    folder = out / "smollm2-30"
    model, tokenizer = load_model(str(folder), device="cpu")
    ids = load_windows(tokenizer, EVAL_TEXT, 512, 8)
    cpu = perplexity_on_ids(model.cpu(), ids, progress=False).perplexity
    gpu = perplexity_on_ids(model.to(device), ids, progress=False).perplexity
    streamed = streamed_perplexity(folder, ids, device=device, progress=False).perplexity
    worst = max(abs(gpu / cpu - 1), abs(streamed / cpu - 1))
    return {"ok": worst < TOL, "cpu": cpu, "device": gpu, "streamed": streamed}


def zeroshot_check(device: str, out: Path) -> dict:
    """ARC-Easy (100 questions) with the sliced SmolLM2 on `device`: the CPU's accuracy."""
    from helpers.compression.checkpoints import load_model
    from helpers.evaluation.zeroshot import evaluate

    model, tokenizer = load_model(str(out / "smollm2-30"), device="cpu")
    cpu = evaluate(model, tokenizer, ["arc_easy"], limit=100)["arc_easy"].summary
    gpu = evaluate(model.to(device), tokenizer, ["arc_easy"], limit=100)["arc_easy"].summary
    return {"ok": abs(cpu["acc_norm"] - gpu["acc_norm"]) <= 0.02, "cpu": cpu, "device": gpu}


def _run(command: list[str], log: Path, env_device: str) -> str:
    import os

    env = {**os.environ, "HELPERS_DEVICE": env_device}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} failed; see {log}")
    return done.stdout


def speed_table(device: str, out: Path) -> dict:
    """`python -m helpers speed --json` on `device`, dense and sliced."""
    rows = {}
    for label, model in (("dense", "smollm2-135m"), ("sliced 30%", str(out / "smollm2-30"))):
        command = [sys.executable, "-m", "helpers", "speed", "--model", model, "--json", "--batch-sizes", "1,16"]
        rows[label] = json.loads(_run(command, out / f"speed-{label.split()[0]}.log", device).strip().splitlines()[-1])
    return {"ok": True, "rows": rows}


def bench_stream(device: str, out: Path) -> dict:
    """The streamed-slicing benchmark (150m synthetic shape) with the layer on `device`."""
    script = Path(__file__).with_name("bench_stream.py")
    command = [sys.executable, str(script), "--shape", "150m", "--root", str(out / "bench_stream"), "--check"]
    command += ["--calib-windows", "4", "--calib-seqlen", "256"]
    text = _run(command, out / "bench_stream.log", device)
    table = [line for line in text.splitlines() if line.startswith("|") or "rotation at 0%" in line]
    return {"ok": "DIFFERENT" not in text, "table": table}


if __name__ == "__main__":
    sys.exit(main())
