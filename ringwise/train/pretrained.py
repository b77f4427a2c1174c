"""A pretrained transformers causal LM as the training loop's model (`ringwise finetune`).

Built so that no rank ever holds the whole model: the parameters are made on the meta device
(accelerate's init_empty_weights; buffers such as RoPE's inverse frequencies stay real), FSDP2
shards them over the mesh, and each rank reads only its shards of the checkpoint's safetensors
(torch.distributed.checkpoint's HuggingFaceStorageReader, which reads the slices a DTensor needs).
Attention is the ring, through ringwise's transformers integration, with the run's own SeqShard.

`PretrainedLM` gives the loop the calls of ringwise's own model (ringwise.model.Transformer):
set_ring(shard), then loss(input_ids, positions, labels, cu_seqlens=None) -> (sum of the local token
losses, local labelled tokens), predict(...) -> (greedy tokens at the labelled positions, their mask)
and token_losses(...) -> every local token's loss. Losses are computed in float32 chunks of
LOSS_CHUNK tokens through the vocabulary projection, each recomputed in backward when there are
several (never more than one chunk's (tokens, vocab) logits alive at once).

Memory: each decoder layer's feed-forward (MLP or MoE block) runs over tiles of --ffn-tile local tokens
in training, each recomputed in backward (the integration's tile_feed_forward; default: the model's
hidden size in tokens; 0: untiled), so no (local tokens x intermediate) tensor exists whole.

LoRA (--lora R): peft's LoRA layers are injected into the transformers model on the meta device
(`inject_adapter_in_model`, which freezes every other weight) before FSDP2 shards it; the base weights load
from the checkpoint as before (a target's `<module>.base_layer.weight` is the stored `<module>.weight`) and
the adapters start from `init_adapters` (A drawn whole from the seed, B zero: the same at every world size).
The loop's optimizer takes the trainable parameters only. `export_hf` merges them, or writes them alone.

Vision-language models (`is_vlm`; the families in FINETUNE_VLMS): built with AutoModelForImageTextToText, the
language model on the ring and the vision tower on sdpa (rw._auto_class); their examples come from the checkpoint's
processor (`load_processor`; data/documents.py's image_document and ImageTextExamples), and `image_loss` passes each
example's global tokens and images through rw.shard_multimodal_batch on every rank (the tower outside the ring).
Checkpoint names that transformers renames on load (`model.layers...` saved, `model.language_model.layers...`
built) are read by their stored names (`_stored_names`).

Context extension: `extended_config` writes --rope-theta / --rope-scaling / --rope-factor into the
config (static scalings only: the integration refuses those that depend on the local length)
and raises max_position_embeddings to cover the trained length.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention.seqshard import IGNORE_INDEX, SeqShard
from ..data.documents import LEGACY_CACHE_DIR, ImageTextExamples, PackedDocuments, split, tokenize_documents
from ..data.text import text_files
from ..model import blockwise
from .mesh import materialize, shard_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ROPE_SCALINGS = ("linear", "yarn", "llama3")
# vision-language families `ringwise finetune` trains on image-text JSONL: tested (tests/test_finetune_vlm.py).
# The others rw.shard_multimodal_batch runs are refused here until a finetune test covers them.
FINETUNE_VLMS = {"gemma3": "Gemma 3"}
LOSS_CHUNK = 1024  # tokens per vocabulary projection in the loss


def weight_files(path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def checkpoint_problems(path) -> list[str]:
    """What keeps `path` from being a transformers checkpoint this job can read (empty: none)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return [
            f"--model {path}: no config.json there (give a transformers checkpoint folder; "
            "scripts/fetch_smollm2.py makes one)"
        ]
    if not weight_files(p):
        return [f"--model {path}: no .safetensors weights there (save the model with save_pretrained)"]
    return []


def is_vlm(config) -> bool:
    """Whether the config is a vision-language model's (one with a vision tower: a vision_config)."""
    return getattr(config, "vision_config", None) is not None


