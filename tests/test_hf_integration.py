"""The drop-in optimizers inside the Hugging Face stack and under torch LR schedulers.

* transformers.Trainer with ``optimizers=(opt, sched)``: PagedAdamW8bit (host store, 8-bit
  state for the big matrices) and PagedAdamW on the NVMe store; a checkpoint/resume cycle
  through the Trainer's own optimizer.pt.
* peft LoRA: state only for the trainable adapters, frozen base weights untouched.
* a plain loop with torch.optim.lr_scheduler: the paged optimizers follow the scheduler's lrs
  bit for bit like their unpaged counterparts.

Tiny models built from configs (nothing is downloaded); every test runs in a few seconds on
two CPU cores. Skipped where transformers or peft are not installed (the ``test`` extra has
both).
"""
import inspect
import json
import math
import os
from pathlib import Path

import pytest
import torch

from offload_engine.optim import AdamW8bit, CPUAdam, PagedAdamW, PagedAdamW8bit
from tolerances import SCHEDULE, STEP_VS_TORCH

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# peft calls a deprecated transformers helper; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

INT8_BLOCK = 256          # the default block of the 8-bit state
MIN_PAGE_MB = 4096 / 2**20  # the smallest page (one 4 KiB block): params span many pages


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one intra-op thread is much faster (and steadier on a busy 2-core
    runner, where OpenMP threads spin against each other) than the default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- tiny models and data --------------------------------------------------------------------
VOCAB, SEQ = 64, 16


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(initializer_range=0.02):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=32, initializer_range=initializer_range,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def pattern_ids(n: int, seed: int = 0) -> torch.Tensor:
    """Sequences counting up modulo 8 inside one of 8 bands of the vocabulary: after the
    first token every next token is determined, so the loss can fall far below ln(64)."""
    g = torch.Generator().manual_seed(seed)
    band = torch.randint(0, VOCAB // 8, (n, 1), generator=g)
    phase = torch.randint(0, 8, (n, 1), generator=g)
    return band * 8 + (torch.arange(SEQ) + phase) % 8


class PatternDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        self.ids = pattern_ids(n)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out_dir, max_steps, save_strategy="no", **extra):
    return transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=8, max_steps=max_steps, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy=save_strategy, disable_tqdm=True, seed=0, data_seed=0,
        dataloader_num_workers=0, **extra)


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def int8_state_bytes(numel: int, block: int = INT8_BLOCK) -> int:
    """Two moments, each codes padded to whole blocks plus one float32 absmax per block."""
    blocks = -(-numel // block)
    return 2 * (blocks * block + 4 * blocks)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32)


# ---- Trainer -----------------------------------------------------------------------------------
def test_trainer_paged_adamw8bit(tmp_path):
    """Trainer drives PagedAdamW8bit and a transformers schedule; the loss falls and the
    big matrices really keep 8-bit state in the pages."""
    model = tiny_gpt2()
    min_8bit = 1024
    opt = PagedAdamW8bit(model.parameters(), lr=2e-2, min_8bit_size=min_8bit)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=30)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, 30), train_dataset=PatternDataset(),
                                   optimizers=(opt, sched))
    result = trainer.train()

    assert result.global_step == trainer.state.global_step == 30
    losses = logged_losses(trainer)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    # Observed: 3.90 -> ~0.8 (mean of the last five); a broken optimizer stays near ln(64) = 4.16.
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses

    stats = opt.paging_stats()
    assert stats["steps"] == 30 and stats["store"] == "cpu"
    assert sched.last_epoch == 30
    params = dict(model.named_parameters())
    formats = {name: opt.state[p]["format"] for name, p in params.items()}
    assert formats == {name: "int8" if p.numel() >= min_8bit else "fp32" for name, p in params.items()}
    assert formats["transformer.h.0.mlp.c_fc.weight"] == "int8"
    assert all(int(opt.state[p]["step"]) == 30 for p in params.values())
    expected = sum(int8_state_bytes(p.numel()) if p.numel() >= min_8bit else 8 * p.numel() for p in params.values())
    assert stats["state_bytes"] == expected
    assert 0 < stats["state_bytes"] < 8 * sum(p.numel() for p in params.values())  # less than fp32 state

    big = params["transformer.h.0.mlp.c_fc.weight"]
    logical = opt.logical_state(big)
    assert int(logical["step"]) == 30
    assert logical["exp_avg"].shape == big.shape and logical["exp_avg"].abs().sum() > 0
    assert (logical["exp_avg_sq"] >= 0).all() and logical["exp_avg_sq"].sum() > 0
    opt.close()


