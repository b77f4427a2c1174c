"""What a run trains and how it is judged: a `Task`, picked once from the configuration (`task_for`),
as torchtitan's TrainSpec is.

The loop (loop.py) asks its task, never the configuration, for what differs between `ringwise
train`'s retrieval and text runs and `ringwise finetune`:

- `build_model(mesh)`: the model, FSDP2-sharded over the mesh and set on its ring, never whole in
  one process: ringwise's Transformer built on the meta device with each rank filling its shards,
  or a transformers checkpoint whose shards each rank reads (pretrained.py). Both models offer the
  same calls: `loss`, `predict`, `token_losses` (ringwise.model's docstring);
- `train_data`: the dataset the training batches are drawn from (made before the model);
- `prepare_folder(out)`: what the run folder needs before the first step (finetune: the model's
  config and tokenizer, for `export --hf`);
- `evaluate_before(run)`, `evaluate(run, before)`: the evaluation before the first step (finetune's
  baseline; None for the others) and after the last, as summary.json's fields;
- `checkpoint_meta(mesh, model)`: what a checkpoint's meta.json keeps of the model (`config`) and of
  the task (`task`: the retrieval task and its evaluation grid, which `ringwise generate --retrieval`
  answers; None for text and finetune runs);
- `name`, `summary(result)`: the model's name in the log, the evaluation in the final line.
"""

from __future__ import annotations

import contextlib
import json
import math
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import torch

from ..data import DEFAULT_DIGITS, PackedTextDataset, RetrievalDataset, retrieval_accuracy
from ..model import Block, Transformer, model_config
from .config import TrainConfig
from .mesh import Mesh, fill_shards, materialize, shard_model

if TYPE_CHECKING:
    from .pretrained import PretrainedLM


def eager_if(flag: bool):
    """Run compiled blocks eagerly inside (under --compile): the validated first step, whose verdict
    gather would be a second graph to compile for one call, and evaluation, whose lengths and no-grad
    mode would be more graphs for a few batches (attention, the cost at long context, is the same op)."""
    return torch.compiler.set_stance("force_eager") if flag else contextlib.nullcontext()


class Examples(Protocol):
    """A map-style dataset of known length (torch's Dataset declares no __len__): what the loop samples."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


class Task:
    """What every task shares; a subclass gives the data and the model (see the module docstring)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.model

    @cached_property
    def train_data(self) -> Examples:
        raise NotImplementedError

    def train_data_at(self, step: int) -> Examples:
        """The training windows of `step` (finetune's --seq-len schedule: its stage's; else train_data)."""
        return self.train_data

    def build_model(self, mesh: Mesh) -> Transformer | PretrainedLM:
        raise NotImplementedError

    def prepare_folder(self, out: Path) -> None:
        """Files the run folder needs before the first step (rank 0 writes them)."""

    def evaluate_before(self, run) -> dict | None:
        return None

    def evaluate(self, run, before: dict | None) -> dict:
        """summary.json's fields from the evaluation after the last step (none by default)."""
        return {}

    def checkpoint_meta(self, mesh: Mesh, model) -> dict:
        return dict(config=model.cfg.to_dict(), task=None)

    def summary(self, result: dict) -> str:
        """The evaluation in the run's final line ("; ..." clauses; empty without one)."""
        return ""


class _OwnModelTask(Task):
    """ringwise's own Transformer (a preset), trained from scratch."""

    def model_overrides(self) -> dict:
        return {}

    def build_model(self, mesh: Mesh) -> Transformer:
        """Built on the meta device, sharded, then each rank fills its shards (mesh.fill_shards)."""
        cfg = self.cfg
        self.train_data  # noqa: B018  (the data before the model, as ever: it may set the vocabulary)
        overrides = self.model_overrides()
        if cfg.ffn_tile:  # --ffn-tile N: the feed-forward's blockwise chunk (None: the preset's ffn_chunk)
            overrides["ffn_chunk"] = cfg.ffn_tile
        torch.manual_seed(cfg.seed)
        with torch.device("meta"):
            model = Transformer(
                model_config(
                    cfg.model,
                    checkpoint_layers=cfg.checkpoint_layers,
                    save_attention=cfg.save_attention,
                    offload_activations=cfg.offload_activations,
                    **overrides,
                )
            )
        if cfg.ffn_tile == 0:  # --ffn-tile 0: each feed-forward one untiled call (the loss keeps its chunks)
            for layer in model.layers:
                cast(Block, layer).ffn.chunk = None
        if cfg.compile:  # per block, as torchtitan does: FSDP's hooks stay outside the compiled graphs
            for layer in model.layers:
                layer.compile(fullgraph=True)
        shard_model(model, mesh, cfg.compute_dtype(mesh.device), offload=cfg.offload_params)
        materialize(model, mesh.device, cfg.offload_params)
        fill_shards(model, cfg.seed)
        model.set_ring(mesh.seqshard(cfg.layout))
        return model