def vlm_problems(config) -> list[str]:
    """What keeps `ringwise finetune` from training this vision-language model (empty: none)."""
    family = getattr(config, "model_type", "?")
    if family in FINETUNE_VLMS:
        return []
    from ..integrations.hf_multimodal import is_supported_vlm

    supported = is_supported_vlm(config)
    return [
        f"the vision-language model {family!r} is "
        + (
            "run exactly by rw.shard_multimodal_batch but not yet tested with ringwise finetune"
            if supported
            else "not one ringwise runs"
        )
        + f" (finetune trains: {', '.join(FINETUNE_VLMS.values())})"
    ]


def load_processor(path):
    """A vision-language checkpoint's processor (AutoProcessor: chat template, image processor), or a ValueError
    saying why there is none."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  (missing files, a missing backend: the reason is transformers')
        raise ValueError(
            f"--model {path} is a vision-language model and its processor cannot be loaded "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); save the "
            "processor (processor.save_pretrained) into the folder"
        ) from None
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(
            f"--model {path} is a vision-language model but its folder holds no image processor "
            "(save the model's processor, processor.save_pretrained, into the folder)"
        )
    return processor


def auto_model_class(config):
    """The Auto class of the checkpoint's model: a vision-language model's, else a causal LM's."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vlm(config) else AutoModelForCausalLM


def rope_parameters(config) -> dict:
    """The config's RoPE parameters as one dict (transformers 5: rope_parameters; 4.x: rope_theta/rope_scaling)."""
    if isinstance(getattr(config, "rope_parameters", None), dict):
        return dict(config.rope_parameters)
    params = dict(getattr(config, "rope_scaling", None) or {"rope_type": "default"})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _set_rope_parameters(config, params: dict) -> None:
    if isinstance(getattr(config, "rope_parameters", None), dict):
        config.rope_parameters = params
    else:
        config.rope_theta = params.pop("rope_theta")
        config.rope_scaling = None if params.get("rope_type") == "default" else params