def test_trainer_paged_adamw_nvme_matches_unpaged(tmp_path):
    """PagedAdamW with its state in a file under nvme_path, driven by Trainer: the pages go
    through the file every step, the run is bit for bit the one with CPUAdam (the unpaged
    fp32 AdamW), and close() removes the file."""
    nvme_dir = tmp_path / "nvme"
    steps = 10

    def train(make_opt, out):
        model = tiny_gpt2()
        opt = make_opt(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
        trainer = transformers.Trainer(model=model, args=training_args(tmp_path / out, steps),
                                       train_dataset=PatternDataset(), optimizers=(opt, sched))
        trainer.train()
        assert trainer.state.global_step == steps
        return model, opt, logged_losses(trainer)

    model, opt, losses = train(lambda ps: PagedAdamW(ps, lr=1e-2, store="nvme", nvme_path=str(nvme_dir),
                                                     page_size_mb=0.0625), "paged")
    stats = opt.paging_stats()
    assert stats["store"] == "nvme" and stats["steps"] == steps
    assert stats["num_pages"] > 1
    path = stats["path"]
    assert os.path.dirname(path) == str(nvme_dir) and os.path.getsize(path) >= stats["state_bytes"]
    assert stats["totals"]["bytes_read"] > 0 and stats["totals"]["bytes_written"] > 0
    assert stats["state_bytes"] == 8 * sum(p.numel() for p in model.parameters())
    assert losses[-1] < 0.85 * losses[0], losses  # observed 3.91 -> 2.72

    ref_model, _, ref_losses = train(lambda ps: CPUAdam(ps, lr=1e-2, weight_decay=1e-2), "unpaged")
    assert losses == ref_losses
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(bits(p), bits(q)), name

    opt.close()
    assert not os.path.exists(path)


def test_trainer_builds_paged_optimizer_itself(tmp_path):
    """Trainer(optimizer_cls_and_kwargs=...) makes the optimizer from the class: its param
    groups (weight decay except for biases and norms) and its own schedule from the
    TrainingArguments."""
    if "optimizer_cls_and_kwargs" not in inspect.signature(transformers.Trainer).parameters:
        pytest.skip("this transformers has no Trainer(optimizer_cls_and_kwargs=...)")
    model = tiny_gpt2()
    args = training_args(tmp_path, 10, learning_rate=2e-2, weight_decay=0.1, lr_scheduler_type="cosine",
                         warmup_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=PatternDataset(),
                                   optimizer_cls_and_kwargs=(PagedAdamW8bit, {"lr": 2e-2, "min_8bit_size": 1024}))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(opt, PagedAdamW8bit)
    assert opt.paging_stats()["steps"] == trainer.state.global_step == 10
    decay = {id(p) for group in opt.param_groups if group["weight_decay"] == 0.1 for p in group["params"]}
    named = dict(model.named_parameters())
    assert id(named["transformer.h.0.mlp.c_fc.weight"]) in decay
    assert id(named["transformer.h.0.mlp.c_fc.bias"]) not in decay and id(named["transformer.ln_f.weight"]) not in decay
    assert all(group["lr"] == pytest.approx(0.0, abs=SCHEDULE.atol) for group in opt.param_groups)  # cosine ran to its end
    assert opt.state[named["transformer.h.0.mlp.c_fc.weight"]]["format"] == "int8"
    losses = logged_losses(trainer)
    assert losses[-1] < 0.85 * losses[0], losses  # observed 3.91 -> 2.76
    opt.close()


def test_trainer_resume_from_checkpoint(tmp_path):
    """The Trainer saves the paged state with optimizer.state_dict() (optimizer.pt) and a
    resumed run loads it into a fresh optimizer: it ends bit for bit where an uninterrupted
    run does."""
    def run(steps, resume=None):
        model = tiny_gpt2()
        opt = PagedAdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=1024, page_size_mb=0.0625)
        sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
        args = training_args(tmp_path / "out", steps, save_strategy="steps", save_steps=5)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=PatternDataset(),
                                       optimizers=(opt, sched))
        trainer.train(resume_from_checkpoint=resume)
        return model, opt

    full, full_opt = run(10)
    checkpoint = tmp_path / "out" / "checkpoint-5"
    assert (checkpoint / "optimizer.pt").is_file()
    resumed, resumed_opt = run(10, resume=str(checkpoint))
    assert resumed_opt.paging_stats()["steps"] == 5  # only the second half ran here
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(bits(p), bits(q)), name
        assert torch.equal(full_opt.logical_state(p)["exp_avg"], resumed_opt.logical_state(q)["exp_avg"]), name
    full_opt.close()
    resumed_opt.close()


