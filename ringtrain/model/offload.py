"""Offload of the checkpointed decoder layers' inputs to host memory (`train.offload_activations`).

Under activation checkpointing what stays on the device through a forward is each checkpointed layer's input: layers
x tokens x hidden. `LayerInputOffload` moves exactly those tensors to pinned host memory and nothing else. A
`save_on_cpu` around the whole forward also moved the fused loss's saved gradients (an fp32 [vocab, hidden] weight
gradient, ~2 GiB at a 128K vocabulary) through host memory every micro-batch.

How the inputs are recognised: non-reentrant checkpointing saves the layer's positional inputs through the saved-tensor
hooks active *outside* the checkpoint (inside it, its own hooks discard everything). Module hooks mark the tensor that
enters the next checkpointed layer (the embedding's or the previous layer's output, and the layer's own first argument
after FSDP's pre-forward), and the pack hook offloads only a tensor with that storage and shape; anything else saved
in the forward (the loss, the final norm, layers that are not checkpointed) stays where it is. This holds whether
transformers checkpoints a layer's `forward` (5.2x: module hooks outside the checkpoint) or its `__call__`.

On CUDA the copies run on a side stream: a layer's input goes to the host while the layer computes, and in backward
the input of the layer below is fetched while this one recomputes (one layer ahead), so transfers overlap compute.
On CPU the "host copy" is a plain copy (nothing is saved; the path is the same and is tested for equality).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ringtrain.model.causal_lm import decoder_layers


class _Offloaded:
    """One offloaded tensor: its host copy, and its device copy once fetched back."""

    __slots__ = ("batch", "device_copy", "host", "index", "ready")

    def __init__(self, host: torch.Tensor, batch: list, index: int):
        self.host, self.batch, self.index = host, batch, index
        self.device_copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same data: FSDP2's pre-forward may hand the layer an alias of the tensor the previous layer returned."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


class LayerInputOffload:
    """A context manager around a forward: the inputs of `lm`'s checkpointed decoder layers are saved in host memory.

    Enter it once per forward (the hooks are registered on enter and removed on exit); the backward may run after the
    exit. `last_offloaded` lists (shape, dtype) of what the latest forward offloaded, `offloaded_bytes` its total."""

    def __init__(self, lm: nn.Module, device: torch.device):
        self.embedding = lm.get_input_embeddings()
        self.layers = decoder_layers(lm)
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.last_offloaded: list[tuple[tuple[int, ...], torch.dtype]] = []
        self.offloaded_bytes = 0
        self._expect: torch.Tensor | None = None
        self._batch: list[_Offloaded | None] = []
        self._handles: list = []
        self._saved_hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    # -- which tensor is the next checkpointed layer's input -------------------------------------------------------
    def _checkpointed(self, i: int) -> bool:
        return i < len(self.layers) and bool(getattr(self.layers[i], "gradient_checkpointing", False))

    def _output_feeds(self, i: int):
        """Forward hook of the module before layer i: its output is layer i's input."""
        def hook(module, args, output):
            self._expect = _first_tensor(output) if self._checkpointed(i) and torch.is_grad_enabled() else None
        return hook

    def _input_of(self, i: int):
        """Forward pre-hook of layer i: its first argument (after FSDP's pre-forward) is what the checkpoint saves."""
        def hook(module, args, kwargs):
            if self._checkpointed(i) and torch.is_grad_enabled():
                self._expect = _first_tensor(args[0] if args else kwargs.get("hidden_states"))
        return hook

    # -- saved-tensor hooks ----------------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        if self._expect is None or not _same_tensor(t, self._expect):
            return t
        self._expect = None
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.stream is not None)  # [B, S_local, hidden]
        if self.stream is None:
            host.copy_(t)
        else:
            # The copy waits for the layer input to be computed, then runs beside the layer's own compute; the
            # allocator keeps the input's memory until the side stream is done with it.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
        handle = _Offloaded(host, self._batch, len(self._batch))
        self._batch.append(handle)
        self.last_offloaded.append((tuple(t.shape), t.dtype))
        self.offloaded_bytes += t.numel() * t.element_size()
        return handle

    def _fetch(self, h: _Offloaded) -> None:
        """Start copying `h` back to the device (on the side stream on CUDA)."""
        if h.device_copy is not None:
            return
        if self.stream is None:
            h.device_copy = h.host  # already host memory: a separate copy of the input since pack
            return
        with torch.cuda.stream(self.stream):
            h.device_copy = h.host.to(self.device, non_blocking=True)
            h.ready = torch.cuda.Event()
            h.ready.record(self.stream)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        self._fetch(packed)
        t = packed.device_copy
        if packed.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(packed.ready)
            t.record_stream(current)  # allocated on the side stream, used and freed on this one
        # Backward visits the layers in reverse: the one below is needed next, fetch it while this one recomputes.
        if packed.index > 0 and packed.batch[packed.index - 1] is not None:
            self._fetch(packed.batch[packed.index - 1])
        packed.batch[packed.index] = None
        packed.device_copy = packed.host = None  # the host copy goes back to the pinned pool
        return t

    # -- context manager -------------------------------------------------------------------------------------------
    def __enter__(self) -> LayerInputOffload:
        self.last_offloaded, self.offloaded_bytes, self._batch = [], 0, []
        self._handles = [self.embedding.register_forward_hook(self._output_feeds(0))]
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._input_of(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._output_feeds(i + 1)))
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._saved_hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._saved_hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles, self._expect = [], None
        live = [h for h in self._batch if h is not None]
        if live:
            self._fetch(live[-1])  # the last layer's input is the first backward needs: fetch it during the loss