def extended_config(path, seq_len: int, rope_theta=None, rope_scaling=None, rope_factor=None):
    """The checkpoint's config with the run's RoPE changes; max_position_embeddings covers seq_len."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    params = rope_parameters(text)
    original = text.max_position_embeddings
    if rope_theta is not None:
        params["rope_theta"] = float(rope_theta)
    if rope_scaling is not None:
        params.update(rope_type=rope_scaling, factor=float(rope_factor))
        if rope_scaling in ("yarn", "llama3"):
            params.setdefault("original_max_position_embeddings", original)
        if rope_scaling == "llama3":
            params.setdefault("low_freq_factor", 1.0)
            params.setdefault("high_freq_factor", 4.0)
    _set_rope_parameters(text, params)
    grown = int(original * (rope_factor or 1.0)) if rope_scaling is not None else original
    text.max_position_embeddings = max(grown, seq_len)
    return config


class PretrainedLM(nn.Module):
    """The training loop's model interface around a transformers causal LM (see the module docstring)."""

    def __init__(self, hf: PreTrainedModel):
        super().__init__()
        self.hf = hf

    @property
    def ring(self) -> SeqShard:
        """The ring the model's attention runs on (the integration's, for this model)."""
        import ringwise.integrations.transformers as rw

        return rw.shard_of(self.hf)

    def set_ring(self, shard: SeqShard) -> None:
        """The ring every call runs on (the integration's `configure`). The integration validates
        every call: its first attention layer checks the call's arguments across the ring's ranks."""
        import ringwise.integrations.transformers as rw

        rw.configure(self.hf, shard)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers, FSDP2's per-layer units (mesh.shard_model); not registered twice."""
        base: Any = self.hf.base_model  # a vision-language model's decoder layers are its language model's
        return cast(nn.ModuleList, base.layers if hasattr(base, "layers") else base.language_model.layers)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _chunk_loss(self, h, labels):
        logits = self.hf.get_output_embeddings()(h).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    def _token_losses(self, h, labels):
        logits = self.hf.get_output_embeddings()(h).float()
        return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")

    def _token_argmax(self, h, labels):
        return self.hf.get_output_embeddings()(h).argmax(-1)

    def _hidden(self, input_ids, positions, cu_seqlens, images=None):
        """The decoder's final hidden states of the local tokens, on the model's ring. images: a
        vision-language example's global input_ids and processor inputs (pixel values, token types), the same
        on every rank: through rw.shard_multimodal_batch (the vision tower on every rank, outside the ring)."""
        if images is not None:
            import ringwise.integrations.transformers as rw

            images = dict(images)
            batch = rw.shard_multimodal_batch(self.hf, images.pop("input_ids"), **images)
            if not torch.equal(batch["input_ids"], input_ids):
                raise RuntimeError("the image-text example's local tokens differ from the loop's shard")
            batch.pop("labels", None)
            return self.hf.base_model(**batch, use_cache=False).last_hidden_state
        extra = {} if cu_seqlens is None else {"ringwise_cu_seqlens": list(cu_seqlens)}
        out = self.hf.base_model(
            input_ids=input_ids, position_ids=positions[None].expand(input_ids.shape[0], -1), use_cache=False, **extra
        )
        return out.last_hidden_state

    def forward(self, input_ids, positions, labels, cu_seqlens=None, images=None):
        """(local loss sum, local labelled tokens): `loss`."""
        h = self._hidden(input_ids, positions, cu_seqlens, images)
        if h.shape[1] <= LOSS_CHUNK:  # one chunk: its logits are the one chunk the bound allows, kept, not recomputed
            loss = self._chunk_loss(h, labels)
        else:
            loss = torch.stack(blockwise(self._chunk_loss, h, LOSS_CHUNK, labels)).sum()
        return loss, (labels != IGNORE_INDEX).sum()

    def loss(self, input_ids, positions, labels, cu_seqlens=None):
        """(sum of the local token losses, local labelled tokens), on the ring."""
        return self(input_ids, positions, labels, cu_seqlens)

    def image_loss(self, input_ids, positions, labels, images):
        """`loss` of a vision-language example: its global tokens and the processor's inputs in `images` (`_hidden`)."""
        return self(input_ids, positions, labels, None, images)

    @torch.no_grad()
    def predict(self, input_ids, positions, labels, cu_seqlens=None):
        """(greedy next tokens at the labelled positions, batch-major; the (batch, local) mask of those
        positions), on the ring."""
        h = self._hidden(input_ids, positions, cu_seqlens)
        mask = labels != IGNORE_INDEX
        return torch.cat(blockwise(self._token_argmax, h, LOSS_CHUNK, labels), 1)[mask], mask

    def token_losses(self, input_ids, positions, labels, cu_seqlens=None):
        """Every local token's next-token loss, (batch, local) float32, 0 where unlabelled, on the ring."""
        h = self._hidden(input_ids, positions, cu_seqlens)
        return torch.cat(blockwise(self._token_losses, h, LOSS_CHUNK, labels), 1)


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """from_config / from_pretrained's dtype keyword: `dtype` from transformers 4.56, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def build_pretrained(cfg, mesh) -> PretrainedLM:
    """The sharded model with the checkpoint's weights, each rank reading its shards only."""
    from accelerate import init_empty_weights

    import ringwise.integrations.transformers as rw

    config = extended_config(cfg.pretrained, cfg.seq_len, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor)
    rw.register()
    rw.check_model(config)
    auto, attn = rw._auto_class(config)  # a vision-language model: its tower on sdpa, outside the ring
    with init_empty_weights(include_buffers=False):
        hf = auto.from_config(config, attn_implementation=attn, **dtype_kwarg(torch.float32))
    hf.tie_weights()  # from_config leaves a tied output matrix untied until weights load: tie it before sharding
    rw.check_model(hf)
    if cfg.lora is not None:  # --lora R: peft's LoRA layers in place (the base weights frozen), before tiling
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora_config(cfg.lora, cfg.lora_alpha, cfg.lora_targets), hf)
    rw.tile_feed_forward(hf, cfg.ffn_tile)  # --ffn-tile: None = the model's hidden size in tokens, 0 = untiled
    model = PretrainedLM(hf)
    model.set_ring(mesh.seqshard(cfg.layout))
    if cfg.checkpoint_layers:  # transformers' own, non-reentrant; its modes: ringwise.checkpointing
        from ..checkpointing import checkpoint_hf_layers

        checkpoint_hf_layers(hf, cfg.save_attention, cfg.offload_activations)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    shard_model(model, mesh, cfg.compute_dtype(mesh.device), per_layer=True, offload=cfg.offload_params)
    materialize(model, mesh.device, cfg.offload_params)  # --offload-params: the shards in host memory
    with torch.no_grad():
        for name, b in model.named_buffers():  # to_empty left them uninitialised
            b.copy_(buffers[name].to(b.device))
    load_weights(hf, cfg.pretrained)
    if cfg.lora is not None:
        init_adapters(model, cfg.seed)
    return model