# ---- peft LoRA ---------------------------------------------------------------------------------
LORA_TARGETS = ["q_proj", "v_proj"]

OPTIMIZERS = {
    "PagedAdamW": lambda ps: PagedAdamW(ps, lr=3e-2),
    "PagedAdamW8bit": lambda ps: PagedAdamW8bit(ps, lr=3e-2, min_8bit_size=64),
    "AdamW8bit": lambda ps: AdamW8bit(ps, lr=3e-2, min_8bit_size=64),
    "CPUAdam": lambda ps: CPUAdam(ps, lr=3e-2, weight_decay=1e-2),
}


def lora_model():
    # A wider init than Llama's 0.02 so the frozen lm_head lets the adapters move the loss.
    model = tiny_llama(initializer_range=0.2)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return peft.get_peft_model(model, config)


def train_loop(model, opt, steps, ids):
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("which", ["trainable", "all"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lora_state_only_for_adapters(name, which):
    """State for exactly the LoRA params, whether the optimizer got the trainable params
    (the usual way) or all of model.parameters() (frozen ones have grad None); the frozen
    base is unchanged bit for bit."""
    model = lora_model()
    named = dict(model.named_parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p for n, p in named.items() if not p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n, p in named.items() if p.requires_grad)
    frozen_before = {n: p.detach().clone() for n, p in frozen.items()}
    lora_before = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}

    opt = OPTIMIZERS[name](trainable if which == "trainable" else model.parameters())
    losses = train_loop(model, opt, 12, pattern_ids(8))

    with_state = {id(p) for p, state in opt.state.items() if state}
    assert with_state == {id(p) for p in trainable}
    assert not any(id(p) in {id(q) for q in opt.state} for p in frozen.values())
    assert all(int(opt.state[p]["step"]) == 12 for p in trainable)
    for n, p in frozen.items():
        assert p.grad is None and torch.equal(bits(p), bits(frozen_before[n])), n
    for n, before in lora_before.items():
        assert not torch.equal(named[n], before), n
        if "lora_B" in n:  # starts at zero
            assert named[n].abs().sum() > 0, n
    assert losses[-1] < 0.7 * losses[0], losses  # observed 4.71 -> 2.35

    formats = {opt.state[p]["format"] for p in trainable}
    assert formats == ({"int8"} if "8bit" in name else {"fp32"})  # min_8bit_size=64 < 128 elements
    if hasattr(opt, "paging_stats"):
        if which == "trainable":
            # What the adapters' state costs, no more: fp32, 2 moments x 4 bytes per element;
            # int8, codes padded to a whole block plus an absmax per block, per moment.
            # state_bytes counts no alignment padding (layout.StateFormat.logical_bytes).
            per_param = int8_state_bytes if "8bit" in name else (lambda n: 8 * n)
            assert opt.paging_stats()["state_bytes"] == sum(per_param(p.numel()) for p in trainable)
        opt.close()


@pytest.mark.parametrize("store", ["cpu", "nvme"])
def test_paged_reserves_nothing_for_frozen_params(store, tmp_path):
    """Given all of model.parameters() under LoRA, the pages should hold what the
    trainable params need, as when given only those."""
    model = lora_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    nvme = {"store": "nvme", "nvme_path": str(tmp_path)} if store == "nvme" else {}
    opt = PagedAdamW(model.parameters(), lr=3e-2, page_size_mb=MIN_PAGE_MB, **nvme)
    try:
        train_loop(model, opt, 1, pattern_ids(8))
        assert opt.paging_stats()["state_bytes"] == 8 * sum(p.numel() for p in trainable)
    finally:
        opt.close()


# ---- plain loop with a torch scheduler -------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=1e-4),
    # lr 0 every third step: those steps must leave the params exactly as they were.
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s % 3 == 2 else 1 / (1 + s)),
}
PAIRS = {  # paged optimizer, its unpaged equivalent (paged.py: bit for bit the same results)
    "fp32": (lambda groups: PagedAdamW(groups, lr=1e-2, page_size_mb=MIN_PAGE_MB),
             lambda groups: CPUAdam(groups, lr=1e-2, weight_decay=1e-2)),
    "int8": (lambda groups: PagedAdamW8bit(groups, lr=1e-2, page_size_mb=MIN_PAGE_MB, min_8bit_size=256),
             lambda groups: AdamW8bit(groups, lr=1e-2, min_8bit_size=256)),
}


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 8))


