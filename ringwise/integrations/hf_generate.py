"""transformers' own generate() from a prompt sharded over the ring (rw.generate).

The prompt but its last token runs once through the model on this rank's layout shard
(ring attention, the training forward; padded at its end as the layout needs, the pads
never seen by a real token and never stored), every layer's K/V kept where the ring left
them in a ShardedCache. transformers' generate() then continues from that cache as from
any prefilled cache: its first step is the last prompt token, and at every step each rank
runs the model on the same new tokens, the least-loaded rank keeps their K/V, and
attention covers the whole sharded cache with decode_attention (one all-gather a layer,
merged in rank order: the same bits on every rank). Every rank so computes the same
logits and, seeded alike, samples the same tokens; the sequences are compared across
ranks at the end (one small all-gather) and a difference is an error, never a result.

A vision-language model with M-RoPE (hf_multimodal: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V) takes its
images as model.generate does (pixel_values, image_grid_thw, mm_token_type_ids, ...): the prefill runs
the vision tower on every rank and the language model through the ring on rw.shard_multimodal_batch's
inputs; the model keeps the prompt's rope_deltas, from which generate() numbers the decoded tokens (the
prompt must end with a text token). Gemma 3 and Gemma 4 (image-token groups) take their images and token types the
same way; their decode steps are causal. PaliGemma and Gemma 4's KV-shared layers are refused.

Refused on every rank alike, before any ring traffic (one object all-gather): padding
masks, beam search and the other non-greedy/non-sampling modes, assisted decoding,
a cache of the caller's (static, offloaded, quantized or any other), attention outputs,
Ulysses meshes, different prompts, options or (when sampling) random states on the ranks.
"""

from __future__ import annotations

import copy
import hashlib
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention.comm import all_gather_single
from ..attention.decode import _digest
from ..attention.kvcache import prompt_loads
from .hf_hybrids import SHARDED_LAYERS, is_sharded_layer
from .hf_mixers import layer_of
from .hf_multimodal import MULTIMODAL_INPUTS, generation_problem, is_supported_vlm
from .hf_multimodal import prefill as prefill_multimodal
from .hf_rings import configs_of, ring_of, shard_of_state

_OWN_CACHE = ("past_key_values", "cache")


def _cache_keyword(model) -> str:
    """The forward's name for the cache: `cache` from transformers 5.2x, `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _describe(value):
    """A rank-independent description of a generate() argument, to compare the ranks' calls."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), _digest(value))
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _describe(v)) for k, v in value.items()))
    return type(value).__name__


def _generation_config(model, kwargs):
    """The generation config generate() will use (the model's, or the one passed, updated by the kwargs)."""
    base = kwargs.get("generation_config") or model.generation_config
    config = copy.deepcopy(base)
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config"})
    return config


def _problem(input_ids, shard, kwargs, config) -> str | None:
    """This rank's objection to the call, or None."""
    from transformers.generation.configuration_utils import GenerationMode

    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
        or input_ids.shape[1] < 1
    ):
        return (
            f"input_ids must be a (batch, length >= 1) integer tensor, got {getattr(input_ids, 'shape', input_ids)!r}"
        )
    if shard.ulysses_group is not None:
        return "decoding on a Ulysses mesh is not supported yet: generate on a plain ring (no ulysses_group)"
    given = [k for k in _OWN_CACHE if kwargs.get(k) is not None]
    if given:
        return f"rw.generate makes and fills its own sequence-sharded cache; do not pass {given[0]}"
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).all()):
        return (
            "padding masks are not supported (prompts of one length only): generate each length "
            "separately, without padding"
        )
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return (
            f"generation mode {mode.value!r} is not supported: greedy search and sampling are (beam search "
            "and assisted decoding need a cache that reorders or crops rows)"
        )
    if config.cache_implementation is not None:
        return (
            f"cache_implementation={config.cache_implementation!r} is not supported: the cache is "
            "ringwise's, sharded over the ring"
        )
    if config.use_cache is False:
        return "use_cache=False recomputes the whole sequence each token on one shard; rw.generate needs the cache"
    if getattr(config, "output_attentions", False):
        return "output_attentions is not supported (the attention weights are never formed)"
    if getattr(config, "num_return_sequences", 1) not in (None, 1) and not config.do_sample:
        return "num_return_sequences > 1 needs do_sample=True (greedy returns one sequence per prompt)"
    return None