def lora_config(r: int, alpha: int | None, targets):
    """peft's LoraConfig of --lora R --lora-alpha A --lora-targets ...: no dropout (the step stays
    deterministic, the same at every world size), no bias trained."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=r if alpha is None else alpha, target_modules=list(targets), lora_dropout=0.0, bias="none"
    )


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict name is a LoRA adapter's (peft's lora_A / lora_B)."""
    return ".lora_A." in name or ".lora_B." in name


def init_adapters(model: nn.Module, seed: int) -> None:
    """LoRA's initial values into the sharded adapters (after `materialize`): each A drawn as peft draws it
    (kaiming-uniform, a = sqrt(5)) whole, from one generator seeded with `seed` in parameter order, each B
    zero (the adapted model starts as the base); each rank keeps its shard. The same values at every world
    size."""
    import math

    from torch.distributed.tensor import DTensor, distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not is_adapter(name):
                continue
            shard = cast(DTensor, p)
            whole = torch.zeros(p.shape, dtype=torch.float32)
            if ".lora_A." in name:
                nn.init.kaiming_uniform_(whole, a=math.sqrt(5), generator=gen)
            whole = whole.to(shard.device_mesh.device_type).to(p.dtype)
            local = distribute_tensor(whole, shard.device_mesh, shard.placements, src_data_rank=None).to_local()
            shard.to_local().copy_(local)


def stored_keys(path) -> set[str]:
    """The tensor names the checkpoint's safetensors hold (from their headers)."""
    from safetensors import safe_open

    keys = set()
    for f in weight_files(path):
        with safe_open(str(f), "pt") as st:
            keys.update(st.keys())
    return keys