def param_groups(model):
    """Weights and biases in two groups with their own lr and weight decay."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "lr": 3e-2, "weight_decay": 0.0}]


def scheduled_run(make_opt, make_sched, steps=12):
    """Params after every step, and the lrs of the groups each step ran with."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 64, generator=g), torch.randn(32, 8, generator=g)
    model = mlp()
    opt = make_opt(param_groups(model))
    sched = make_sched(opt)
    history, lrs = [], []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        lrs.append([group["lr"] for group in opt.param_groups])
        opt.step()
        sched.step()
        assert [group["lr"] for group in opt.param_groups] == sched.get_last_lr()
        history.append([p.detach().clone() for p in model.parameters()])
    return history, lrs, opt


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("fmt", list(PAIRS))
def test_torch_scheduler_drives_paged_optimizer(fmt, sched_name):
    make_paged, make_unpaged = PAIRS[fmt]
    make_sched = SCHEDULERS[sched_name]
    paged, paged_lrs, opt = scheduled_run(make_paged, make_sched)
    unpaged, unpaged_lrs, _ = scheduled_run(make_unpaged, make_sched)
    assert opt.paging_stats()["num_pages"] > 1  # the big params span pages
    assert paged_lrs == unpaged_lrs and len({tuple(lr) for lr in paged_lrs}) > 2  # the lr did change
    for step, (ps, qs) in enumerate(zip(paged, unpaged)):
        for i, (p, q) in enumerate(zip(ps, qs)):
            assert torch.equal(bits(p), bits(q)), (step, i)
    # The optimizer really applies the scheduler's lr: without the schedule it ends elsewhere,
    constant, _, _ = scheduled_run(make_paged, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert not all(torch.equal(p, c) for p, c in zip(paged[-1], constant[-1]))
    if sched_name == "LambdaLR":  # and an lr of 0 moves nothing,
        for step, lr in enumerate(paged_lrs):
            if step and lr[0] == 0.0:
                assert all(torch.equal(bits(p), bits(q)) for p, q in zip(paged[step], paged[step - 1])), step
    if fmt == "fp32":  # and the steps are AdamW's under the scheduled lrs.
        reference, _, _ = scheduled_run(lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=1e-2),
                                        make_sched)
        for step, (ps, rs) in enumerate(zip(paged, reference)):
            for p, r in zip(ps, rs):
                STEP_VS_TORCH[torch.float32].check(p, r, msg=f"step {step}")
    opt.close()


# ---- LoRA through the engine -------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    {"optimizer": {"type": "PagedAdamW8bit", "params": {"lr": 3e-2, "min_8bit_size": 64}}},
    {"optimizer": {"type": "AdamW", "params": {"lr": 3e-2}}, "bf16": {"enabled": True},
     "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
], ids=["paged-int8", "bf16-offload-cpu"])
def test_lora_through_the_engine_holds_state_for_adapters_only(config):
    """offload_engine.initialize on a peft model: state (moments and, with bf16, fp32 masters)
    for the trainable adapter params alone, and the memory report shows it."""
    import offload_engine

    model = lora_model()
    named = dict(model.named_parameters())
    frozen_before = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    engine, opt, _, _ = offload_engine.initialize(model, {"train_micro_batch_size_per_gpu": 2,
                                                          "paging": {"page_size_mb": MIN_PAGE_MB}, **config})
    ids = pattern_ids(8)
    losses = []
    for _ in range(12):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with_state = {n for n, p in model.named_parameters() if opt.state.get(p)}
    assert with_state == set(trainable)
    n_trainable = sum(p.numel() for p in trainable.values())
    report = engine.memory_report()
    assert report["params"]["trainable_count"] == n_trainable < report["params"]["count"] // 10
    assert report["optimizer"]["elements_with_state"] == n_trainable
    assert report["optimizer"]["store"] == "cpu"
    stats = opt.paging_stats()
    if config.get("bf16"):  # fp32 moments + fp32 master: 12 bytes per trainable element
        assert stats["state_bytes"] == 12 * n_trainable
    else:
        assert stats["state_bytes"] == sum(int8_state_bytes(p.numel()) if p.numel() >= 64 else 8 * p.numel()
                                           for p in trainable.values())
    for n, p in model.named_parameters():
        if n in frozen_before:
            expected = frozen_before[n]
            assert torch.equal(p.detach(), expected.to(p.dtype)), n
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    opt.close()


