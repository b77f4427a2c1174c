"""What a checkpointed layer keeps for backward, and where: `--save-attention` and `--offload-activations`.

With layer checkpointing (`--checkpoint-layers`) a layer keeps only its input; backward reruns the
layer's forward to rebuild what its own backward needs, ring attention included: every layer's ring
runs twice in forward (once in the forward, once in the recompute) and once in backward. Two modes
change that, alone or together:

- **save_attention**: torch's selective activation checkpointing with a policy that saves the outputs
  of `torch.ops.ringwise.attention` (out, lse and, on a Ulysses mesh, the head chunks its backward
  reads) and recomputes everything else. The recompute takes the saved outputs instead of calling
  the op, so each layer's ring runs once in forward and once in backward; the cost is out (one
  hidden-sized tensor per token, per layer) and lse (a float32 per head and token) kept on the
  device beside the checkpoint. The projections, norms, rotary and feed-forward are recomputed.
  The layer's recompute also runs under `in_layer_recompute()`, so a layer can leave out what that
  rerun computes for nothing: ringwise's own model rebuilds its blockwise feed-forward's chunk inputs
  (what the chunks' own checkpoints saved) but not the chunks, whose outputs only feed the residual
  add; each chunk then runs twice (forward, its own backward's recompute), not three times. Nothing
  more is kept.

- **offload** (`ActivationOffload`): saved-tensor hooks around each checkpointed layer, so what the
  checkpoint keeps for the outer graph (the layer's tensor arguments: its input) is copied to pinned
  host memory in forward, on a side stream, and the device copy is let go. In backward, the first
  unpack of a layer's checkpoint starts the copy back of the layer before it (the next one backward
  needs) on the side stream, so each layer's checkpoint returns one layer ahead, overlapping the
  recompute. On a CPU the same copies run (host to host): the hooks, the bookkeeping and the
  prefetch order are exercised and the bytes are counted, but no memory is saved. With
  save_attention too, the saved attention outputs stay on the device (torch keeps them in the
  checkpoint's own storage, which saved-tensor hooks do not see).

Exactness: both modes only change where tensors are kept or whether an op is rerun on the same
inputs; results are bit-identical with and without them (tested).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .attention import api  # noqa: F401  (registers torch.ops.ringwise.attention)


def _keep_attention(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if func is torch.ops.ringwise.attention.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def save_attention_contexts() -> tuple[Any, Any]:
    """checkpoint's `context_fn` for save_attention: a fresh (forward, recompute) pair of contexts per call."""
    return create_selective_checkpoint_contexts(_keep_attention)


def checkpoint_kwargs(save_attention: bool) -> dict[str, Any]:
    """torch.utils.checkpoint.checkpoint's keywords for a layer: non-reentrant, and selective with
    save_attention (transformers' gradient_checkpointing_kwargs take the same)."""
    kw: dict[str, Any] = {"use_reentrant": False}
    if save_attention:
        kw["context_fn"] = save_attention_contexts
    return kw


def checkpoint_layer(
    fn: Callable[..., Any], *args: Any, save_attention: bool = False, offload: Optional[ActivationOffload] = None
) -> Any:
    """fn(*args), checkpointed: its tensor arguments kept (offloaded with `offload`), the rest
    recomputed in backward (all but attention's outputs with save_attention; then fn's rerun runs
    under `in_layer_recompute()`)."""
    if save_attention:
        fn = _marking_reruns(fn)
    with offload.layer() if offload is not None else contextlib.nullcontext():
        return checkpoint(fn, *args, **checkpoint_kwargs(save_attention))


_recompute = threading.local()  # .depth: the layer recomputes running on this thread (backward's)


def in_layer_recompute() -> bool:
    """Whether this code runs in the recompute of a layer checkpointed by `checkpoint_layer(...,
    save_attention=True)`. That rerun exists only to rebuild the tensors the layer saved for backward;
    its output is thrown away. So an op whose output neither is saved nor feeds a saving op may be left
    out there, or anything of the same shape put in its place (ringwise.model's blockwise feed-forward:
    its chunks' inputs, the tensors the chunk checkpoints saved, are rebuilt; the chunks do not run).
    False in forward, in the backward of a nested checkpoint (a feed-forward chunk's own recompute,
    which runs after the layer's has ended) and elsewhere."""
    return getattr(_recompute, "depth", 0) > 0