def _model_problem(model) -> str | None:
    """What in the model rw.generate cannot decode exactly, or None."""
    hybrid = next((m for m in model.modules() if not getattr(layer_of(m, SHARDED_LAYERS), "generates", True)), None)
    if hybrid is not None:
        return (
            f"{type(hybrid).__name__} (a sequence-mixing layer outside attention) does not yet leave its "
            "convolution and recurrent states in rw.generate's cache after the ring's prefill; generate with "
            "another attn_implementation (the ring runs training and prefill with use_cache=False)"
        )
    shared = next((m for m in model.modules() if getattr(m, "layer_idx", 0) == -1 and hasattr(m, "q_proj")), None)
    if shared is not None:
        return (
            f"{type(shared).__name__} is shared by several layers (layer_idx -1: Zamba's shared attention blocks), "
            "so rw.generate's decode cannot tell which layer's sharded K/V a call reads; generate with another "
            "attn_implementation"
        )
    if any(is_sharded_layer(m) for m in model.modules()):
        if is_supported_vlm(model):
            return (
                "a vision-language model with convolution or recurrent layers (Qwen3.5): its prefill does not yet "
                "leave their states in rw.generate's cache; generate with another attn_implementation"
            )
        kinds = set(_cache_layer_types(model)[0]) - STATE_CACHE_TYPES - HYBRID_CACHE_TYPES - ATTENTION_CACHE_TYPES
        if kinds:
            return f"layers of cache type {sorted(kinds)} are not supported by rw.generate yet"
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    shared = getattr(text, "num_kv_shared_layers", 0)
    if shared:
        return (
            f"num_kv_shared_layers={shared} (Gemma 4's KV-shared layers reuse the keys and values of earlier layers): "
            "rw.generate's sharded cache does not hand them over yet; generate with a model without KV-shared "
            "layers, or with another attn_implementation"
        )
    v_dim, qk_dims = (
        getattr(text, "v_head_dim", None),
        (getattr(text, k, None) for k in ("qk_nope_head_dim", "qk_rope_head_dim")),
    )
    qk_dim = sum(d for d in qk_dims if d is not None)
    if v_dim is not None and qk_dim and v_dim != qk_dim:
        return (
            f"multi-head latent attention (MLA: v_head_dim={v_dim}, query/key heads of {qk_dim}): rw.generate's "
            "decode does not pad the value heads as the ring does in training; generate with another "
            "attn_implementation"
        )
    return None


def _verdict(problem, shard, facts) -> None:
    """Every rank's objection and facts of the call, in one object all-gather; the same error everywhere."""
    world = shard.ring_size
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        if problem:
            raise ValueError(f"rw.generate: {problem}")
        return
    infos: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(infos, dict(rank=dist.get_rank(), problem=problem, facts=facts), group=shard.group)
    for i in infos:
        if i["problem"]:
            raise ValueError(f"rw.generate: rank {i['rank']}: {i['problem']}")
    first = infos[0]
    for i in infos[1:]:
        for what, mine in i["facts"].items():
            if mine != first["facts"][what]:
                raise ValueError(
                    f"rw.generate: rank {i['rank']} passed a different {what} than rank "
                    f"{first['rank']}: every rank must make the same call"
                    + (
                        " (seed every rank alike, e.g. torch.manual_seed, before sampling)"
                        if what == "random state"
                        else ""
                    )
                )


def _random_state(device) -> int:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return int.from_bytes(hashlib.sha256(b"".join(bytes(s.numpy()) for s in states)).digest()[:8], "little")


ATTENTION_CACHE_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "dummy"}
STATE_CACHE_TYPES = {"conv", "linear_attention"}  # a mixer's states alone
HYBRID_CACHE_TYPES = {"hybrid", "hybrid_sliding"}  # attention and a mixer in one layer


def _cache_layer_types(model) -> tuple[list[str], list[dict]]:
    """transformers' cache layer type of each decoder layer and its cache layer's arguments (config.layer_types,
    with transformers' own defaults)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return get_layer_types_and_kwargs(text)


def _layer_kinds(model) -> list[tuple[bool, int | None]]:
    """For each decoder layer: (whether it holds attention K/V, sharded; None or how many conv/recurrent states it
    keeps, replicated)."""
    if not any(is_sharded_layer(m) for m in model.modules()):
        return [(True, None)] * _layer_count_and_sliding(model)[0]
    types, kwargs = _cache_layer_types(model)
    return [
        (
            t not in STATE_CACHE_TYPES,
            k.get("number_of_states", 1) if t in STATE_CACHE_TYPES | HYBRID_CACHE_TYPES else None,
        )
        for t, k in zip(types, kwargs)
    ]


def _layer_count_and_sliding(model) -> tuple[int, list[bool]]:
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    n = text.num_hidden_layers
    types = getattr(text, "layer_types", None)
    if types:
        return n, [t == "sliding_attention" for t in types[:n]]
    return n, [getattr(text, "sliding_window", None) is not None] * n


def _same_everywhere(sequences: torch.Tensor, shard) -> None:
    """The ranks' sequences, compared by digest (one all-gather of one int64): they must be identical."""
    if shard.ring_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    mine = torch.tensor([_digest(sequences)], dtype=torch.int64, device=sequences.device)
    every = torch.empty(shard.ring_size, dtype=torch.int64, device=sequences.device)
    all_gather_single(every, mine, group=shard.group)
    if not bool((every == every[0]).all()):
        raise RuntimeError("rw.generate: the ranks generated different sequences (a ringwise bug: please report it)")