# ---- an engine config with "auto" values, through the Trainer -----------------------------------
HF_ZERO2 = Path(__file__).parent / "fixtures" / "hf_ds_config_zero2.json"


def test_trainer_optimizers_fill_auto_as_the_trainer_fills_deepspeeds(tmp_path):
    from offload_engine.hf import trainer_optimizers

    model = tiny_gpt2()
    args = training_args(tmp_path / "out", 10, learning_rate=3e-3, adam_beta1=0.8, weight_decay=0.05,
                         warmup_steps=3)
    opt, sched = trainer_optimizers(HF_ZERO2, model, args)
    group = opt.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (
        pytest.approx(0.0), (0.8, 0.999), 1e-8, 0.05)  # the warmup starts at warmup_min_lr 0
    assert (sched.warmup_num_steps, sched.total_num_steps, sched.max_lrs) == (3, 10, [3e-3] * len(opt.param_groups))
    # offload_optimizer device cpu: the fp32 state in host pages, as the engine reads the same config
    assert isinstance(opt, PagedAdamW) and len(group["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="gradient_clipping"):  # a value in both places that disagrees
        cfg = json.loads(HF_ZERO2.read_text())
        cfg["gradient_clipping"] = 0.5
        trainer_optimizers(cfg, model, args)
    with pytest.raises(ValueError, match="num_training_steps= or set TrainingArguments.max_steps"):
        trainer_optimizers(HF_ZERO2, model, training_args(tmp_path / "out", -1, num_train_epochs=1))


def test_trainer_with_an_auto_config_resumes_bit_for_bit(tmp_path):
    from offload_engine.hf import trainer_optimizers

    def run(resume=None):
        model = tiny_gpt2()
        args = training_args(tmp_path / "out", 10, save_strategy="steps", save_steps=5, learning_rate=1e-2,
                             warmup_steps=2)
        opt, sched = trainer_optimizers(HF_ZERO2, model, args)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=PatternDataset(),
                                       optimizers=(opt, sched))
        trainer.train(resume_from_checkpoint=resume)
        return model, opt, sched, logged_losses(trainer)

    full, full_opt, full_sched, losses = run()
    assert losses[-1] < losses[0]
    resumed, resumed_opt, resumed_sched, _ = run(resume=str(tmp_path / "out" / "checkpoint-5"))
    assert resumed_sched.last_batch_iteration == full_sched.last_batch_iteration == 9
    assert resumed_opt.paging_stats()["steps"] == 5  # it did resume: only the second half ran here
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(bits(p), bits(q)), name
        assert torch.equal(full_opt.logical_state(p)["exp_avg"], resumed_opt.logical_state(q)["exp_avg"]), name
    full_opt.close()
    resumed_opt.close()


# ---- QLoRA on CPU: a bitsandbytes 4-bit base, a peft adapter, our 8-bit paged state -----------
def qlora_model(saved):
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(saved, quantization_config=quant, device_map="cpu")
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def test_qlora_on_cpu_through_the_trainer(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    saved = tmp_path / "base"
    tiny_llama().save_pretrained(saved)

    def run(make_opt):
        torch.manual_seed(0)
        model = qlora_model(saved)
        packed = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        adapters = [p for p in model.parameters() if p.requires_grad]
        opt = make_opt(adapters)
        trainer = transformers.Trainer(model=model, args=training_args(tmp_path / "out", 12, learning_rate=1e-2),
                                       train_dataset=PatternDataset(), optimizers=(opt, None))
        trainer.train()
        return model, opt, packed, adapters, logged_losses(trainer)

    model, opt, packed, adapters, losses = run(
        lambda ps: PagedAdamW8bit(ps, lr=1e-2, min_8bit_size=0, page_size_mb=MIN_PAGE_MB))
    assert packed and all(isinstance(dict(model.named_modules())[n], bnb.nn.Linear4bit) for n in packed)
    for name, module in model.named_modules():  # the 4-bit base is frozen: its packed codes unchanged
        if name in packed:
            assert torch.equal(module.weight, packed[name]), name
    assert sum(losses[-3:]) < sum(losses[:3])
    # state for the adapters only, 8-bit
    assert opt.paging_stats()["state_bytes"] == sum(int8_state_bytes(p.numel()) for p in adapters)
    # and bit for bit the unpaged 8-bit optimizer's run
    _, twin, _, twin_adapters, twin_losses = run(lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=0))
    assert losses == twin_losses
    for p, q in zip(adapters, twin_adapters):
        assert torch.equal(bits(p), bits(q))
    opt.close()
