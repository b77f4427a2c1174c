"""transformers' Trainer (and TRL's SFTTrainer) sequence-parallel through ringwise (ringwise.integrations.trainer):
two SGD steps of ring_trainer(Trainer) on W = 2, 3 rings and a 2 x 2 (data-parallel x ring) mesh log the same
losses and leave the same weights as one process training the same model on the same data (sdpa, whole
sequences, the global batch in one), within float32 round-off of a float64 run; right-padded batches and
padding-free packing; a bad batch refused alike on every rank of a ring."""

import contextlib
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from helpers import CEILINGS, assert_within_budget, max_err  # noqa: E402

import ringwise.integrations.transformers as rw  # noqa: E402
from ringwise import SeqShard  # noqa: E402
from ringwise.integrations.trainer import RingCollator, global_batch, ring_trainer  # noqa: E402

BATCH, STEPS, LR = 2, 2, 0.5  # per replica; SGD: an update is the gradient, nothing normalises an error away
LENGTHS = (13, 7, 10, 4)  # sequences of the data set (the first BATCH x dp of them are used), of unequal lengths


def make_config():
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_dropout=0.0,
        pad_token_id=0,
    )


def dataset(n):
    """n sequences of LENGTHS, fixed random tokens (1..127: 0 is the pad)."""
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(1, 128, (s,), generator=g).tolist()} for s in LENGTHS[:n]]


