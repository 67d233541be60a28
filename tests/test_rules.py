"""Allocation rules (budget, PCA energy), sensitivity scores (seeded), rank correlation and SB selection rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.compression import rules
from helpers.compression.allocation import ModelShape, sliced_param_count
from helpers.compression.slicing import SlicingInfo
from helpers.evaluation import sensitivity
from helpers.evaluation.allocation_rules import RULES, RuleInputs, rule_dims
from helpers.experiments.sb_selection import selection_summary, selection_trials


@pytest.fixture(scope="module")
def shape():
    return ModelShape.from_pretrained("smollm2-135m")


def _one_step_bound(shape: ModelShape, multiple: int = 8) -> int:
    """Closed-form bound on what moving one layer's kept dim by `multiple` changes: its readers and writers,
    and the shortcut entries of this layer and its neighbours (at most 4 d + multiple per direction)."""
    ly, d = shape.layer, shape.hidden_size
    per_direction = ly.attention_reads + ly.attention_writes + ly.mlp_reads + ly.mlp_writes + 4 * d + multiple
    return multiple * per_direction


def _synthetic_spectra(n_layers: int, d: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    out = {}
    for i in range(n_layers):
        for kind in ("attn", "mlp"):
            out[f"{kind}_{i}"] = np.sort(rng.pareto(1.0 + rng.uniform(0, 2), size=d))[::-1] + 1e-3
    return out


@pytest.mark.parametrize("sp", [0.3, 0.4])
def _known_inputs(shape: ModelShape, sp: float, scores: dict, spectra: dict) -> RuleInputs:
    """Rule inputs whose measurements are given (no model runs): scores per rule at `sp`, spectra, shape."""
    inputs = RuleInputs("smollm2-135m", "unused", 0, 0)
    inputs.known.update(shape=shape, spectra=spectra, lr=scores["lr"])
    inputs.known.update({("score", rule, sp): values for rule, values in scores.items()})
    return inputs


@pytest.mark.parametrize("sp", [0.3, 0.4])
def test_every_rule_hits_the_budget_within_one_rounding_step(shape, sp):
    rng = np.random.default_rng(0)
    n = shape.n_layers
    spectra = _synthetic_spectra(n, shape.hidden_size)
    inputs = _known_inputs(shape, sp, {rule: rng.normal(size=n) for rule in RULES if rule != "spectral"}, spectra)
    constant = np.full(n, int(np.floor((1 - sp) * shape.hidden_size / 8) * 8))  # SliceGPT's rounding, written out
    target = int(sliced_param_count(shape, constant)["total"])
    for rule in RULES:
        dims = rule_dims(rule, inputs, sp)
        assert dims.shape == (n,) and np.all(dims % 8 == 0), rule
        gap = abs(int(sliced_param_count(shape, dims)["total"]) - target)
        assert gap <= _one_step_bound(shape), f"{rule}: {gap} parameters from the budget"
    spare = rule_dims("spare_ends", inputs, sp)
    assert spare[0] == spare[-1] == shape.hidden_size and spare[1:-1].max() - spare[1:-1].min() <= 8
    assert np.array_equal(rule_dims("constant", inputs, sp), constant)
    with pytest.raises(ValueError, match="takes no SB"):
        rule_dims("spectral", inputs, sp, sb=0.1)
    with pytest.raises(ValueError, match="Unknown allocation rule 'nope'; use one of constant, lr"):
        rule_dims("nope", inputs, sp)


def test_spectral_keeps_the_most_pca_energy_on_the_real_model(smollm, book_windows, shape):
    from helpers.analysis.redundancy import layer_redundancy

    model, ids = smollm[0], book_windows  # 1,024 tokens: more than d = 576, so every spectrum has full rank
    spectra = sensitivity.full_spectra(model, ids)
    assert set(spectra) == {f"{k}_{i}" for i in range(shape.n_layers) for k in ("attn", "mlp")}
    lr = layer_redundancy(model, ids, progress=False)["lr"].to_numpy()
    rng = np.random.default_rng(0)
    sp = 0.3
    scored = {rule: lr if rule == "lr" else rng.normal(size=lr.size) for rule in RULES if RULES[rule].takes_sb}
    inputs = _known_inputs(shape, sp, scored, spectra)

    def energy(dims) -> float:  # independent of rules.kept_energy: the slicer's own kept-variance report
        info = SlicingInfo(dims=list(dims), tied=True, hidden_size=576, eigenvalues=spectra)
        return sum(info.kept_variance().values())

    allocations = {rule: rule_dims(rule, inputs, sp) for rule in RULES}
    kept = {rule: energy(dims) for rule, dims in allocations.items()}
    assert np.isclose(kept["spectral"], rules.kept_energy(spectra, allocations["spectral"]))
    for rule, value in kept.items():
        assert kept["spectral"] >= value - 1e-9, f"{rule} keeps more PCA energy ({value:.4f}) than spectral"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_sensitivity_scores_are_reproducible_with_a_fixed_seed():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (sensitivity.GRADIENT_WINDOWS + 4, 16), generator=torch.Generator().manual_seed(0))
    bases = sensitivity.input_bases(model, ids)
    first = sensitivity.gradient_sensitivity(model, ids, 16, bases, seed=3)
    again = sensitivity.gradient_sensitivity(model, ids, 16, bases, seed=3)
    other = sensitivity.gradient_sensitivity(model, ids, 16, bases, seed=4)
    assert np.array_equal(first, again) and not np.allclose(first, other)  # the seed picks the windows
    assert np.all(first > 0)
    assert all(p.requires_grad for p in model.parameters())  # restored after the pass
    measured = sensitivity.measured_sensitivity(model, ids, 16, bases, seed=3)
    assert np.array_equal(measured, sensitivity.measured_sensitivity(model, ids, 16, bases, seed=3))


def test_keeping_every_direction_is_no_perturbation():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    bases = sensitivity.input_bases(model, ids)
    assert np.allclose(sensitivity.gradient_sensitivity(model, ids, 32, bases), 0)
    assert np.allclose(sensitivity.measured_sensitivity(model, ids, 32, bases), 0, atol=1e-4)


def test_gradient_score_matches_the_first_order_change_it_estimates():
    """For one layer and a small perturbation, sum_t g_t . dx_t predicts the loss change of projecting x_i."""
    model = _tiny_llama()
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(2))
    bases = sensitivity.input_bases(model, ids)
    states = sensitivity._window_gradients(model, ids)
    layer, keep = 1, 31  # drop the single weakest direction: a small perturbation
    trailing = bases[layer][:, keep:].float()
    predicted = float((states[layer].grad * -(states[layer].detach() @ trailing @ trailing.T)).sum())
    with torch.no_grad():
        dense = model(input_ids=ids, labels=ids).loss.item()
        with sensitivity.projected_input(model, layer, bases[layer][:, :keep]):
            cut = model(input_ids=ids, labels=ids).loss.item()
    assert abs((cut - dense) - predicted) < 0.2 * abs(predicted) + 1e-6


def test_spearman_against_the_closed_form():
    a = np.array([1.0, 2, 3, 4, 5])
    assert rules.spearman(a, a**3) == pytest.approx(1.0)
    assert rules.spearman(a, -a) == pytest.approx(-1.0)
    swapped = np.array([2.0, 1, 4, 3, 5])  # sum of squared rank differences 4: 1 - 6 * 4 / (n (n^2 - 1))
    assert rules.spearman(a, swapped) == pytest.approx(1 - 6 * 4 / (5 * 24))


def _cell(sb: float, select: float, books: list[float], correct: list[int]) -> dict:
    nll = [np.log(p) * 10 for p in books for _ in range(2)]  # 2 windows of 10 tokens per book
    tasks = {"piqa": {"correct": correct}}
    return {"method": "dynamic", "sp": 0.3, "sb": sb, "ppl_select": select,
            "raw": {"eval_window_nll": nll, "eval_window_tokens": [10] * len(nll), "tasks": tasks}}  # fmt: skip


def test_sb_selection_rules_on_a_known_answer():
    """SB 0 is best on every held-out book and question; the selection book alone prefers SB 0.15."""
    cells = pd.DataFrame(
        [
            _cell(0.15, 30.0, [50.0, 60.0, 70.0], [0] * 20),
            _cell(0.0, 31.0, [40.0, 50.0, 60.0], [1] * 20),
        ]
    )
    trials = selection_trials(cells, ("piqa",), n_books=3, windows=2)
    summary = selection_summary(trials, {r: "-" for r in ("select_book", "question_half", "books_agree")})
    by_rule = summary.set_index("rule")
    assert by_rule.loc["select_book", "finds_best_ppl"] == 0 and by_rule.loc["select_book", "finds_best_acc"] == 0
    assert by_rule.loc["select_book", "mean_ppl_regret"] == pytest.approx(10.0)
    assert by_rule.loc["question_half", "finds_best_acc"] == 1 and by_rule.loc["books_agree", "finds_best_ppl"] == 1


def _rule_row(rule: str, dims: str, ppl: float, correct: list[int]) -> dict:
    windows = [np.log(ppl) * 10 + 0.01 * k for k in range(8)]  # 8 windows of 10 tokens, all at about `ppl`
    task = {"acc": float(np.mean(correct)), "acc_norm": float(np.mean(correct)), "n": len(correct), "correct": correct}
    return {"rule": rule, "sp": 0.3, "dims": dims, "params": 100, "energy": 1.0, "ppl_select": ppl, "ppl_eval": ppl,
            "eval_window_nll": windows, "eval_window_tokens": [10] * 8, "tasks": {"piqa": task}}  # fmt: skip


def test_rules_table_verdicts_come_from_the_paired_intervals():
    from helpers.experiments.cells import flatten
    from helpers.experiments.readings import read_rules_table
    from helpers.experiments.rules_report import readme_table, rules_table

    rows = [
        _rule_row("constant", "8 8", 20.0, [0, 1] * 10),
        _rule_row("lr", "16 0", 10.0, [0, 1] * 10),  # lower perplexity on every window
        _rule_row("spare_ends", "16 0", 10.0, [0, 1] * 10),  # allocates exactly like lr
        _rule_row("spectral", "0 16", 40.0, [0, 1] * 10),  # higher on every window
    ]
    table = rules_table(flatten(rows, ("piqa",)), ("piqa",)).set_index("rule")
    assert table.loc["lr", "ppl_verdict_vs_constant"] == "better"
    assert table.loc["lr", "ppl_diff_vs_constant"] == pytest.approx(-10.0, rel=1e-2)
    assert table.loc["spectral", "ppl_verdict_vs_constant"] == table.loc["spectral", "ppl_verdict_vs_lr"] == "worse"
    assert table.loc["spare_ends", "ppl_verdict_vs_lr"] == "same allocation"
    assert table.loc["lr", "acc_verdict_vs_constant"] == "not resolved"  # the same answers: a zero-width interval at 0
    text = read_rules_table(table.reset_index())
    assert "better for lr, spare_ends" in text and "LR's shape matters" not in text
    assert readme_table(table.reset_index(), "m").count("\n| ") == 5  # header rule line plus four rules


@pytest.mark.parametrize(
    "argv, message",
    [
        (["rules", "--sps", "1.5", "--out", "x"], "invalid fraction"),
        (["rules", "--size", "smoke"], "--out"),
    ],
)
def test_rules_command_rejects_bad_input_in_one_line(argv, message, capsys, tmp_path):
    from helpers.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_rules_command_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    from helpers.cli import main

    (tmp_path / "notes.txt").write_text("mine")
    assert main(["rules", "--size", "smoke", "--out", str(tmp_path)]) == 2
    assert "not an earlier reproduce output" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved with the default model's tokenizer, so that the CLI can read real text.

    Note: tied, because an untied 49k-row embedding makes one 8-dimension step of layer 0 cost 390k parameters,
    far more than the layers hold, and no SP can then match constant slicing's count."""
    from transformers import AutoTokenizer

    from helpers.models.loading import DEFAULT_MODEL, resolve_model, tiny_model

    folder = tmp_path_factory.mktemp("rules") / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    tiny_model("llama", vocab_size=len(tokenizer), tie_word_embeddings=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _sliced_dims(folder) -> list[int]:
    import json

    return json.loads((folder / "slicing.json").read_text())["dims"]


def test_every_registered_rule_runs_through_slice(tiny_folder, tmp_path, capsys):
    """`slice --rule NAME` for every rule in the registry: the saved model's realised parameter count (the ledger,
    counted from its tensors) is constant slicing's within one rounding step, and its dims are the rule's."""
    from helpers.cli import main
    from helpers.compression.checkpoints import load_model
    from helpers.compression.ledger import ledger_totals, parameter_ledger

    shape = ModelShape.from_pretrained(str(tiny_folder))
    constant = np.full(shape.n_layers, int(0.7 * shape.hidden_size) // 8 * 8)
    argv = ["slice", "--model", str(tiny_folder), "--sp", "0.3", "--calib-seqlen", "16", "--calib-windows", "8"]
    realised = {}
    for rule in RULES:
        out = tmp_path / rule
        assert main([*argv, "--rule", rule, "--out", str(out)]) == 0, capsys.readouterr().err
        assert f"rule {rule}; dims per layer: {_sliced_dims(out)}" in capsys.readouterr().out
        model, _ = load_model(str(out), device="cpu")
        realised[rule] = ledger_totals(parameter_ledger(model))["total"]
    target = int(sliced_param_count(shape, constant)["total"])
    assert realised["constant"] == target and _sliced_dims(tmp_path / "constant") == constant.tolist()
    for rule, count in realised.items():
        assert abs(count - target) <= _one_step_bound(shape), f"{rule}: {count} vs {target}"
    assert len({tuple(_sliced_dims(tmp_path / rule)) for rule in RULES}) > 2  # the rules really allocate apart
    assert main([*argv, "--rule", "spectral", "--sb", "0.1", "--out", str(tmp_path / "bad")]) == 2
    assert "takes no SB" in capsys.readouterr().err


def test_slice_sb_gives_the_gallerys_dynamic_row(tiny_folder, tmp_path):
    """`slice --sb 0` (LR, matched size) keeps the dims of the reproduce sweep's dynamic cell at the same SP and
    calibration; `--size nominal` is the paper's formula at SP itself, a different model here."""
    from helpers.cli import main
    from helpers.compression.allocation import allocate
    from helpers.experiments.cells import Lab
    from helpers.experiments.presets import SIZES
    from helpers.infra.textdata import CALIB_TEXT

    settings = dataclasses.replace(
        SIZES["smoke"], model=str(tiny_folder), seqlen=16, calib_windows=8, select_windows=2, eval_windows=1
    )
    lab = Lab(settings, progress=False)
    argv = ["slice", "--model", str(tiny_folder), "--sp", "0.3", "--sb", "0", "--calib", CALIB_TEXT]
    argv += ["--calib-seqlen", "16", "--calib-windows", "8"]
    assert main([*argv, "--out", str(tmp_path / "matched")]) == 0
    assert _sliced_dims(tmp_path / "matched") == lab.allocation(0.3, 0.0).kept_dim.tolist()
    assert main([*argv, "--size", "nominal", "--out", str(tmp_path / "nominal")]) == 0
    nominal = allocate(lab.lr["lr"].to_numpy(), 0.3, 0.0, 64).kept_dim.tolist()
    assert _sliced_dims(tmp_path / "nominal") == nominal != _sliced_dims(tmp_path / "matched")
