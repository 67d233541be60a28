"""Forward hooks on decoder layers that live exactly as long as a `with` block.

Capture, the sensitivity scores and slicing all read (or replace) what a decoder
layer receives or returns; `forward_hooks` registers their callbacks and removes
every one on exit, error or not, and `layer_input` / `layer_output` say once
where the hidden state sits in a layer's call and result.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

PreHook = Callable[[int, tuple, dict], "tuple[tuple, dict] | None"]
PostHook = Callable[[int, tuple, dict, Any], Any]


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a decoder layer was called with, passed by position or as `hidden_states`."""
    return args[0] if args else kwargs["hidden_states"]


def with_layer_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same call with its hidden state replaced by `hidden` (what a pre-hook returns to change the input)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def layer_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden state a decoder layer returned (some families return a tuple with it first)."""
    return output[0] if isinstance(output, tuple) else output


def _pre(hook: PreHook, index: int, _module: nn.Module, args: tuple, kwargs: dict):
    return hook(index, args, kwargs)


def _post(hook: PostHook, index: int, _module: nn.Module, args: tuple, kwargs: dict, output: Any):
    return hook(index, args, kwargs, output)


@contextlib.contextmanager
def forward_hooks(
    layers: Sequence[nn.Module], pre: PreHook | None = None, post: PostHook | None = None
) -> Iterator[None]:
    """While active, layer i calls `pre(i, args, kwargs)` before its forward and `post(i, args, kwargs, output)` after.

    A pre-hook that returns `(args, kwargs)` replaces the call's, a post-hook that returns a value
    replaces the output (torch's convention); every hook is removed on exit, also after an error.
    """
    handles = []
    try:
        for index, layer in enumerate(layers):
            if pre is not None:
                handles.append(layer.register_forward_pre_hook(functools.partial(_pre, pre, index), with_kwargs=True))
            if post is not None:
                handles.append(layer.register_forward_hook(functools.partial(_post, post, index), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