@torch.no_grad()
def generate(model, input_ids, objection: str | None = None, **generate_kwargs):
    """`model.generate(input_ids, **generate_kwargs)` over the model's ring (rw.use_ring / rw.configure):
    the same sequences on every rank as model.generate in one process. `objection`: the caller's
    problem with the model (check_model's), raised on every rank by the same verdict."""
    try:
        from .hf_cache import ShardedCache
    except ImportError as e:  # transformers without Cache layers (< 4.56)
        import transformers

        objection = objection or f"transformers {transformers.__version__} has no Cache layers (needs 5.x): {e}"
        ShardedCache = None  # type: ignore[misc,assignment]  # refused by the verdict below before any use
    states = [ring_of(c) for c in configs_of(model)]
    shard = shard_of_state(states[0])
    kwargs = dict(generate_kwargs)
    multimodal = is_supported_vlm(model)  # the images go to the prefill (the tower runs there), not to generate()
    images = {k: kwargs.pop(k) for k in MULTIMODAL_INPUTS if k in kwargs} if multimodal else {}
    config = _generation_config(model, kwargs)
    problem = objection or _problem(input_ids, shard, kwargs, config) or _model_problem(model)
    if multimodal:
        problem = problem or generation_problem(model, input_ids, images, config.num_return_sequences or 1)
    facts = (
        {}
        if problem
        else {
            "prompt": _describe(input_ids),
            "options": _describe({k: v for k, v in kwargs.items()}),
            "images": _describe(images),
            "random state": _random_state(input_ids.device) if config.do_sample else None,
        }
    )
    _verdict(problem, shard, facts)

    copies = config.num_return_sequences or 1
    if copies > 1:  # the rows generate() would expand itself, expanded before the prefill (the same draws)
        input_ids = input_ids.repeat_interleave(copies, dim=0)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"].repeat_interleave(copies, dim=0)
        kwargs["num_return_sequences"] = 1
    n_layers, sliding = _layer_count_and_sliding(model)
    cache = ShardedCache(n_layers, shard, sliding, _layer_kinds(model))
    keyword = _cache_keyword(model)
    try:
        for state in states:
            state.decoding = cache
        rest = input_ids[:, :0]
        if multimodal:
            prefill_multimodal(model, input_ids, images, cache, keyword)
        else:
            rest = _prefill(model, input_ids[:, :-1], cache, keyword)
        cache.phase = "decode"
        _step_through(model, rest, cache, keyword)
        out = model.generate(input_ids, **{keyword: cache}, **kwargs)
    finally:
        for state in states:
            state.decoding = None
    _same_everywhere(out if isinstance(out, torch.Tensor) else out.sequences, shard)
    return out


def _prefill(model, prompt, cache, keyword) -> torch.Tensor:
    """The prompt (all but its last token) through the ring on this rank's layout shard, K/V into the cache.
    A hybrid model's prefill stops at the longest prefix the layout splits without pads (its recurrent states
    must end at a real token) whose segments are at least as long as its convolutions; returns the prompt's
    tokens it left (batch, n), for _step_through."""
    shard = cache.shard
    batch, length = prompt.shape
    if any(is_sharded_layer(m) for m in model.modules()):
        widths = [m.weight.shape[-1] for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
        length -= length % shard.unit
        if length // shard.unit < max(widths, default=1):  # a segment's tokens: length / unit
            length = 0
    rest = prompt[:, length:]
    prompt = prompt[:, :length]
    if length == 0:
        cache.store.set_prompt([0] * shard.ring_size, 0)
        return rest
    padded = length + shard.pad_len(length)
    ids = F.pad(prompt, (0, padded - length))  # trailing pads: after every real token, dropped from the cache
    positions = shard.positions(padded, prompt.device)
    cache.prefill_positions = positions
    cache.store.set_prompt(prompt_loads(shard.layout, shard.ring_size, padded, length), length)
    model.base_model(
        input_ids=shard.shard(ids), position_ids=positions[None].expand(batch, -1), **{keyword: cache}, use_cache=True
    )
    return rest


def _step_through(model, tokens, cache, keyword) -> None:
    """The prompt tokens the ring's prefill left, one decode step each, alike on every rank (transformers' Mamba
    scan ignores a cached state in a step of several tokens: one at a time, every family continues exactly)."""
    batch = tokens.shape[0]
    for i in range(tokens.shape[1]):
        position = torch.full((batch, 1), cache.seen(), dtype=torch.long, device=tokens.device)
        model.base_model(input_ids=tokens[:, i : i + 1], position_ids=position, **{keyword: cache}, use_cache=True)
        if not cache.holds_kv:  # no attention layer claimed the step's token (Mamba): count it, as generate() reads
            cache.store.claim(1, tokens.device)
