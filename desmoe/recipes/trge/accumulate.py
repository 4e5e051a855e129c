"""Gradient accumulation for TRGE (``train.grad_accum``): a step of ``accum`` micro-batches of ``b`` samples
trains as one batch of ``accum * b`` samples.

The loss is a per-sample cross-entropy mean, so DeepSpeed's division of each micro-batch's loss by
``accum`` already sums to the big batch's gradient.  What is not per sample are the random draws of
the training forward, taken from the global generators (whose state the checkpoints carry):

* the image tower's gate noise (``GroupRouter``/``PoolRouter``) is one draw of [samples, ...] per
  site: :class:`StepDraws` draws it at micro-batch 0 at the step's full size, in the order the big
  batch draws it, and hands each micro-batch its rows;
* the text tower embeds the same class prompts in every micro-batch: its draws (gate noise, BERT
  dropout) are replayed, so every micro-batch sees the text features the big batch computed once,
  and the generators end the step where the big batch leaves them.

Random draws inside the image tower other than the gate noise (dropout) cannot be cut into rows
that way: :func:`check_image_tower` refuses ``grad_accum > 1`` for such a tower.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

from desmoe.config import bad


def _rng_states(device: torch.device) -> list:
    """The generators a forward on ``device`` draws from: the CPU one, and the device's own."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng_states(device: torch.device, states: list) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


class StepDraws:
    """The random draws of one accumulated step's forwards (see the module doc); ``start(micro)`` before
    each micro-batch's forward."""

    def __init__(self, accum: int, device: torch.device) -> None:
        self.accum, self.device, self.micro = accum, torch.device(device), 0
        self.noise: dict[nn.Module, Tensor] = {}
        self.text_before: Optional[list] = None
        self.text_after: Optional[list] = None

    def start(self, micro: int) -> None:
        self.micro = micro
        if micro == 0:
            self.noise, self.text_before, self.text_after = {}, None, None

    def image_noise(self, owner: nn.Module, like: Tensor) -> Tensor:
        """This micro-batch's rows of the standard-normal noise ``owner`` draws for the whole step."""
        rows = like.shape[0]
        # the whole step's draw, where the big batch's forward makes it; under train.activation_checkpointing
        # micro-batch 0's recompute (before micro-batch 1's forward) draws it again from the RNG state torch
        # restored, so the entry is replaced by the same numbers and the layer's later draws stay in step
        if self.micro == 0:
            self.noise[owner] = torch.randn((rows * self.accum, *like.shape[1:]), dtype=like.dtype,
                                            device=like.device)
        full = self.noise.get(owner)
        if full is None or full.shape != (rows * self.accum, *like.shape[1:]):  # unequal micro-batches
            raise RuntimeError(f"micro-batch {self.micro}: gate noise of shape {tuple(like.shape)} does not "
                               f"fit the step's draw {None if full is None else tuple(full.shape)}")
        return full[self.micro * rows:(self.micro + 1) * rows]

    @contextmanager
    def text(self):
        """Around the text tower's forward: micro-batch 0 draws, every later one replays those draws."""
        if self.micro == 0:
            self.text_before = _rng_states(self.device)
            yield
            self.text_after = _rng_states(self.device)
            return
        _set_rng_states(self.device, self.text_before)
        try:
            yield
        finally:
            _set_rng_states(self.device, self.text_after)


def random_image_layers(model) -> list[str]:
    """Layers of the training image tower that draw random numbers per sample besides the gate noise
    (dropout with p > 0), by name; a CNN tower stays in eval mode (``DualEncoder.train``)."""
    if model.cnn:
        return []
    tower = model.base.vision_model
    found = [name or "vision_model" for name, m in tower.named_modules()
             if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    vision = getattr(getattr(model.base, "config", None), "vision_config", None)
    for key in ("attention_dropout", "dropout", "hidden_dropout"):  # HF CLIP: functional dropout
        if getattr(vision, key, 0) or 0:
            found.append(f"vision_config.{key}={getattr(vision, key)}")
    return found


def check_image_tower(model, accum: int) -> None:
    """``train.grad_accum > 1`` only where the micro-batches can draw what one batch draws (module doc)."""
    found = random_image_layers(model) if accum > 1 else []
    if found:
        raise bad("train.grad_accum", f"1 with this backbone: its image tower draws dropout per sample "
                                      f"({', '.join(found[:3])}), which micro-batches cannot reproduce", accum)