def load_weights(hf: nn.Module, path) -> None:
    """Each rank fills its parameter shards from the checkpoint's safetensors (a tied output matrix is
    its embedding's, which is read once)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    # with --lora: the adapters are not in the checkpoint (init_adapters), and a target's base weight is
    # peft's `<module>.base_layer.weight`, stored as `<module>.weight`
    state = {k.replace(".base_layer.", "."): v for k, v in hf.state_dict().items() if not is_adapter(k)}
    stored = stored_keys(path)
    renamed = _stored_names(hf, stored)  # a model whose checkpoint names differ (transformers' renamings)
    state = {renamed.get(k, k): v for k, v in state.items()}
    model_name = {v: k for k, v in renamed.items()}
    tied = {k for k in state if k not in stored and _is_tied(hf, model_name.get(k, k))}
    split = _split_tensors(hf, sorted(k for k in state if k not in stored and k not in tied), stored)
    missing = sorted(k for k in state if k not in stored and k not in tied and k not in split)
    if missing:
        raise ValueError(
            f"--model {path}: the checkpoint lacks {len(missing)} of the model's tensors "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})"
        )
    wanted = {k: v for k, v in state.items() if k not in tied and k not in split}
    dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(path)), planner=DefaultLoadPlanner())
    for name, (sources, stack_dim, cat_dim) in split.items():
        _load_joined(state[name], path, sources, stack_dim, cat_dim)


def _split_tensors(hf: nn.Module, names: list[str], stored: set[str]) -> dict[str, tuple[list[list[str]], int, int]]:
    """{a model tensor's name: the stored tensors it is joined from}, for the model tensors that transformers' own
    conversion mapping joins on load (MoE experts fused in the model, stored one per expert since transformers 5:
    MergeModulelist stacks each source's list, Concatenate joins the sources): (each source's stored names sorted
    by expert index, the stacking dim, the joining dim). A tensor any of whose sources is absent is left out
    (reported missing)."""
    import re

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
    except ImportError:
        return {}
    converters = [
        c
        for c in get_model_conversion_mapping(cast(Any, hf))
        if isinstance(c, WeightConverter)
        and len(c.target_patterns) == 1
        and all(isinstance(op, (MergeModulelist, Concatenate)) for op in c.operations)
    ]
    out: dict[str, tuple[list[list[str]], int, int]] = {}
    for name in names:
        for c in converters:
            target = c.target_patterns[0]
            if not name.endswith(target) or not any(isinstance(op, MergeModulelist) for op in c.operations):
                continue
            prefix, sources = name[: -len(target)], []
            for pattern in c.source_patterns:
                expert = re.compile(re.escape(prefix + pattern).replace(r"\*", r"(\d+)") + "$")
                found = sorted((int(m.group(1)), k) for k in stored if (m := expert.match(k)))
                sources.append([k for _, k in found])
            if all(sources):
                dims = {type(op): int(op.dim) for op in c.operations}  # type: ignore[attr-defined]
                out[name] = (sources, dims[MergeModulelist], dims.get(Concatenate, 0))
                break
    return out


def _load_joined(param: torch.Tensor, path, sources: list[list[str]], stack_dim: int, cat_dim: int) -> None:
    """Fill `param` (a plain tensor or a DTensor: this rank's shard) with its stored pieces joined as transformers
    joins them: each source's experts stacked along stack_dim, the sources concatenated along cat_dim. Every rank
    reads the whole joined tensor (one layer's experts) and keeps its shard."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    where = {}
    for f in weight_files(path):
        with safe_open(str(f), "pt") as st:
            where.update(dict.fromkeys(st.keys(), f))

    def read(key: str) -> torch.Tensor:
        with safe_open(str(where[key]), "pt") as st:
            return st.get_tensor(key)

    stacked = [torch.stack([read(k) for k in keys], dim=stack_dim) for keys in sources]
    whole = torch.cat(stacked, dim=cat_dim)
    if tuple(whole.shape) != tuple(param.shape):
        raise ValueError(
            f"--model {path}: the stored pieces of a {tuple(param.shape)} tensor join to {tuple(whole.shape)} "
            f"({sources[0][0]}, ...)"
        )
    with torch.no_grad():
        if isinstance(param, DTensor):
            local = distribute_tensor(
                whole.to(param.device_mesh.device_type).to(param.dtype),
                param.device_mesh,
                param.placements,
                src_data_rank=None,
            ).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(whole.to(param.device, param.dtype))


def _stored_names(hf, stored: set[str]) -> dict[str, str]:
    """{the model's tensor name: its name in the checkpoint} where transformers renames on load (a
    vision-language model saved as `model.layers...`, loaded as `model.language_model.layers...`): each stored
    name through the model's own renamings (transformers' conversion mapping; none there: no renaming)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        return {}
    renamings = [r for r in get_model_conversion_mapping(hf) if isinstance(r, WeightRenaming)]
    if not renamings:
        return {}
    out = {}
    for key in stored:
        name = rename_source_key(key, renamings, [])[0]
        if name != key:
            out[name] = key
    return out


def _is_tied(hf, key) -> bool:
    """Whether `key` is the output projection that the config ties to the input embedding."""
    config = hf.config.get_text_config(decoder=True) if hasattr(hf.config, "get_text_config") else hf.config
    out = hf.get_output_embeddings()
    names = {f"{n}.weight" for n, m in hf.named_modules() if m is out}
    return bool(getattr(config, "tie_word_embeddings", False)) and key in names


def save_config(cfg, folder: Path) -> None:
    """The run's model config (with its RoPE changes) and the tokenizer, for export --hf."""
    from transformers import AutoTokenizer

    config = extended_config(cfg.pretrained, cfg.seq_len, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    if is_vlm(config):  # the processor: its tokenizer, chat template and image processor
        load_processor(cfg.pretrained).save_pretrained(folder)
    else:
        AutoTokenizer.from_pretrained(cfg.pretrained).save_pretrained(folder)
    facts: dict = dict(source=str(Path(cfg.pretrained).resolve()))
    if cfg.lora is not None:
        facts["lora"] = dict(r=cfg.lora, alpha=cfg.lora_alpha, targets=list(cfg.lora_targets))
    (folder / "ringwise.json").write_text(json.dumps(facts, indent=2))


@dataclass
class Documents:
    """A pretrained model's text: packed windows, the training ones and the held-out ones."""

    train: torch.utils.data.Subset
    held_out: torch.utils.data.Subset
    tokenizer: object
    stages: dict[int, torch.utils.data.Subset] | None = None  # a --seq-len schedule's training windows by length

    def train_at(self, seq_len: int) -> torch.utils.data.Subset:
        """The training windows of `seq_len` tokens (a schedule's stage; else the one length's)."""
        return self.stages[seq_len] if self.stages else self.train


_PREPARED: dict = {}  # the last documents() of this process: {its sources' key: Documents}


def _sources_key(cfg) -> tuple:
    """What documents() reads: the checkpoint's folder and every --text file, each with its size and
    modification time (an edited file is read again), and the packing's settings."""

    def stats(paths):
        return tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in paths)

    model = Path(cfg.pretrained)
    model_files = sorted(f for f in model.iterdir() if f.is_file()) if model.is_dir() else []
    schedule = tuple(map(tuple, cfg.seq_schedule or ()))
    return (
        stats(model_files),
        stats(text_files(cfg.text, skip=LEGACY_CACHE_DIR)),
        cfg.seq_len,
        schedule,
        cfg.eval_fraction,
    )


def documents(cfg) -> Documents:
    """--text in the model's tokens, packed and split.

    The flag validation (config.py, before any rank starts) and the build (tasks.FinetuneTask) share
    one tokenization: in one process (each rank under torchrun) the second call returns the first's
    result while its sources are unchanged; across processes (the launcher, then its local ranks) the
    tokens are read from the cache the first call wrote (data/documents.py)."""
    key = _sources_key(cfg)
    if key not in _PREPARED:
        _PREPARED.clear()  # the last corpus only: a long-lived process (tests) keeps no more
        _PREPARED[key] = _prepare_documents(cfg)
    return _PREPARED[key]


def _prepare_vlm_examples(cfg) -> Documents:
    """A vision-language model's image-text examples through its processor, one a sequence (ImageTextExamples),
    the last --eval-fraction held out."""
    from transformers import AutoConfig

    problems = vlm_problems(AutoConfig.from_pretrained(cfg.pretrained))
    if problems:
        raise ValueError(f"--model {cfg.pretrained}: {problems[0]}")
    processor = load_processor(cfg.pretrained)
    tok = processor.tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"--model {cfg.pretrained}: its tokenizer has no EOS token to end an example")
    examples = ImageTextExamples(
        tokenize_documents(cfg.text, processor),
        cfg.seq_len,
        eos,
        tok.pad_token_id if tok.pad_token_id is not None else eos,
    )
    train, held_out = split(len(examples), cfg.eval_fraction)
    if not len(train) or not len(held_out):
        raise ValueError(f"--text holds {len(examples)} image-text example(s); training and evaluation need 2 at least")
    return Documents(torch.utils.data.Subset(examples, train), torch.utils.data.Subset(examples, held_out), processor)


def _prepare_documents(cfg) -> Documents:
    from transformers import AutoConfig, AutoTokenizer

    if is_vlm(AutoConfig.from_pretrained(cfg.pretrained)):
        return _prepare_vlm_examples(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {cfg.pretrained}: its tokenizer has no EOS token to separate documents")
    tokens = tokenize_documents(cfg.text, tokenizer)
    packed = PackedDocuments(tokens, cfg.seq_len, tokenizer.eos_token_id)
    train, held_out = split(len(packed), cfg.eval_fraction)
    if not len(train) or not len(held_out):
        raise ValueError(
            f"--text holds {packed.tokens.numel()} tokens of --model's tokenizer: {len(packed)} "
            f"sequence(s) of --seq-len {cfg.seq_len}; training and evaluation need 2 at least"
        )
    docs = Documents(torch.utils.data.Subset(packed, train), torch.utils.data.Subset(packed, held_out), tokenizer)
    if cfg.seq_schedule:
        docs.stages = {cfg.seq_len: docs.train}
        held_from = packed.windows[held_out.start] * cfg.seq_len  # the held-out text's first token
        for length, steps in cfg.seq_schedule[:-1]:  # a shorter stage: its windows of the text before it
            shorter = PackedDocuments(tokens, length, tokenizer.eos_token_id)
            before = [i for i, w in enumerate(shorter.windows) if (w + 1) * length < held_from]
            if not before:
                raise ValueError(
                    f"the stage {length}:{steps} of --seq-len has no window of {length} tokens to train on "
                    "before the held-out text"
                )
            docs.stages[length] = torch.utils.data.Subset(shorter, before)
    return docs


def _as_new_files(folder: Path) -> None:
    """Every file in `folder` readable as a new file is (0666 less the umask): safetensors writes its
    files 0600, as a private temporary file, which an export for others to load should not be."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def export_hf(run_dir, out, adapter: bool = False) -> Path:
    """The newest intact checkpoint of a finetune run as a transformers folder: the run's config (with
    its RoPE changes), safetensors and tokenizer. A LoRA run's adapters are merged into the weights (a plain
    transformers model); with `adapter`, a LoRA run's adapters alone as a peft folder (adapter_config.json,
    adapter_model.safetensors and the tokenizer: PeftModel.from_pretrained puts them on the base model).
    Made whole in this process (offline, once)."""
    import shutil

    from transformers import AutoConfig

    from . import checkpoint

    run_dir, out = Path(run_dir), Path(out)
    hf_dir = run_dir / "hf"
    if not (hf_dir / "config.json").exists():
        raise ValueError(f"{run_dir} is not a ringwise finetune run (no hf/config.json); export it without --hf")
    facts = json.loads((hf_dir / "ringwise.json").read_text()) if (hf_dir / "ringwise.json").exists() else {}
    lora = facts.get("lora")
    if adapter and lora is None:
        raise ValueError(f"{run_dir} is a full fine-tuning run (no --lora): it has no adapters; export it with --hf")
    path, skipped = checkpoint.newest_intact(run_dir / "checkpoints")
    if path is None:
        raise FileNotFoundError(
            f"no intact checkpoint in {run_dir / 'checkpoints'}" + "".join(f"; skipped {why}" for why in skipped)
        )
    weights = {k.removeprefix("hf."): v for k, v in checkpoint.consolidated(path)["model"].items()}
    config = AutoConfig.from_pretrained(hf_dir)
    peft_model = None
    if lora is None:
        model = auto_model_class(config).from_config(config, **dtype_kwarg(torch.float32))
    else:  # the checkpoint holds the adapters (checkpoint._options): the base is the pretrained checkpoint's
        from peft import get_peft_model

        source = facts.get("source")
        if not source or not weight_files(source):
            raise ValueError(
                f"{run_dir} is a --lora run, whose checkpoints hold the adapters only, and its base model "
                f"{source} is no longer there (no .safetensors): put it back to export"
            )
        model = auto_model_class(config).from_pretrained(source, config=config, **dtype_kwarg(torch.float32))
        # the run's LoRA layers (peft's names: the injected ones under base_model.model.)
        peft_model = get_peft_model(model, lora_config(lora["r"], lora["alpha"], lora["targets"]))
        peft_model.peft_config["default"].base_model_name_or_path = source
        model = peft_model.base_model.model
    model.load_state_dict(weights, strict=False)
    expected = {k for k in model.state_dict() if lora is None or is_adapter(k)}
    missing = sorted(k for k in expected - set(weights) if not _is_tied(model, k))
    if missing or set(weights) - set(model.state_dict()):
        raise ValueError(
            f"{path}: its tensors do not match the model (missing {missing[:4]}, "
            f"unexpected {sorted(set(weights) - set(model.state_dict()))[:4]})"
        )
    model.tie_weights()
    if peft_model is not None and not adapter:
        model = peft_model.merge_and_unload()  # each target's W + (alpha / r) B A, as plain Linear layers
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: give a new folder for the export")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # written whole, then renamed: never half a folder
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (cast("PreTrainedModel", peft_model) if adapter else model).save_pretrained(tmp)
        for f in hf_dir.iterdir():  # the tokenizer's files (the config was just written with the weights)
            if f.is_file() and f.name not in ("config.json", "ringwise.json"):
                shutil.copy2(f, tmp / f.name)
        _as_new_files(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