def collator(packed):
    """The user's collator: TRL's language-modeling one (right padding, or padding-free packing into one row)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=packed)


def common_args(batch, **kw):
    """The arguments every run here shares (a one-process reference and the ring's ranks alike)."""
    return dict(
        per_device_train_batch_size=batch,
        max_steps=STEPS,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **kw,
    )


def training_args(out, batch, **kw):
    return transformers.TrainingArguments(
        output_dir=out, remove_unused_columns=False, dataloader_drop_last=False, **common_args(batch, **kw)
    )


def initial_model(attn, dtype=torch.float32, shard=None):
    torch.manual_seed(0)
    if attn == "ringwise":
        return rw.from_config(make_config(), shard=shard).to(dtype)
    return transformers.AutoModelForCausalLM.from_config(make_config(), attn_implementation=attn).to(dtype)


def losses_of(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def ring_groups(ring):
    """The rings of `ring` consecutive ranks (every rank makes every group, in the same order): this rank's."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if ring == world:
        return None
    groups = [dist.new_group(list(range(d * ring, (d + 1) * ring))) for d in range(world // ring)]
    return groups[rank // ring]


def trainer_case(case):
    """On every rank: STEPS of ring_trainer(Trainer); the logged losses and the trained weights. accum: the
    replica's BATCH sequences in that many micro-batches of gradient accumulation (the same global batch)."""
    shard = SeqShard(case["layout"], ring_groups(case["ring"]))
    dp = dist.get_world_size() // case["ring"]
    model = initial_model("ringwise", shard=shard)
    accum = case.get("accum", 1)
    with tempfile.TemporaryDirectory() as out:
        trainer = ring_trainer(transformers.Trainer)(
            model=model,
            args=training_args(out, BATCH // accum, gradient_accumulation_steps=accum),
            train_dataset=dataset(BATCH * dp),
            data_collator=RingCollator(collator(case["packed"]), model=model),
        )
        trainer.train()
    return dict(losses=losses_of(trainer), weights={n: p.detach().clone() for n, p in model.named_parameters()})


def single_trainer(dp, dtype):
    """One process, plain Trainer, sdpa, right-padded rows: the whole global batch (every replica's) at once."""
    model = initial_model("sdpa", dtype)
    with tempfile.TemporaryDirectory() as out:
        trainer = transformers.Trainer(
            model=model,
            args=training_args(out, BATCH * dp),
            train_dataset=dataset(BATCH * dp),
            data_collator=collator(False),
        )
        trainer.train()
    return losses_of(trainer), {n: p.detach().clone() for n, p in model.named_parameters()}


_SINGLE: dict = {}


def single(dp, dtype, run=single_trainer):
    if (run, dp, dtype) not in _SINGLE:
        _SINGLE[run, dp, dtype] = run(dp, dtype)
    return _SINGLE[run, dp, dtype]


def check_against_one_process(results, dp, run=single_trainer):
    """Every rank logs the same losses and holds the same weights; both are one process's, within the float32
    model's own error against float64 (the updates: weights minus the initial weights)."""
    ref_losses, ref = single(dp, torch.float64, run)
    f32_losses, f32 = single(dp, torch.float32, run)
    initial = dict(initial_model("sdpa", torch.float64).named_parameters())
    assert len(results[0]["losses"]) == STEPS
    for r in results:
        assert r["losses"] == results[0]["losses"]
        for n, w in r["weights"].items():
            assert torch.equal(w, results[0]["weights"][n]), n  # the replicas and ranks stay identical
    for i in range(STEPS):
        got, want, own = (
            torch.tensor(x[i], dtype=torch.float64) for x in (results[0]["losses"], ref_losses, f32_losses)
        )
        assert_within_budget(f"loss {i}", max_err(got, want), max_err(own, want), 1e-6, ceiling=CEILINGS["float32"])
    for n, w in results[0]["weights"].items():
        start = initial[n].detach()
        got, want, own = w.double() - start, ref[n] - start, f32[n].double() - start
        assert_within_budget(n, max_err(got, want), max_err(own, want), 1e-8, ceiling=CEILINGS["float32"])


GRID = [
    dict(world=2, ring=2, layout="zigzag", packed=False),
    dict(world=2, ring=2, layout="striped", packed=True),
    dict(world=3, ring=3, layout="zigzag", packed=True),
    dict(world=3, ring=3, layout="striped", packed=False),
    dict(world=4, ring=2, layout="zigzag", packed=False),
    dict(world=4, ring=2, layout="zigzag", packed=True),
    dict(world=4, ring=2, layout="striped", packed=False, accum=2),
]


def case_id(c):
    data = "packed" if c["packed"] else "padded"
    accum = f"-accum{c['accum']}" if c.get("accum") else ""
    return f"W{c['world']}-dp{c['world'] // c['ring']}xring{c['ring']}-{c['layout']}-{data}{accum}"


@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_trainer_steps_match_one_process(grid_results, case):
    results = grid_results(trainer_case, GRID, case)
    check_against_one_process(results, case["world"] // case["ring"])


# ---------------------------------------------------------------- FSDP2


@contextlib.contextmanager
def accelerate_fsdp_on_cpu():
    """accelerate 1.16 turns its FSDP plugin on only for accelerator devices (MULTI_GPU, ...); on CPU it keeps
    MULTI_CPU, so Trainer runs DDP. Inside this, the CPU's gloo ranks get what a GPU job gets: distributed type
    FSDP with Trainer's plugin, so Trainer applies FSDP2's fully_shard (gloo's reduce-scatter)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original


def fsdp_case(case):
    """On every rank: STEPS of ring_trainer(Trainer) with accelerate's FSDP2 config (fsdp=True, version 2), run as
    accelerate runs it on CPU (case["on_cpu"] == "as is": DDP) or as on GPUs ("fsdp"); the logged losses, the
    trained (whole) weights, whether Trainer ran FSDP and whether the parameters were sharded over every rank."""
    from torch.distributed.tensor import DTensor

    shard = SeqShard(case["layout"], ring_groups(case["ring"]))
    dp = dist.get_world_size() // case["ring"]
    model = initial_model("ringwise", shard=shard)
    forced = accelerate_fsdp_on_cpu() if case["on_cpu"] == "fsdp" else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as out, forced:
        trainer = ring_trainer(transformers.Trainer)(
            model=model,
            args=training_args(out, BATCH, fsdp=True, fsdp_config={"version": 2}),
            train_dataset=dataset(BATCH * dp),
            data_collator=RingCollator(collator(case["packed"]), model=model),
        )
        trainer.train()
    params = dict(model.named_parameters())
    world = dist.get_world_size()
    sharded = all(isinstance(p, DTensor) and p.device_mesh.size() == world for p in params.values())
    weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in params.items()}
    return dict(losses=losses_of(trainer), weights=weights, fsdp=trainer.is_fsdp_enabled, sharded=sharded)


FSDP_GRID = [
    dict(world=2, ring=2, layout="zigzag", packed=False, on_cpu="as is"),
    dict(world=2, ring=2, layout="zigzag", packed=False, on_cpu="fsdp"),
    dict(world=4, ring=2, layout="striped", packed=True, on_cpu="fsdp"),
]


@pytest.mark.parametrize("case", FSDP_GRID, ids=lambda c: case_id(c) + "-" + c["on_cpu"].replace(" ", "-"))
def test_trainer_under_fsdp2_matches_one_process(grid_results, case):
    """FSDP2's reduce-scatter averages the gradients over all W ranks, as DDP does: Trainer's scaling of the ring's
    loss carries over, and the steps are one process's. On CPU accelerate ignores the FSDP config (DDP, nothing
    sharded); turned on as on GPUs, the parameters are sharded DTensors and the steps are the same."""
    results = grid_results(fsdp_case, FSDP_GRID, case)
    on = case["on_cpu"] == "fsdp"
    assert all(r["fsdp"] == on and r["sharded"] == on for r in results), [(r["fsdp"], r["sharded"]) for r in results]
    check_against_one_process(results, case["world"] // case["ring"])


# ---------------------------------------------------------------- evaluation

EVAL_LENGTHS = (13, 7, 10, 4, 9)  # 5 sequences, batches of 2: the replicas read uneven numbers of batches


def eval_dataset():
    g = torch.Generator().manual_seed(4)
    return [{"input_ids": torch.randint(1, 128, (s,), generator=g).tolist()} for s in EVAL_LENGTHS]


def eval_case(case):
    """On every rank: ring_trainer(Trainer).evaluate() on the untrained model."""
    shard = SeqShard(case["layout"], ring_groups(case["ring"]))
    model = initial_model("ringwise", shard=shard)
    with tempfile.TemporaryDirectory() as out:
        trainer = ring_trainer(transformers.Trainer)(
            model=model,
            args=training_args(out, BATCH, per_device_eval_batch_size=2),
            eval_dataset=eval_dataset(),
            data_collator=collator(case["packed"]),
        )
        return trainer.evaluate()


def token_mean_loss(dtype):
    """One process, sdpa: every sequence's next-token losses summed, over the count of targets."""
    model = initial_model("sdpa", dtype)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for row in eval_dataset():
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").double()
            count += ids.shape[1] - 1
    return total / count


EVAL_GRID = [
    dict(world=2, ring=2, layout="zigzag", packed=False),
    dict(world=3, ring=3, layout="striped", packed=True),
    dict(world=4, ring=2, layout="zigzag", packed=True),
]


@pytest.mark.parametrize("case", EVAL_GRID, ids=case_id)
def test_evaluate_is_the_token_mean_loss_of_the_eval_set(grid_results, case):
    """eval_loss, the same on every rank, is one process's token-mean loss over the whole evaluation set (no
    sample counted twice, none missed, though the replicas read 3 and 2 batches)."""
    results = grid_results(eval_case, EVAL_GRID, case)
    assert all(r == results[0] for r in results), results
    want, own = token_mean_loss(torch.float64), token_mean_loss(torch.float32)
    got = torch.tensor(results[0]["eval_loss"], dtype=torch.float64)
    assert_within_budget("eval_loss", max_err(got, want), max_err(own, want), 1e-6, ceiling=CEILINGS["float32"])


# ---------------------------------------------------------------- TRL's SFTTrainer


def word_tokenizer():
    """A word-level tokenizer of the model's 128 ids (t0 .. t127; t0 the pad, t2 the end): the data set comes
    tokenized, SFTTrainer only reads its special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(128)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t1", eos_token="t2", pad_token="t0")


def sft_dataset(n):
    """Prompt-completion pairs, tokenized: a completion_mask of 0s on the prompt's tokens and 1s on the answer's
    (SFTTrainer's completion-only loss makes the prompt's labels -100)."""
    from datasets import Dataset

    rows = []
    for i, row in enumerate(dataset(n)):
        prompt = 3 + 2 * i  # 3, 5, 7, 9 prompt tokens
        mask = [0] * prompt + [1] * (len(row["input_ids"]) - prompt)
        rows.append(dict(input_ids=row["input_ids"], completion_mask=mask))
    return Dataset.from_list(rows)


def sft_args(out, batch, packed):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out,
        bf16=False,  # SFTConfig turns bf16 autocast on where it can: the float32 comparison wants none
        completion_only_loss=True,
        padding_free=packed,
        max_length=None,
        **common_args(batch),
    )


def sft_case(case):
    """On every rank: STEPS of ring_trainer(SFTTrainer), completion-only loss, padding-free packing or padded rows
    (TRL builds its collator; ring_trainer wraps it); the logged losses and the trained weights."""
    from trl import SFTTrainer

    shard = SeqShard(case["layout"], ring_groups(case["ring"]))
    dp = dist.get_world_size() // case["ring"]
    model = initial_model("ringwise", shard=shard)
    with tempfile.TemporaryDirectory() as out:
        trainer = ring_trainer(SFTTrainer)(
            model=model,
            args=sft_args(out, BATCH, case["packed"]),
            train_dataset=sft_dataset(BATCH * dp),
            processing_class=word_tokenizer(),
        )
        trainer.train()
    return dict(losses=losses_of(trainer), weights={n: p.detach().clone() for n, p in model.named_parameters()})


def single_sft(dp, dtype):
    """One process, TRL's own SFTTrainer (its fused-head loss), sdpa, padded rows, the whole global batch."""
    from trl import SFTTrainer

    model = initial_model("sdpa", dtype)
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=model,
            args=sft_args(out, BATCH * dp, False),
            train_dataset=sft_dataset(BATCH * dp),
            processing_class=word_tokenizer(),
        )
        trainer.train()
    return losses_of(trainer), {n: p.detach().clone() for n, p in model.named_parameters()}


SFT_GRID = [
    dict(world=2, ring=2, layout="zigzag", packed=True),
    dict(world=3, ring=3, layout="striped", packed=True),
    dict(world=3, ring=3, layout="zigzag", packed=False),
    dict(world=4, ring=2, layout="zigzag", packed=True),
]


@pytest.mark.parametrize("case", SFT_GRID, ids=case_id)
def test_sft_trainer_steps_match_one_process(grid_results, case):
    results = grid_results(sft_case, SFT_GRID, case)
    check_against_one_process(results, case["world"] // case["ring"], single_sft)


# ---------------------------------------------------------------- TRL's DPOTrainer


def dpo_dataset(n):
    """n preference pairs as text of the word tokenizer: prompts of 3 .. 6 tokens, completions of 1 .. 9 (TRL adds
    the end token to each), chosen and rejected of different lengths."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(5)

    def words(k):
        return " ".join(f"t{int(i)}" for i in torch.randint(3, 128, (k,), generator=g)) + " "

    return Dataset.from_list(
        [dict(prompt=words(3 + i), chosen=words(2 + 2 * i), rejected=words(9 - 2 * i)) for i in range(n)]
    )


def dpo_args(out, batch, loss_type):
    from trl import DPOConfig

    return DPOConfig(output_dir=out, bf16=False, beta=0.5, max_length=None, loss_type=loss_type, **common_args(batch))


def dpo_case(case):
    """On every rank: STEPS of ring_trainer(DPOTrainer) (a reference model of the same initial weights on the same
    ring); the logged losses and the trained weights."""
    from trl import DPOTrainer

    shard = SeqShard(case["layout"], ring_groups(case["ring"]))
    dp = dist.get_world_size() // case["ring"]
    model, ref = initial_model("ringwise", shard=shard), initial_model("ringwise", shard=shard)
    with tempfile.TemporaryDirectory() as out:
        trainer = ring_trainer(DPOTrainer)(
            model=model,
            ref_model=ref,
            args=dpo_args(out, BATCH, case["loss"]),
            train_dataset=dpo_dataset(BATCH * dp),
            processing_class=word_tokenizer(),
        )
        trainer.train()
    return dict(losses=losses_of(trainer), weights={n: p.detach().clone() for n, p in model.named_parameters()})


def single_dpo(loss):
    def run(dp, dtype):
        """One process, TRL's own DPOTrainer, sdpa, the whole global batch of pairs (its log-probabilities are float32
        whatever the model's dtype: TRL's fused-head kernel computes in float32)."""
        from trl import DPOTrainer

        model, ref = initial_model("sdpa", dtype), initial_model("sdpa", dtype)
        with tempfile.TemporaryDirectory() as out:
            trainer = DPOTrainer(
                model=model,
                ref_model=ref,
                args=dpo_args(out, BATCH * dp, loss),
                train_dataset=dpo_dataset(BATCH * dp),
                processing_class=word_tokenizer(),
            )
            if dtype == torch.float64:
                return dpo_oracle(trainer, loss)
            trainer.train()
        return losses_of(trainer), {n: p.detach().clone() for n, p in model.named_parameters()}

    return run


def dpo_oracle(trainer, loss_types):
    """The float64 oracle: TRL's batch (its collator on the whole data set, one batch), each sequence's summed
    completion log-probability in float64, the DPO loss, Trainer's clipping (max_grad_norm) and SGD, STEPS times."""
    import torch.nn.functional as F

    batch = trainer.data_collator(list(trainer.train_dataset))
    model, ref, beta = trainer.model, trainer.ref_model, trainer.beta
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]

    def logps(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
        return -token.view(labels.shape).sum(1)

    with torch.no_grad():
        ref_chosen, ref_rejected = logps(ref).chunk(2)
    losses = []
    for _ in range(STEPS):
        chosen, rejected = logps(model).chunk(2)
        delta = (chosen - ref_chosen) - (rejected - ref_rejected)
        per_type = {"sigmoid": -F.logsigmoid(beta * delta), "hinge": torch.relu(1 - beta * delta)}
        loss = sum(per_type[t].mean() for t in loss_types)
        model.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


DPO_RUNS = {"sigmoid": single_dpo(["sigmoid"]), "sigmoid+hinge": single_dpo(["sigmoid", "hinge"])}
DPO_GRID = [
    dict(world=2, ring=2, layout="zigzag", loss=["sigmoid"]),
    dict(world=3, ring=3, layout="striped", loss=["sigmoid", "hinge"]),
    dict(world=4, ring=2, layout="zigzag", loss=["sigmoid"]),
]


@pytest.mark.parametrize("case", DPO_GRID, ids=lambda c: case_id(dict(c, packed=False)) + "-" + "+".join(c["loss"]))
def test_dpo_trainer_steps_match_one_process(grid_results, case):
    results = grid_results(dpo_case, DPO_GRID, case)
    check_against_one_process(results, case["world"] // case["ring"], DPO_RUNS["+".join(case["loss"])])


# ---------------------------------------------------------------- refusals


class LeftPadding:
    """A collator that pads on the left: real tokens would attend to pads under the ring."""

    def __call__(self, features):
        out = collator(False)(features)
        return {k: v.flip(1) for k, v in out.items()}


def refusal_case(case):
    """Each rank's error (or None) and how long it took: a left-padded batch through ring_trainer, or a plain
    Trainer (its sampler hands each rank of the ring another batch) with a RingCollator."""
    shard = SeqShard("zigzag")
    model = initial_model("ringwise", shard=shard)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if case["kind"] == "left padding":
            cls, data, ring_collator = ring_trainer(transformers.Trainer), dataset(BATCH), RingCollator(LeftPadding())
        else:
            cls, data = transformers.Trainer, dataset(BATCH * dist.get_world_size())
            ring_collator = RingCollator(collator(False), model=model)
        trainer = cls(model=model, args=training_args(out, BATCH), train_dataset=data, data_collator=ring_collator)
        try:
            trainer.train()
            message = None
        except ValueError as e:
            message = str(e)
    return dict(message=message, seconds=time.perf_counter() - start)


REFUSALS = [dict(world=2, kind="left padding"), dict(world=2, kind="ranks given different batches")]


@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c["kind"].replace(" ", "-"))
def test_a_bad_batch_is_refused_alike_on_every_rank(grid_results, case):
    results = grid_results(refusal_case, REFUSALS, case)
    messages = {r["message"] for r in results}
    assert len(messages) == 1 and None not in messages, messages
    message = messages.pop()
    assert ("right padding" if case["kind"] == "left padding" else "different batches") in message, message
    assert all(r["seconds"] < 20 for r in results)


def test_ring_trainer_checks_what_it_needs():
    """Built on a model without the ring-aware loss, with data-loader workers and per-rank token averaging: one
    error naming all three."""
    model = initial_model("sdpa")
    with tempfile.TemporaryDirectory() as out:
        args = training_args(out, BATCH, dataloader_num_workers=1, average_tokens_across_devices=False)
        with pytest.raises(ValueError) as e:
            ring_trainer(transformers.Trainer)(
                model=model, args=args, train_dataset=dataset(2), data_collator=collator(False)
            )
    for part in ("ring-aware loss", "dataloader_num_workers", "average_tokens_across_devices"):
        assert part in str(e.value)


def test_global_batch_reads_padding_and_packing():
    """The collator's reading of a whole batch (pure, the same on every rank): right padding to ignored targets,
    a completion mask, padding-free position ids (and TRL's cu_seq_lens_q) to documents, the length padded to the
    layout's unit; what it cannot run exactly refused with the reason."""
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got_ids, labels, docs = global_batch(dict(input_ids=ids, attention_mask=mask), unit=4)
    assert docs is None and got_ids.shape == (2, 8) and got_ids[:, 5:].eq(0).all()
    assert labels.tolist() == [[5, 6, 7, 8, 9, -100, -100, -100], [5, 6, 7, -100, -100, -100, -100, -100]]
    completion = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    _, labels, _ = global_batch(dict(input_ids=ids, attention_mask=mask, completion_mask=completion), unit=1)
    assert labels.tolist() == [[-100, -100, 7, 8, 9], [-100, 6, 7, -100, -100]]
    packed = dict(input_ids=torch.arange(1, 8)[None], position_ids=torch.tensor([[0, 1, 2, 0, 1, 0, 1]]))
    _, labels, docs = global_batch(packed, unit=4)
    assert docs == [0, 3, 5, 7, 8]  # the pad: a document of its own
    packed["cu_seq_lens_q"] = torch.tensor([0, 3, 5, 7], dtype=torch.int32)
    assert global_batch(packed, unit=1)[2] == [0, 3, 5, 7]
    for bad, why in (
        (dict(input_ids=ids, attention_mask=mask.flip(1)), "right padding"),
        (dict(packed, cu_seq_lens_q=torch.tensor([0, 2, 7])), "disagree"),
        (dict(input_ids=ids, position_ids=torch.tensor([[0, 1, 0, 1, 2]] * 2)), "one row"),
        (dict(input_ids=ids[:1], position_ids=torch.tensor([[0, 1, 3, 4, 5]])), "count 0, 1, 2"),
        (dict(input_ids=ids, token_type_ids=ids), "token_type_ids"),
    ):
        with pytest.raises(ValueError, match=why):
            global_batch(bad, unit=1)