class RetrievalTask(_OwnModelTask):
    """`ringwise train --data retrieval`: the synthetic line-retrieval task, judged by needle-in-a-haystack
    accuracy by (context length, needle depth)."""

    @cached_property
    def train_data(self) -> RetrievalDataset:
        cfg = self.cfg
        return RetrievalDataset(
            cfg.seq_len, seed=cfg.seed, questions=cfg.questions, loss_on=cfg.loss_on, **cfg.task_kwargs()
        )

    def evaluate(self, run, before: dict | None) -> dict:
        """Retrieval accuracy by (context length, needle depth) on the held-out grid."""
        cfg = self.cfg
        lengths = cfg.eval_lengths_for(run.mesh.cp)
        with eager_if(cfg.compile):
            acc = retrieval_accuracy(
                run.model,
                lengths,
                cfg.eval_depths,
                cfg.eval_per_cell,
                device=run.device,
                decoys=cfg.eval_decoys,
                **cfg.task_kwargs(),
            )
        return dict(retrieval=dict(lengths=lengths, depths=list(cfg.eval_depths), accuracy=acc))

    def checkpoint_meta(self, mesh: Mesh, model) -> dict:
        cfg = self.cfg  # the task: for `ringwise generate --retrieval`
        task = dict(
            cfg.task_kwargs(),
            decoys=cfg.eval_decoys,
            lengths=cfg.eval_lengths_for(mesh.cp),
            depths=list(cfg.eval_depths),
            per_cell=cfg.eval_per_cell,
        )
        return dict(config=model.cfg.to_dict(), task=task)

    def summary(self, result: dict) -> str:
        r = result["retrieval"]
        per_len = [sum(row[j] for row in r["accuracy"]) / len(r["accuracy"]) for j in range(len(r["lengths"]))]
        digits = self.cfg.value_digits or DEFAULT_DIGITS[self.cfg.fmt][1]
        line = "; retrieval accuracy " + ", ".join(f"{a:.0%} at {L} tokens" for a, L in zip(per_len, r["lengths"]))
        return line + f" (chance {1 / (9 * 10 ** (digits - 1)):.2g})"  # values have no leading zero


class TextTask(_OwnModelTask):
    """`ringwise train --data text`: plain text files packed into sequences (bytes as tokens); no
    evaluation beyond the training loss."""

    @cached_property
    def train_data(self) -> PackedTextDataset:
        return PackedTextDataset(self.cfg.text, self.cfg.seq_len)

    def model_overrides(self) -> dict:
        return {"vocab_size": self.train_data.tokenizer.vocab_size}


