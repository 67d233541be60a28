"""Recovery fine-tuning: merged LoRA equals the adapters, training helps, folders reload, data stays held out."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import run_without_helpers
from transformers import AutoTokenizer

from helpers.cli import main
from helpers.compression.checkpoints import load_model, save_pruned
from helpers.compression.depth import parameter_count, remove_layers
from helpers.compression.recovery import (
    HELD_OUT_TEXTS,
    RecoverySettings,
    add_adapters,
    recover,
    recover_folder,
    recovery_data,
    shared_spans,
)
from helpers.compression.replacement import replacement_info, streamline
from helpers.compression.sliced_io import save_sliced
from helpers.compression.slicing import rotate_and_slice
from helpers.infra.textdata import CALIB_TEXT, EVAL_TEXT, load_windows, token_windows
from helpers.models.loading import DEFAULT_MODEL, resolve_model, tiny_model
from helpers.models.pruned_layers import build_replacement

TOL = 1e-5
VOCAB = 49152  # the default tokenizer's, so that tiny folders train on real text


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer alone (no weights are read)."""
    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    tok.prepend_bos = False  # SmolLM2's family choice (helpers.models.adapters)
    return tok


def _ids(n: int = 8, seqlen: int = 32, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _sliced(seed: int = 1, **config) -> torch.nn.Module:
    model = tiny_model("llama", seed=seed, **config)
    rotate_and_slice(model, _ids(vocab=model.config.vocab_size), [48, 40, 56, 32], progress=False)
    return model


def _pruned(**config) -> torch.nn.Module:
    model = tiny_model("llama", seed=2, num_hidden_layers=5, **config)
    block = build_replacement("swiglu", 64, 32)
    for param in block.parameters():
        param.data.add_(0.05 * torch.randn_like(param))  # a trained-looking replacement, not the identity
    return streamline(model, 1, 2, block)


def _hybrid(**config) -> torch.nn.Module:
    model = tiny_model("llama", seed=3, num_hidden_layers=5, **config)
    remove_layers(model, [2])
    rotate_and_slice(model, _ids(vocab=model.config.vocab_size), [48, 40, 56, 32], progress=False)
    return model


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("build", [_sliced, _pruned], ids=["sliced", "pruned"])
def test_merged_adapters_give_the_adapters_logits_and_keep_the_parameter_count(build):
    model = build()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    params, ids = parameter_count(model), _ids()
    base = _logits(model, ids)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    settings = RecoverySettings(rank=4, alpha=8.0, dropout=0.0, shortcuts=build is _sliced, seqlen=32)
    peft_model = add_adapters(model, settings)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; give the adapters something to merge
            torch.nn.init.normal_(param, std=0.05)
    adapted = _logits(peft_model, ids)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (8.0 / 4)
    merged = peft_model.merge_and_unload()
    assert (adapted - base).abs().max() > 1e-2  # the adapters change the outputs
    assert (_logits(merged, ids) - adapted).abs().max() < TOL
    # the merged weight is W + (alpha / r) B A, computed here from the adapter matrices
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, q_before + delta, atol=1e-6)
    assert parameter_count(merged) == params
    assert {k: v.shape for k, v in merged.state_dict().items()} == shapes


def test_recovery_lowers_validation_loss_and_restores_the_best_adapters():
    """On a learnable token pattern the validation loss (computed here) drops at seed 0; the best state is kept."""
    model = _sliced()
    pattern = torch.arange(32) * 5 % 128  # every window is the same cyclic sequence at a random phase
    shifts = torch.randint(0, 32, (40,), generator=torch.Generator().manual_seed(1))
    windows = torch.stack([pattern.roll(int(s)) for s in shifts])
    train, val = windows[:32], windows[32:]

    def loss(m: torch.nn.Module) -> float:
        logits = _logits(m, val)[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), val[:, 1:].reshape(-1)))

    before = loss(model)
    settings = RecoverySettings(rank=4, lr=1e-2, tokens=40 * 4 * 32, seqlen=32, eval_every=5, patience=3, seed=0)
    recovered, report = recover(model, None, settings, train, val, progress=False)
    assert loss(recovered) < before - 0.5
    assert report.val_loss_before == pytest.approx(before, rel=1e-4)
    assert report.val_loss_after == pytest.approx(loss(recovered), rel=1e-4)
    assert report.best_step > 0 and report.tokens == report.steps * 4 * 32

    # validated on the sequence run backwards, training soon hurts: the best adapters, not the last, are kept
    backwards = windows.flip(1)[32:]
    settings = RecoverySettings(
        rank=4, lr=1e-2, tokens=40 * 4 * 32, seqlen=32, eval_every=2, patience=2, seed=0, autocast="float32"
    )
    restored, report = recover(_sliced(), None, settings, train, backwards, progress=False)
    val = report.history["val_loss"]
    assert report.stopped_early and report.best_step < report.steps and min(val) < val[-1] - 0.01
    logits = _logits(restored, backwards)[:, :-1]
    kept = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), backwards[:, 1:].reshape(-1))
    assert float(kept) == pytest.approx(min(val), rel=1e-4)


PLAIN = """
import sys
import torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, folder + ".logits")
assert not [name for name in sys.modules if name == "helpers" or name.startswith("helpers.")]
"""


