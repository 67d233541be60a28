"""The modules a sliced model is made of, and the weight surgery that fills them (docs/method.md section 3).

Family-free: an adapter (helpers/adapters) chooses which sliced layer a
family's blocks become (`PreNormSlicedLayer` for x + f(norm(x)) blocks,
`PostNormSlicedLayer` for x + norm(f(norm(x))) blocks) and hands over the
family's own attention and MLP modules. Conventions: x is a row vector,
`nn.Linear` computes x W^T, a basis is a d x k matrix with orthonormal columns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ROW_BLOCK = 4096  # rows of a weight turned into float64 at a time (vocabulary-sized tables stream through)


class WeightlessRMSNorm(nn.Module):
    """x / sqrt(sum(x^2) / dim + eps): an RMS norm with no scale, dividing by the ORIGINAL width.

    After slicing, x has fewer coordinates than `dim`, but its squared norm is
    (almost) that of the unsliced vector, so dividing by the original width
    keeps the scale the folded weights expect.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        scale = torch.rsqrt(x32.pow(2).sum(-1, keepdim=True) / self.dim + self.eps)
        return (x32 * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


def set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give `linear` a new weight (out x in) and optionally bias, keeping its dtype and device."""
    ref = linear.weight
    linear.weight = nn.Parameter(weight.to(ref.dtype).to(ref.device), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(ref.dtype).to(ref.device), requires_grad=False)


def rowwise(weight: torch.Tensor, func, rows: int = ROW_BLOCK) -> torch.Tensor:
    """`func` (a float64 map of row blocks) applied to `weight` block by block, the result in `weight`'s dtype.

    A whole V x d table in float64 would double or triple the peak memory of a
    streamed run (4 GB for Llama-3-8B's); one block at a time it is a few MB.
    """
    first = func(weight[:rows].double()).to(weight.dtype)
    out = first.new_empty(weight.shape[0], *first.shape[1:])  # filled in place: no list of blocks to concatenate
    out[:rows] = first
    for lo in range(rows, weight.shape[0], rows):
        out[lo : lo + rows] = func(weight[lo : lo + rows].double())
    return out


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """An `nn.Linear` holding `weight` (out x in) and `bias` as they are, without allocating a random one first."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def rotate_input(linear: nn.Linear, basis: torch.Tensor) -> None:
    """The linear layer now reads coordinates in `basis` (d x k): W -> W Q (float64, a block of rows at a time)."""
    basis = basis.to(linear.weight.device)
    set_linear(linear, rowwise(linear.weight, lambda rows: rows @ basis))


def rotate_output(linear: nn.Linear, basis: torch.Tensor) -> None:
    """The linear layer now writes coordinates in `basis` (d x k): W -> Q^T W, b -> b Q."""
    basis = basis.to(linear.weight.device)
    bias = None if linear.bias is None else linear.bias.double() @ basis
    set_linear(linear, basis.T @ linear.weight.double(), bias)


def _call_attention(attention: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = attention(hidden_states=x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class PreNormSlicedLayer(nn.Module):
    """A pre-norm block whose residual stream changes basis (and width) through two shortcuts.

    x (d_in) -> h = attn_shortcut(x) + attention(norm(x))         (d_in)
    h        -> y = mlp_shortcut(h) + mlp(norm(h))                 (d_out)
    The attention and MLP modules are the model's own (with re-shaped weights),
    so rotary embeddings, masks and the KV cache work unchanged. Their output
    projections write straight into the new basis.
    """

    def __init__(self, attention: nn.Module, mlp: nn.Module, d_in: int, d_out: int, hidden_size: int, eps: float):
        super().__init__()
        self.input_layernorm = WeightlessRMSNorm(hidden_size, eps)
        self.self_attn = attention
        self.attn_shortcut = nn.Linear(d_in, d_in, bias=False)
        self.post_attention_layernorm = WeightlessRMSNorm(hidden_size, eps)
        self.mlp = mlp
        self.mlp_shortcut = nn.Linear(d_in, d_out, bias=False)

    def attention_half(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        out = _call_attention(self.self_attn, self.input_layernorm(hidden_states), kwargs)
        return self.attn_shortcut(hidden_states) + out

    def mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp_shortcut(hidden_states) + self.mlp(self.post_attention_layernorm(hidden_states))

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.mlp_half(self.attention_half(hidden_states, **kwargs))

    def residual_writers(self, attention_output: nn.Linear, mlp_output: nn.Linear) -> tuple[nn.Linear, nn.Linear]:
        """The linear layers whose outputs land in the residual stream: here the branches' own projections."""
        return attention_output, mlp_output

    def output_maps(self) -> list[nn.Linear]:
        """The d x k maps after the output norms (none in a pre-norm block)."""
        return []


class PostNormSlicedLayer(PreNormSlicedLayer):
    """A block that also normalises each branch's output before the residual add (Gemma 2/3 style).

    x (d_in) -> h = attn_shortcut(x) + attn_map(norm(attention(norm(x))))   (d_in)
    h        -> y = mlp_shortcut(h) + mlp_map(norm(mlp(norm(h))))            (d_out)
    The branch outputs stay d-dimensional in the ORIGINAL basis, where an RMS
    norm over all d coordinates is exact; the norm's (1 + w) scale and the
    change into the sliced basis live in the d x k maps (docs/method.md, post-norm
    construction). Cost: the output projections keep width d, plus two d x k maps.
    """

    def __init__(self, attention: nn.Module, mlp: nn.Module, d_in: int, d_out: int, hidden_size: int, eps: float):
        super().__init__(attention, mlp, d_in, d_out, hidden_size, eps)
        self.attn_output_norm = WeightlessRMSNorm(hidden_size, eps)
        self.attn_map = nn.Linear(hidden_size, d_in, bias=False)
        self.mlp_output_norm = WeightlessRMSNorm(hidden_size, eps)
        self.mlp_map = nn.Linear(hidden_size, d_out, bias=False)

    def attention_half(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        out = _call_attention(self.self_attn, self.input_layernorm(hidden_states), kwargs)
        return self.attn_shortcut(hidden_states) + self.attn_map(self.attn_output_norm(out))

    def mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.post_attention_layernorm(hidden_states))
        return self.mlp_shortcut(hidden_states) + self.mlp_map(self.mlp_output_norm(out))

    def residual_writers(self, attention_output: nn.Linear, mlp_output: nn.Linear) -> tuple[nn.Linear, nn.Linear]:
        """The maps write the residual stream; the branch projections stay in the original basis."""
        return self.attn_map, self.mlp_map

    def output_maps(self) -> list[nn.Linear]:
        """The maps after the attention and MLP output norms: diag(scale) at full width, Q^T diag(scale) sliced."""
        return [self.attn_map, self.mlp_map]


class RotatedEmbedding(nn.Module):
    """Tied layout, input side: look up the shared V x d table, then project to the first basis (d -> d_0)."""

    def __init__(self, table: nn.Embedding, d_0: int) -> None:
        super().__init__()
        self.table = table
        self.proj = nn.Linear(table.embedding_dim, d_0, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(input_ids))


class TiedHead(nn.Module):
    """Tied layout, output side: the final norm's scale (a d-vector), then the shared table.

    The last basis is the identity, so mapping back to the table's coordinates
    is exactly diag(scale): a per-coordinate product, not a d x d matmul.
    """

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table  # the same module as RotatedEmbedding.table: one set of parameters
        self.scale = nn.Parameter(torch.ones(table.embedding_dim, dtype=table.weight.dtype), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden_states * self.scale, self.table.weight)


def _resize(linear: nn.Linear, n_in: int | None = None, n_out: int | None = None) -> None:
    """Give `linear` zero weights (and bias) of a new width; the saved weights fill them."""
    n_in, n_out = n_in or linear.in_features, n_out or linear.out_features
    set_linear(linear, torch.zeros(n_out, n_in), None if linear.bias is None else torch.zeros(n_out))


def build_sliced(model: nn.Module, spec: dict, make_layer: Callable | None = None) -> None:
    """Turn a freshly built dense model into an uninitialised sliced one with exactly the saved shapes.

    The one builder of the sliced structure: the lab's loader and the modeling file saved for plain
    transformers both call it. `spec` (helpers.models.shareable.layout_spec) names the modules by path
    and gives the widths; `make_layer(block, d_in, d_out)` makes a block's sliced layer (default: the
    spec's layer class over the block's `self_attn` and `mlp`, what the modeling file supports).
    """
    d, dims, eps = model.config.hidden_size, spec["dims"], spec["eps"]
    final_dim = spec.get("final_dim") or d
    if make_layer is None:
        layer_class = {c.__name__: c for c in (PreNormSlicedLayer, PostNormSlicedLayer)}[spec["layer_class"]]

        def make_layer(block: nn.Module, d_in: int, d_out: int) -> nn.Module:
            return layer_class(block.self_attn, block.mlp, d_in, d_out, d, eps)

    layers = model.get_submodule(spec["layers"])
    for i, block in enumerate(list(layers)):
        d_in, d_out = dims[i], dims[i + 1] if i + 1 < len(dims) else final_dim
        for name in spec["inputs"]:  # the linear layers reading the residual stream
            _resize(block.get_submodule(name), n_in=d_in)
        outputs = block.get_submodule(spec["attention_output"]), block.get_submodule(spec["mlp_output"])
        layers[i] = make_layer(block, d_in, d_out)
        attention_writer, mlp_writer = layers[i].residual_writers(*outputs)
        _resize(attention_writer, n_out=d_in)
        _resize(mlp_writer, n_out=d_out)
    for path in spec.get("positions", []):  # learned position tables add into the first basis
        positions = model.get_submodule(path)
        positions.weight = nn.Parameter(torch.zeros(positions.num_embeddings, dims[0]), requires_grad=False)
    model.set_submodule(spec["final_norm"], WeightlessRMSNorm(d, eps))
    table = model.get_submodule(spec["embedding"])
    if spec["tied"]:  # one V x d table, read by a d x d_0 input map and (at full final width) by the head
        model.set_submodule(spec["embedding"], RotatedEmbedding(table, dims[0]))
        model.set_submodule(spec["head"], TiedHead(table))
    else:
        model.set_submodule(spec["embedding"], nn.Embedding(table.num_embeddings, dims[0]))
    if not spec["tied"] or final_dim < d:  # a head of its own, reading the last residual's final_dim coordinates
        model.set_submodule(spec["head"], nn.Linear(final_dim, table.num_embeddings, bias=spec["head_bias"]))
    model.config.tie_word_embeddings = False