class FinetuneTask(Task):
    """`ringwise finetune`: a pretrained transformers checkpoint on --text documents in its own tokens,
    judged before the first step and after the last by held-out perplexity by position and passkey
    retrieval (perplexity.py, passkey.py)."""

    @property
    def name(self) -> str:
        assert self.cfg.pretrained is not None  # task_for picks this task only with --model
        return self.cfg.pretrained

    @cached_property
    def documents(self):
        """The training and held-out windows and the tokenizer: validation's own (pretrained.documents)."""
        from .pretrained import documents

        return documents(self.cfg)

    @property
    def train_data(self) -> Examples:
        return self.documents.train

    def train_data_at(self, step: int) -> Examples:
        return self.documents.train_at(self.cfg.stage_at(step)[1])

    @property
    def held_out(self) -> Examples:
        return self.documents.held_out

    @property
    def tokenizer(self):
        return self.documents.tokenizer

    def build_model(self, mesh: Mesh) -> PretrainedLM:
        from .pretrained import build_pretrained

        self.documents  # noqa: B018  (made before the model, as every task's data is)
        return build_pretrained(self.cfg, mesh)

    def prepare_folder(self, out: Path) -> None:
        """The run's model config (its RoPE changes) and tokenizer, for export --hf."""
        from .pretrained import save_config

        save_config(self.cfg, out / "hf")

    @property
    def image_text(self) -> bool:
        """Whether the run trains a vision-language model on image-text examples (its documents' processor)."""
        from ..data.documents import is_processor

        return is_processor(self.tokenizer)

    @torch.no_grad()
    def _held_out_loss(self, run) -> dict:
        """An image-text run's evaluation: the mean token loss over the first --eval-sequences held-out examples
        (default: up to 8), each through the ring with its images (every replica the same examples)."""
        from .config import EVAL_SEQUENCES

        held = self.held_out
        n = min(len(held), self.cfg.eval_sequences or EVAL_SEQUENCES)
        shard, device = run.seqshard, run.device
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for i in range(n):
            ex = held[i]
            L = ex["input_ids"].numel()
            images = {
                "input_ids": ex["input_ids"][None].to(device),
                **{k: v.to(device) for k, v in ex["images"].items()},
            }
            labels = shard.shard(ex["labels"][None]).to(device)
            with eager_if(self.cfg.compile):
                loss, count = cast("PretrainedLM", run.model).image_loss(
                    shard.shard(ex["input_ids"][None]).to(device), shard.positions(L, device=device), labels, images
                )
            sums += torch.stack([loss.double(), count.double()])
            del labels
        torch.distributed.all_reduce(sums)  # every ring rank's share, every replica alike: the ratio is the mean
        total, count = sums.tolist()
        return dict(loss=total / count if count else None, examples=n, tokens=int(count / run.mesh.dp))

    def _evaluation(self, run) -> dict:
        """Held-out perplexity by position and passkey retrieval by (depth, length), through the ring."""
        from .passkey import passkey_accuracy
        from .perplexity import perplexity_by_position

        cfg = self.cfg
        if self.image_text:
            return dict(held_out_loss=self._held_out_loss(run))
        lengths = cfg.eval_lengths_for(run.mesh.cp)
        acc = passkey_accuracy(run, self.tokenizer, lengths, cfg.eval_depths, cfg.eval_per_cell, cfg.seed)
        return dict(
            perplexity=perplexity_by_position(run, eager_if),
            passkey=dict(lengths=lengths, depths=list(cfg.eval_depths), accuracy=acc),
        )

    def evaluate_before(self, run) -> dict | None:
        """The pretrained model's evaluation before any step (eval_before.json; a resumed run reads the one
        its first start measured)."""
        path = Path(self.cfg.out) / "eval_before.json"
        if run.start > 0:
            return json.loads(path.read_text()) if path.exists() else None
        result = self._evaluation(run)
        if run.is_main:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(result, indent=2))
            tmp.replace(path)
        return result

    def evaluate(self, run, before: dict | None) -> dict:
        after, before = self._evaluation(run), before or {}
        if self.image_text:
            return dict(held_out_loss=dict(before=before.get("held_out_loss"), after=after["held_out_loss"]))
        return dict(
            perplexity=dict(before=before.get("perplexity"), after=after["perplexity"]),
            passkey=dict(after["passkey"], before=(before.get("passkey") or {}).get("accuracy")),
        )

    def checkpoint_meta(self, mesh: Mesh, model) -> dict:
        return dict(config=dict(transformers=str(Path(self.cfg.out) / "hf")), task=None)

    def summary(self, result: dict) -> str:
        if "held_out_loss" in result:
            h = result["held_out_loss"]
            loss = lambda r: "?" if not r or r["loss"] is None else f"{r['loss']:.4f}"  # noqa: E731
            return f"; held-out loss {loss(h['before'])} before, {loss(h['after'])} after"
        p = result["perplexity"]
        ppl = lambda r: "?" if not r or r["loss"] is None else f"{math.exp(r['loss']):.2f}"  # noqa: E731
        line = f"; held-out perplexity {ppl(p['before'])} before, {ppl(p['after'])} after"
        mean = lambda acc: "?" if not acc else f"{sum(map(sum, acc)) / sum(map(len, acc)):.0%}"  # noqa: E731
        return line + (
            f"; passkey retrieval {mean(result['passkey']['before'])} before, "
            f"{mean(result['passkey']['accuracy'])} after"
        )


def task_for(cfg: TrainConfig) -> Task:
    """The run's task: finetune with a pretrained checkpoint, else --data's (retrieval or text)."""
    if cfg.pretrained:
        return FinetuneTask(cfg)
    return TextTask(cfg) if cfg.data == "text" else RetrievalTask(cfg)