def _marking_reruns(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, its first call (checkpoint's forward) as is and every later one (its recompute in backward)
    under in_layer_recompute()."""
    forward_done = False

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        nonlocal forward_done
        if not forward_done:
            forward_done = True
            return fn(*args)
        _recompute.depth = getattr(_recompute, "depth", 0) + 1
        try:  # torch's early stop ends a recompute by raising inside it
            return fn(*args)
        finally:
            _recompute.depth -= 1

    return run


# -- offload ----------------------------------------------------------------------------------------


class _Layer:
    """The checkpoints one layer's forward saved (weakly: autograd's graph owns them) and the layer
    checkpointed before it in the same forward, whose tensors backward needs next."""

    def __init__(self, previous: Optional[_Layer]):
        self.previous = previous
        self.saved: list[weakref.ref[_Offloaded]] = []
        self.prefetched = False


class _Offloaded:
    """One saved tensor, off the device: its host copy, and once fetched, its copy back on the device."""

    def __init__(self, owner: ActivationOffload, layer: _Layer, t: torch.Tensor):
        self.owner, self.layer, self.device = owner, layer, t.device
        self.fetched: Optional[torch.Tensor] = None
        self.ready: Optional[torch.cuda.Event] = None  # the copy back's completion, on the side stream
        if t.device.type == "cuda":
            stream = owner.stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is computed
            self.host = torch.empty_like(t, device="cpu", pin_memory=True)
            with torch.cuda.stream(stream):
                self.host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # its memory is not reused before the copy has read it
        else:
            self.host = t.detach().clone()

    def fetch(self) -> None:
        """Start the copy back to the device (on the side stream where there is one)."""
        if self.device.type == "cuda":
            stream = self.owner.stream(self.device)
            dev = torch.empty_like(self.host, device=self.device)  # allocated on the compute stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # after the offload's copy: the same stream
                dev.copy_(self.host, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
            dev.record_stream(stream)
            self.fetched = dev
        else:
            self.fetched = self.host.clone()

    def take(self) -> torch.Tensor:
        if self.fetched is None:
            self.fetch()
            self.owner.fetched_late += 1
        t, self.fetched = self.fetched, None
        assert t is not None
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None
        return t


class ActivationOffload:
    """Saved-tensor hooks that keep each checkpointed layer's saved tensors in (pinned) host memory.

    Use `layer()` around each checkpointed call, in forward order (`checkpoint_layer(...,
    offload=...)` does). What the hooks see there is exactly what non-reentrant checkpointing saves
    for the outer graph: the checkpointed function's tensor arguments (torch's checkpoint saves them
    before it installs its own hooks; everything saved inside the layer goes to the checkpoint's
    hooks, not these). Counts, for tests and reports: `packed` tensors and `bytes` copied off the
    device, `unpacked` tensors handed back, `prefetched` of those fetched one layer ahead and
    `fetched_late` fetched only when asked for (the first layer backward reaches, the last one).
    """

    def __init__(self) -> None:
        self.packed = self.bytes = self.unpacked = self.prefetched = self.fetched_late = 0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: Optional[_Layer] = None  # the layer checkpointed last in this forward
        self._backward_since = False  # a checkpoint was unpacked since the last layer() began

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    @contextlib.contextmanager
    def layer(self) -> Iterator[None]:
        """Offload what is saved inside this block: one layer's checkpoint."""
        if self._backward_since:  # a new forward: its first layer has no predecessor
            self._last, self._backward_since = None, False
        layer = self._last = _Layer(self._last)
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, layer), self._unpack):
            yield

    def reset_counts(self) -> None:
        self.packed = self.bytes = self.unpacked = self.prefetched = self.fetched_late = 0

    def _pack(self, layer: _Layer, t: torch.Tensor) -> _Offloaded | torch.Tensor:
        if t.numel() == 0:  # nothing to move (torch < 2.13's checkpoint saves an empty marker beside the inputs)
            return t
        return self._offload(layer, t)

    def _offload(self, layer: _Layer, t: torch.Tensor) -> _Offloaded:
        saved = _Offloaded(self, layer, t)
        layer.saved.append(weakref.ref(saved))
        self.packed += 1
        self.bytes += t.numel() * t.element_size()
        return saved

    def _unpack(self, saved: _Offloaded | torch.Tensor) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        self._backward_since = True
        t = saved.take()
        self.unpacked += 1
        before = saved.layer.previous
        if before is not None and not before.prefetched:  # backward reaches it next: bring it back now
            before.prefetched = True
            for ref in before.saved:
                other = ref()
                if other is not None and other.fetched is None:
                    other.fetch()
                    self.prefetched += 1
        return t

    def wrap(self, checkpoint_fn: Callable[..., Any]) -> Callable[..., Any]:
        """checkpoint_fn (a checkpoint function, as transformers calls one per layer) with each call
        offloaded as one layer."""

        @functools.wraps(checkpoint_fn)
        def offloaded(*args: Any, **kwargs: Any) -> Any:
            with self.layer():
                return checkpoint_fn(*args, **kwargs)

        return offloaded


# -- transformers models --------------------------------------------------------------------------


def checkpoint_hf_layers(hf: Any, save_attention: bool, offload: bool) -> Optional[ActivationOffload]:
    """Layer checkpointing of a transformers model (`ringwise finetune --checkpoint-layers`), with its
    modes: transformers' gradient checkpointing, non-reentrant, with save_attention's context_fn; with
    offload, each module's checkpoint function (transformers calls `_gradient_checkpointing_func` once
    per decoder layer) wrapped in one ActivationOffload, which is returned (its counts)."""
    kwargs = checkpoint_kwargs(save_attention)
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers 5.x's name (the old one warns)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not offload:
        return None
    hooks, wrapped = ActivationOffload(), 0
    for m in hf.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if fn is not None:
            m._gradient_checkpointing_func = hooks.wrap(fn)
            wrapped += 1
    if not wrapped:  # a transformers that names it otherwise: say so rather than offload nothing
        raise RuntimeError(
            f"--offload-activations: {type(hf).__name__} has no _gradient_checkpointing_func after "
            "gradient_checkpointing_enable; this transformers version checkpoints its layers some other way"
        )
    return hooks