def test_recovered_folders_reload_with_the_lab_and_plain_transformers(tmp_path, tokenizer):
    tiny = dict(vocab_size=VOCAB, tie_word_embeddings=True)
    sources = {
        "sliced": save_sliced(_sliced(**tiny), tokenizer, tmp_path / "sliced"),
        "hybrid": save_sliced(_hybrid(**tiny), tokenizer, tmp_path / "hybrid"),
    }
    pruned = _pruned(**tiny)
    info = {"removed": [1, 2], "replacement": replacement_info(pruned.model.layers[1], "swiglu", 1)}
    sources["pruned"] = save_pruned(pruned, tokenizer, tmp_path / "pruned", info)
    settings = RecoverySettings(  # the held-out check has its own test
        rank=4, lr=1e-3, tokens=3 * 2 * 32, batch_size=2, seqlen=32, val_windows=2, held_out=()
    )
    ids = load_windows(tokenizer, CALIB_TEXT, 32, 2)
    torch.save(ids, tmp_path / "ids.pt")
    outs = []
    for kind, source in sources.items():
        out = tmp_path / f"{kind}-recovered"
        report = recover_folder(source, out, settings, progress=False)
        outs.append(str(out))
        before, _ = load_model(str(source), device="cpu")
        after, _ = load_model(str(out), device="cpu")
        assert parameter_count(after) == parameter_count(before)
        assert (_logits(after, ids) - _logits(before, ids)).abs().max() > 1e-4  # training changed the weights
        meta = json.loads((out / ("pruning.json" if kind == "pruned" else "slicing.json")).read_text())
        assert meta["recovery"]["tokens"] == report.tokens == report.steps * 2 * 32 > 0
        assert meta["recovery"]["source"] == str(source)
    run_without_helpers(PLAIN, [str(tmp_path / "ids.pt"), *outs], tmp_path)
    for out in outs:
        lab, _ = load_model(out, device="cpu")
        assert (torch.load(out + ".logits") - _logits(lab, ids)).abs().max() < TOL, out


def test_recovery_windows_share_no_token_run_with_any_evaluation_window(tokenizer):
    train, val = recovery_data(tokenizer, RecoverySettings())
    data = torch.cat([train, val])
    assert set(HELD_OUT_TEXTS) >= {EVAL_TEXT} and CALIB_TEXT not in HELD_OUT_TEXTS
    for text in HELD_OUT_TEXTS:
        for seqlen in (256, 512):  # the reproduce windows and `ppl`'s default windows
            assert shared_spans(data, load_windows(tokenizer, text, seqlen)) == 0, (text, seqlen)
    # the check finds overlap: the same text cut at another phase, and a training text that is an evaluation book
    same_text = token_windows(tokenizer, tokenizer.decode(data[:40].flatten()), 300)
    assert shared_spans(data, same_text[:, 7:]) > 1000
    with pytest.raises(ValueError, match=r"shares \d+ runs of 32 tokens with the evaluation text 'great-expectations'"):
        recovery_data(tokenizer, RecoverySettings(text=EVAL_TEXT, held_out=(EVAL_TEXT,)))


def test_distillation_moves_the_compressed_model_towards_the_dense_teacher():
    """Loss 'distill' lowers KL(teacher || model) on held-out windows, computed here from both models' logits,
    and refuses to run without a teacher."""
    teacher = tiny_model("llama", seed=1).eval()
    teacher.lm_head.weight.data.mul_(8)  # confident predictions, so that a thin student is far from them
    student = copy.deepcopy(teacher)
    rotate_and_slice(student, _ids(), [16, 16, 16, 16], progress=False)  # a quarter of the width
    train = val = _ids(n=8)  # random tokens do not generalise: fit the teacher on the windows it is judged on

    def kl(m: torch.nn.Module) -> float:
        t = F.log_softmax(_logits(teacher, val)[:, :-1], -1).flatten(0, 1)
        s = F.log_softmax(_logits(m, val)[:, :-1], -1).flatten(0, 1)
        return float(F.kl_div(s, t, log_target=True, reduction="batchmean"))

    before = kl(student)
    settings = RecoverySettings(
        rank=4, lr=1e-4, tokens=20 * 4 * 32, seqlen=32, eval_every=4, loss="distill", autocast="float32"
    )
    with pytest.raises(ValueError, match="teacher"):
        recover(_sliced(), None, settings, train, val, progress=False)
    recovered, report = recover(student, None, settings, train, val, progress=False, teacher=teacher)
    assert report.val_loss_before == pytest.approx(before, rel=1e-3)  # validation measures the same KL
    assert report.best_step > 0 and kl(recovered) < 0.8 * before


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("recover")
    save_sliced(_sliced(vocab_size=VOCAB), tokenizer, root / "sliced")
    dense = tiny_model("llama", vocab_size=VOCAB)
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    save_pruned(_pruned(vocab_size=VOCAB), tokenizer, root / "pruned", {"removed": [1, 2], "replacement": None})
    return root


BAD = [
    (["--model", "{r}/sliced", "--steps", "0"], "--steps"),
    (["--model", "{r}/sliced", "--rank", "33"], "--rank 33 exceeds the width of model.layers.0.self_attn.k_proj"),
    (["--model", "{r}/dense"], "is a dense model"),
    (["--model", DEFAULT_MODEL], "is a dense model"),
    (["--model", "{r}/missing"], "no such folder"),
    (["--model", "{r}/pruned", "--shortcuts"], "No linear layer named 'attn_shortcut'"),
    (["--model", "{r}/sliced", "--targets", "q_proj,wq"], "No linear layer named 'wq'"),
    (["--model", "{r}/sliced", "--tokens", "100"], "does not fill one step"),
    (["--model", "{r}/sliced", "--text", EVAL_TEXT], "shares"),
    (["--model", "{r}/sliced", "--loss", "distill"], "--loss distill needs --teacher"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_recover_input_is_one_line_before_any_model_loads(folders, argv, message, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("helpers.compression.recovery.load_model", no_loading)
    code = main(["recover", *(a.format(r=folders) for a in argv), "--out", str(folders / "new")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    assert not (folders / "new").exists()
