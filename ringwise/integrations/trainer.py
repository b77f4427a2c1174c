"""transformers' Trainer (and TRL's SFTTrainer) sequence-parallel through ringwise attention.

    import ringwise.integrations.transformers as rw
    from ringwise.integrations.trainer import ring_trainer

    rw.use_ring(group=ring_group, layout="zigzag")      # every rank of a ring shares one sequence
    model = rw.from_config(cfg)                          # or rw.from_pretrained(path): RingLoss installed
    trainer = ring_trainer(Trainer)(model=model, args=args, train_dataset=ds, data_collator=user_collator)
    trainer.train()

Two pieces, each doing one thing:

- `RingCollator(collator, model=)` wraps the user's collator: the whole (global) batch it returns becomes this
  rank's shard (rw.shard_batch): labels shifted on the global sequence, global position ids, right padding turned
  into ignored targets (left padding refused), padding-free batches (restarting `position_ids`, TRL's
  `cu_seq_lens_q`) turned into ringwise's documents, the length padded to what the layout splits. The shifted
  targets go to the model as `shift_labels` too, which transformers' Trainer counts as they are. Before it returns,
  the ranks of the ring compare their batches (one small all-reduce): a batch refused on one rank, or ranks that
  were handed different batches, raise the same error on every rank of the ring.
- `ring_trainer(Trainer)` (or `RingTrainerMixin` first in your class's bases) wraps the trainer's collator in a
  RingCollator and makes the data-parallel sampler shard over the replicas only (dp = world / ring size): every
  rank of a ring reads the same batches.

Why the gradients come out exact: the ring-aware loss (RingLoss) returns this rank's summed token losses over
`num_items_in_batch`, which Trainer (average_tokens_across_devices=True, its default) counts over every rank of
the job and, since each rank counts its own shard's targets, that is the whole global batch's target count;
Trainer then multiplies the loss by the number of processes and DDP (or FSDP2's reduce-scatter) averages the
gradients over them, so each parameter's gradient is the sum over every rank's tokens divided by the global count:
the gradient of the global token-mean loss (rings summed, data-parallel replicas together). The logged loss,
Trainer's mean over the ranks of those scaled shares, is the true loss. Requirements are checked when the trainer
is built.

`trainer.evaluate()` returns the token-mean loss over the whole evaluation set (RingTrainerMixin.evaluate);
`predict()` is refused. DPO: RingDPOMixin (each sequence's log-probability summed over the ring).

TRL's SFTTrainer computes its loss with its own fused LM head (outside the model's loss_function, so ringwise's
loss check would refuse it, and its token metrics would count one shard): the ring trainer computes the loss with
the model's own ring-aware loss instead, with the same normalisation (entropy and token accuracy are not logged).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..attention.seqshard import IGNORE_INDEX, SeqShard
from .transformers import shard_batch, shard_of

__all__ = ["RingCollator", "RingTrainerMixin", "RingDPOMixin", "ring_trainer", "global_batch"]

# What a collator may return beside input_ids / labels: read here, never passed on as they are.
_PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
_KNOWN_KEYS = {"input_ids", "labels", "attention_mask", "completion_mask", "position_ids", *_PACKING_KEYS}


class RingCollator:
    """Wraps a collator (default: transformers' default_data_collator) so that each rank gets its shard of the
    whole batch: `RingCollator(collator, model=model)` (the model's ring: rw.shard_of(model)), or `shard=`.

    The wrapped collator's batch (the same on every rank of a ring: ring_trainer's sampler sees to it) may hold
    `input_ids`, `labels` (unshifted, transformers' convention; default: input_ids), a right-padding
    `attention_mask` (pads become ignored targets and the mask is dropped: under a causal mask no real token sees
    a later pad), a `completion_mask` (0: no target there, TRL's prompts), and, for padding-free packing,
    `position_ids` restarting at 0 at each sequence and/or `cu_seq_lens_q` (one row: the sequences become
    ringwise's documents). Anything else is refused, alike on every rank of the ring, but the `passthrough` keys,
    returned as they are (per-sequence values, e.g. DPO's reference log-probabilities). Returns rw.shard_batch's dict
    plus `shift_labels` (the same tensor as `labels`).

    It calls a collective (the ring's verdict): run the data loader in the training processes
    (dataloader_num_workers=0), as ring_trainer checks.
    """

    def __init__(
        self,
        collator: Callable[[list], Any] | None = None,
        *,
        model=None,
        shard: SeqShard | None = None,
        pad_id: int = 0,
        passthrough: tuple[str, ...] = (),
    ):
        if collator is None:
            from transformers import default_data_collator

            collator = default_data_collator
        if model is not None and shard is not None:
            raise ValueError("RingCollator: give model= (its ring) or shard=, not both")
        self.collator, self.model, self._shard, self.pad_id = collator, model, shard, pad_id
        self.passthrough = tuple(passthrough)  # per-sequence values (DPO's reference log-probabilities): as they are

    @property
    def shard(self) -> SeqShard:
        """The ring the batches are cut for: shard=, else the model's, else use_ring's default."""
        if self._shard is not None:
            return self._shard
        from .hf_rings import shard_of_state

        return shard_of(self.model) if self.model is not None else shard_of_state()

    def __call__(self, features: list) -> dict:
        seq = self.shard
        batch = dict(self.collator(features))
        kept = {k: batch.pop(k) for k in self.passthrough if k in batch}
        try:
            input_ids, labels, cu_seqlens = global_batch(batch, seq.unit, self.pad_id)
            problem = None
        except ValueError as e:
            input_ids = labels = torch.zeros(1, 1, dtype=torch.long)
            cu_seqlens, problem = None, str(e)
        _ring_verdict(seq, problem, _digest(input_ids, labels, cu_seqlens))
        out = shard_batch(input_ids, labels, cu_seqlens, shard=seq)
        out["shift_labels"] = out["labels"]  # already shifted: Trainer counts them and RingLoss takes them as they are
        out.update(kept)
        return out


def global_batch(batch: dict, unit: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """A collator's whole batch -> (input_ids, unshifted labels, document boundaries or None), its length a multiple
    of `unit`; raises ValueError on what ringwise cannot run exactly. Pure: the same on every rank."""
    unknown = sorted(set(batch) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(
            f"the collator returned {unknown}, which the ring collator does not know how to shard; it takes "
            f"input_ids, labels, a right-padding attention_mask and padding-free position_ids / cu_seq_lens_q"
        )
    if "input_ids" not in batch:
        raise ValueError("the collator returned no input_ids")
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    labels = torch.as_tensor(batch["labels"]) if batch.get("labels") is not None else input_ids
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} is not input_ids' {tuple(input_ids.shape)}")
    labels = labels.clone()
    b, s = input_ids.shape
    mask = batch.get("attention_mask")
    if mask is not None:
        mask = torch.as_tensor(mask).bool()
        right = mask.int().cummin(dim=1).values.bool()  # ones, then zeros
        if mask.shape != input_ids.shape or not torch.equal(mask, right):
            raise ValueError(
                "the attention_mask is not right padding (left padding or holes): real tokens would attend to pads "
                "under ring attention, which takes no padding mask; pad on the right (padding_side='right') or pack"
            )
        labels[~mask] = IGNORE_INDEX
    completion = batch.get("completion_mask")
    if completion is not None:  # TRL's prompt / completion split: targets on the completion's tokens only
        completion = torch.as_tensor(completion)
        if completion.shape != input_ids.shape:
            raise ValueError(f"completion_mask shape {tuple(completion.shape)} is not input_ids' {(b, s)}")
        labels[completion == 0] = IGNORE_INDEX
    cu_seqlens = _documents(batch, input_ids)
    if cu_seqlens is not None and mask is not None and not bool(mask.all()):
        raise ValueError("a padding-free (packed) batch with a padding attention_mask: give one or the other")
    n_pad = (-s) % unit
    if n_pad:  # trailing pads: seen by no real token (causal), no targets; a document of their own when packed
        input_ids = torch.cat([input_ids, input_ids.new_full((b, n_pad), pad_id)], dim=1)
        labels = torch.cat([labels, labels.new_full((b, n_pad), IGNORE_INDEX)], dim=1)
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens + [s + n_pad]
    return input_ids, labels, cu_seqlens


def _documents(batch: dict, input_ids: torch.Tensor) -> list[int] | None:
    """The documents of a padding-free batch as global boundaries [0, ..., seq]; None for ordinary rows."""
    b, s = input_ids.shape
    bounds = None
    cu = batch.get("cu_seq_lens_q", batch.get("cu_seq_lens_k"))
    if cu is not None:
        bounds = [int(x) for x in torch.as_tensor(cu).flatten().tolist()]
        if b != 1 or bounds[0] != 0 or bounds[-1] != s or any(x >= y for x, y in zip(bounds, bounds[1:])):
            raise ValueError(
                f"cu_seq_lens_q {bounds} are not the increasing boundaries 0 .. {s} of one packed row (batch {b})"
            )
    pos = batch.get("position_ids")
    if pos is not None:
        pos = torch.as_tensor(pos)
        if pos.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {tuple(pos.shape)} is not input_ids' {tuple(input_ids.shape)}")
        ordinary = torch.arange(s, device=pos.device).expand(b, -1)
        if torch.equal(pos, ordinary):
            return bounds if bounds is not None and len(bounds) > 2 else None
        if b != 1:
            raise ValueError(
                "position_ids restart inside rows of a batch of several rows: ringwise's documents are boundaries "
                "shared by the rows; pack padding-free into one row (TRL: padding_free=True)"
            )
        starts = (pos[0] == 0).nonzero().flatten().tolist()
        from_pos = starts + [s] if starts and starts[0] == 0 else None
        if from_pos is None:
            raise ValueError("padding-free position_ids must start at 0")
        doc = torch.repeat_interleave(torch.tensor(from_pos).diff())
        want = torch.arange(s) - torch.tensor(from_pos[:-1])[doc]
        if not torch.equal(pos[0].cpu(), want):
            raise ValueError("padding-free position_ids must count 0, 1, 2, ... within each sequence")
        if bounds is not None and bounds != from_pos:
            raise ValueError(f"cu_seq_lens_q {bounds} disagree with the position_ids' sequences {from_pos}")
        bounds = from_pos
    return bounds if bounds is not None and len(bounds) > 2 else None


def _digest(input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens) -> int:
    """24 bits of a hash of the batch: ranks of a ring that were handed different batches differ here."""
    h = hashlib.blake2b(digest_size=8)
    for t in (input_ids, labels):
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(cu_seqlens).encode())
    return int.from_bytes(h.digest(), "little") % (1 << 24)


def _ring_verdict(seq: SeqShard, problem: str | None, digest: int) -> None:
    """One all-reduce over the ring: raise the same error on every rank if any rank's batch was refused, or if
    the ranks hold different batches (world * sum of squares == square of sum only when all digests are equal)."""
    if not (dist.is_available() and dist.is_initialized()) or seq.world == 1:
        if problem:
            raise ValueError(f"ringwise RingCollator: the batch is refused: {problem}")
        return
    flags = torch.tensor([float(problem is not None), float(digest), float(digest) ** 2], dtype=torch.float64)
    backend = dist.get_backend(seq.group)
    if backend == "nccl":
        flags = flags.cuda()
    seq.all_reduce(flags)
    refused, total, squares = flags.tolist()
    if refused:
        why = problem or "another rank's copy of the same batch was refused"
        raise ValueError(f"ringwise RingCollator: the batch is refused on {int(refused)} of {seq.world} ranks: {why}")
    if abs(seq.world * squares - total * total) > 0.5:
        raise ValueError(
            f"ringwise RingCollator: the {seq.world} ranks of the ring were handed different batches, so each would "
            "shard another sequence: every rank of a ring must read the same batches (use ring_trainer(Trainer) or "
            "RingTrainerMixin, whose sampler shards over the data-parallel replicas only)"
        )


# ---------------------------------------------------------------- the trainer


def _data_parallel(seq: SeqShard) -> tuple[int, int]:
    """(replicas, this rank's replica): the rings, each named by its smallest rank, in order over the whole job."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    world = dist.get_world_size()
    first = torch.tensor([dist.get_rank()], dtype=torch.int64)
    if dist.get_backend(seq.group) == "nccl":
        first = first.cuda()
    for g in _sequence_groups(seq):  # the smallest rank of the (ulysses x ring) mesh
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=g)
    firsts: list[Any] = [None] * world
    dist.all_gather_object(firsts, int(first.item()))
    rings = sorted(set(firsts))
    if len(rings) * seq.world != world:
        raise ValueError(
            f"ring_trainer: {world} ranks do not split into rings of {seq.world} (found {len(rings)} rings): every "
            "rank must belong to one ring (rw.use_ring(group=) or the model's shard=) of the same size"
        )
    return len(rings), rings.index(int(first.item()))


def _sequence_groups(seq: SeqShard) -> list:
    """The groups a sequence is cut over: the ring (None: the default group), then the Ulysses group if any."""
    return [seq.group] + ([seq.ulysses_group] if seq.ulysses_group is not None else [])


def _ring_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over a group, differentiable (torch.distributed.nn.functional.all_reduce: its backward sums the
    gradients too, since every rank's output feeds every rank's loss)."""
    import warnings

    import torch.distributed.nn.functional as dnn

    with warnings.catch_warnings():  # torch 2.13 points to its private functional collectives instead
        warnings.simplefilter("ignore", FutureWarning)
        return dnn.all_reduce(x, group=group)


class RingTrainerMixin:
    """Put first in a Trainer subclass's bases (ring_trainer(Trainer) does): the ranks of each ring read the same
    batches, the data-parallel replicas different ones; the loss and its gradients are then exact (module doc).

    The trainer's collator (given, or the one the trainer builds: TRL's padding-free one) is wrapped in a
    RingCollator for the model's ring unless it is one. Checked when built: a model configured for ringwise (its
    RingLoss), data loading in the training processes, average_tokens_across_devices=True and a model that takes
    num_items_in_batch."""

    # the Trainer attributes this mixin reads (for type checkers: the mixin has no Trainer base)
    args: Any
    model: Any
    accelerator: Any
    data_collator: Any
    model_accepts_loss_kwargs: bool
    _train_batch_size: int
    _passthrough: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        problems = []
        if not isinstance(self.data_collator, RingCollator):  # the trainer's collator (yours, or the one TRL built)
            self.data_collator = RingCollator(
                self.data_collator, model=self.accelerator.unwrap_model(self.model), passthrough=self._passthrough
            )
        collator = self.data_collator
        if self.args.dataloader_num_workers:
            problems.append("dataloader_num_workers must be 0: the ring collator runs a collective per batch")
        if not self.args.average_tokens_across_devices:
            problems.append(
                "average_tokens_across_devices=False: each rank would divide its shard's loss by its own count"
            )
        if getattr(self.args, "train_sampling_strategy", None) == "batch_rebalance":
            problems.append("train_sampling_strategy='batch_rebalance' deals batches to ranks itself, not to rings")
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.accelerator.num_processes != world:
            problems.append(
                f"the Trainer runs {self.accelerator.num_processes} process(es) where the process group has {world} "
                "ranks (it does not run distributed: launch with torchrun; on CPU pass use_cpu=True)"
            )
        if not self.model_accepts_loss_kwargs:
            problems.append("the model's forward does not take num_items_in_batch (loss kwargs)")
        from .transformers import RingLoss

        inner = self.accelerator.unwrap_model(self.model)
        base = getattr(inner, "get_base_model", lambda: inner)()  # a PEFT model: its base model's loss
        if not isinstance(getattr(base, "loss_function", None), RingLoss):
            problems.append("the model has no ring-aware loss: build it with rw.from_config / rw.from_pretrained")
        if problems:
            raise ValueError("ringwise ring_trainer: " + "; ".join(problems))
        self.ring_shard: SeqShard = collator.shard
        self.dp_size, self.dp_rank = _data_parallel(self.ring_shard)

    def _shard_over_replicas(self, loader):
        """The prepared loader's sampler deals batches to the dp replicas (a ring's ranks alike), not to ranks."""
        if self.accelerator.num_processes == 1:
            return loader
        from accelerate.data_loader import BatchSamplerShard

        sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(sampler, BatchSamplerShard) or getattr(loader, "dispatch_batches", False):
            raise ValueError(
                "ringwise ring_trainer: the data loader is not sharded by a batch sampler (an iterable dataset, or "
                "dispatch_batches): use a map-style dataset (a datasets.Dataset or any with __len__)"
            )
        sampler.num_processes, sampler.process_index = self.dp_size, self.dp_rank
        return loader

    def get_train_dataloader(self):
        return self._shard_over_replicas(super().get_train_dataloader())  # type: ignore[misc]

    def get_total_train_batch_size(self, args) -> int:
        return self._train_batch_size * args.gradient_accumulation_steps * self.dp_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from transformers import Trainer

        # Trainer's own: model(**inputs).loss (RingLoss over num_items_in_batch), scaled by the number of processes.
        # TRL's SFTTrainer's fused-head loss bypasses the model's loss_function: not under the ring.
        inputs = {**inputs, "use_cache": False}  # no KV cache to build in training (TRL passes the same)
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)  # type: ignore[arg-type]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """`{prefix}_loss`: the token-mean loss over the whole evaluation set (every target of every sequence once,
        over the rings and the replicas), not Trainer's mean of per-batch losses; no other metric (no
        compute_metrics). The replicas read different batches, none repeated (even_batches off); each rank sums its
        shard's token losses (the model's ring-aware loss over num_items_in_batch=1) and one all-reduce at the end
        sums them and the target counts over the job."""
        if isinstance(eval_dataset if eval_dataset is not None else getattr(self, "eval_dataset", None), dict):
            raise NotImplementedError("ringwise ring_trainer: evaluate one dataset at a time (eval_dataset=)")
        loader = self._shard_over_replicas(self.get_eval_dataloader(eval_dataset))  # type: ignore[attr-defined]
        sampler = getattr(loader, "batch_sampler", None)
        if sampler is not None and hasattr(sampler, "even_batches"):
            sampler.even_batches = False  # accelerate would repeat samples to even the replicas' batch counts
        model, training = self.model, self.model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        one = torch.tensor(1.0, device=self.args.device)
        try:
            with torch.no_grad():
                for batch in loader:
                    batch = self._prepare_inputs(batch)  # type: ignore[attr-defined]
                    sums[0] += model(**batch, num_items_in_batch=one).loss.double()  # this shard's summed loss
                    sums[1] += (batch["shift_labels"] != IGNORE_INDEX).sum()
        finally:
            model.train(training)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        metrics = {f"{metric_key_prefix}_loss": (sums[0] / sums[1].clamp_min(1)).item()}
        self.log(metrics)  # type: ignore[attr-defined]
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)  # type: ignore
        return metrics

    def predict(self, *args, **kwargs):
        raise NotImplementedError("ringwise ring_trainer: prediction is not sequence-parallel yet")


def ring_trainer(trainer_class: type) -> type:
    """`ring_trainer(Trainer)`, `ring_trainer(SFTTrainer)`, `ring_trainer(DPOTrainer)`: the class with
    RingTrainerMixin (RingDPOMixin for TRL's DPOTrainer and its subclasses) first in its bases."""
    dpo = any(c.__name__ == "DPOTrainer" and c.__module__.startswith("trl.") for c in trainer_class.__mro__)
    mixin = RingDPOMixin if dpo else RingTrainerMixin
    return type(f"Ring{trainer_class.__name__}", (mixin, trainer_class), {})


# ---------------------------------------------------------------- DPO

_DPO_LOSSES = ("sigmoid", "hinge")


class RingDPOMixin(RingTrainerMixin):
    """TRL's DPOTrainer on a ring (ring_trainer(DPOTrainer) uses it). A sequence's log-probability is a sum over its
    completion's tokens, which lie on every rank of the ring: each rank sums its own tokens' log-probabilities and a
    differentiable all-reduce (forward and backward: sums) sums them over the ring, so every rank of
    a ring holds the whole sequences' log-probabilities and computes the same DPO loss L.

    No loss scaling: the all-reduce's backward sums the ring's incoming gradients (R x dL/dlogp on each rank), so
    the ring's summed parameter gradient is R x dL/dtheta, and DDP's mean over all W = dp x R ranks leaves the mean
    over the data-parallel replicas of dL/dtheta, one process's gradient of the global batch's loss (the mean over
    its pairs). The logged loss, Trainer's mean over the ranks of identical per-ring losses, is that loss.

    Supported: loss_type sigmoid and hinge (with loss_weights), reverse KL, a reference model given as `ref_model`
    (a ringwise model on the same ring, e.g. rw.from_config / from_pretrained again). Refused when built: other
    loss types (several read per-token values: the shard's only), precompute_ref_log_probs, ld_alpha, use_weighting,
    f-divergences, MoE auxiliary losses, no ref_model. Logged: the loss and TRL's rewards/* and logps/* metrics."""

    _passthrough = ("ref_chosen_logps", "ref_rejected_logps")
    loss_types: list
    loss_weights: list
    beta: float
    ref_model: Any
    _metrics: Any

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        problems = []
        unsupported = sorted(set(self.loss_types) - set(_DPO_LOSSES))
        if unsupported:
            problems.append(f"loss_type {unsupported} (the ring runs {list(_DPO_LOSSES)})")
        for name, ok in (
            ("precompute_ref_log_probs", not getattr(self, "precompute_ref_logps", False)),
            ("ld_alpha", getattr(self, "ld_alpha", None) is None),
            ("use_weighting", not getattr(self, "use_weighting", False)),
            (
                "f_divergence_type other than reverse_kl",
                getattr(self, "f_divergence_type", "reverse_kl") == "reverse_kl",
            ),
            ("a router auxiliary loss (MoE)", not getattr(self, "aux_loss_enabled", False)),
        ):
            if not ok:
                problems.append(name)
        if self.ref_model is None:
            problems.append("no ref_model: pass the reference model (a ringwise model on the same ring)")
        elif shard_of(self.accelerator.unwrap_model(self.ref_model)) != self.ring_shard:
            problems.append("the ref_model runs on another ring than the model")
        if problems:
            raise ValueError("ringwise ring_trainer(DPOTrainer) does not run: " + "; ".join(problems))

    def evaluate(self, *args, **kwargs):
        raise NotImplementedError("ringwise ring_trainer(DPOTrainer): evaluation is not sequence-parallel yet")

    def _sequence_logps(self, model, inputs, grad: bool) -> torch.Tensor:
        """Each sequence's summed target log-probability over the whole ring: (sequences,), float32."""
        import torch.nn.functional as F

        kwargs = {k: inputs[k] for k in ("input_ids", "position_ids", "ringwise_cu_seqlens") if k in inputs}
        labels = inputs["labels"]
        logits = model(**kwargs, use_cache=False).logits
        token = F.cross_entropy(
            logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),  # float32 or wider
            labels.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        local = -token.view(labels.shape).sum(dim=1)
        seq = self.ring_shard
        if not (dist.is_available() and dist.is_initialized()) or seq.world == 1:
            return local
        if not grad:
            return seq.all_reduce(local)
        for g in _sequence_groups(seq):
            local = _ring_sum(local, g)
        return local

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch.nn.functional as F

        if return_outputs:
            raise NotImplementedError("ringwise ring_trainer(DPOTrainer): return_outputs is not supported")
        mode = "train" if self.model.training else "eval"
        logps = self._sequence_logps(model, inputs, grad=True)
        with torch.no_grad():
            ref = self._sequence_logps(self.ref_model, inputs, grad=False)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        delta = chosen_ratio - rejected_ratio
        loss = torch.zeros((), device=logps.device)
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                per_sequence = -F.logsigmoid(self.beta * delta)
            else:  # hinge
                per_sequence = torch.relu(1 - self.beta * delta)
            loss = loss + per_sequence.mean() * weight
        chosen_rewards, rejected_rewards = self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()
        gather = self.accelerator.gather  # every rank of a ring holds the same values: the mean over ranks is fair
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())
        return loss
