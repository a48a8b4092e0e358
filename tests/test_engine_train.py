"""engine/train.py on tiny models: the loss mask, learning, saving, multi-image rows, mixed-in data."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import set_seed

from vlmexp.config import Config
from vlmexp.engine.mix import mix_samples
from vlmexp.engine.predict import predict
from vlmexp.engine.samples import build_samples, split_turn
from vlmexp.engine.train import train_fold, training_dataset
from vlmexp.engine.trainer import build_trainer
from vlmexp.metrics import score
from vlmexp.models.load import load_for_inference, load_model, load_processor
from vlmexp.prompts.render import load_template
from vlmexp.tables import prob_columns

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "smolvlm", "llava"]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
LABELS = list(COLOURS)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> pd.DataFrame:
    """96 noisy solid-colour images, classes in turn: rows 0-63 train, 64-95 held out."""
    d = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(96):
        label = LABELS[i % 4]
        arr = np.clip(np.array(COLOURS[label]) + rng.normal(0, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i}.png")
        rows.append(
            {"id": str(i), "image": str(d / f"{i}.png"), "label": label, "reason": f"mostly {label}."}
        )
    return pd.DataFrame(rows)


def _cfg(tiny_models, family: str, **train) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_models(family))
    cfg.lora.r, cfg.lora.dropout = 8, 0.0
    cfg.predict.max_new_tokens = 8
    for key, value in {
        "epochs": 1.0,
        "batch_size": 4,
        "logging_steps": 1,
        "warmup_ratio": 0.0,
        **train,
    }.items():
        setattr(cfg.train, key, value)
    return cfg


def _samples(df, cfg, prompt="baseline", with_answer=True):
    samples = build_samples(
        df, labels=LABELS, descriptions={}, template=load_template(prompt), cfg=cfg, with_answer=with_answer
    )
    for s, label in zip(samples, df["label"], strict=True):
        s["label"] = label
    return samples


def _two_images(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose image cell names two images, e.g. "3.png|4.png"."""
    out = df.copy()
    out["image"] = [f"{a}|{b}" for a, b in zip(df["image"], np.roll(df["image"].to_numpy(), 1), strict=True)]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_answer_and_end_of_turn_are_supervised(family, tiny_models, colours, tmp_path):
    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    samples = (
        _samples(colours[:1], cfg)
        + _samples(colours[1:2], cfg, prompt="reason_label")
        + _samples(_two_images(colours[2:3]), cfg, prompt="cot")
    )
    model = load_model(cfg, training=True)
    trainer = build_trainer(cfg, model, processor, training_dataset(cfg, processor, samples), tmp_path)
    rows = [trainer.train_dataset[i] for i in range(len(samples))]
    batch = trainer.data_collator(rows)
    tok = processor.tokenizer
    image_ids = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<image>") if t in tok.get_vocab()}
    for i, sample in enumerate(samples):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        supervised = labels != -100
        answer = sample["messages"][-1]["content"][0]["text"]
        turn = split_turn(processor, sample["messages"][:-1])
        # exactly the completion's own tokens (what predict scores), nothing of the prompt/image/padding
        assert tok.decode(ids[supervised]) == turn.lead + answer + turn.eot
        assert ids[supervised].tolist() == tok(turn.completion(answer), add_special_tokens=False)["input_ids"]
        assert torch.equal(labels[supervised], ids[supervised])
        assert not set(ids[supervised].tolist()) & image_ids
        assert (ids[~supervised] == list(image_ids)[0]).sum() > 0  # the image tokens are there, unsupervised
        # one contiguous run, ending at the row's last real token
        where = supervised.nonzero().flatten()
        assert where.tolist() == list(range(where[0], where[-1] + 1))
        assert where[-1] == batch["attention_mask"][i].nonzero().max()
    assert answer.count("\n") >= 1 and answer.endswith("Label: " + samples[-1]["label"])


def test_lora_training_lowers_loss_changes_only_lora_and_saves_a_reloadable_adapter(
    tiny_models, colours, tmp_path
):
    cfg = _cfg(tiny_models, "qwen2_vl", epochs=4.0, lr=5e-3, eval=False)
    processor = load_processor(cfg)
    set_seed(0)
    model = load_model(cfg, training=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logs: list[dict] = []
    result = train_fold(
        cfg, model, processor, _samples(colours[:16], cfg), [], LABELS, tmp_path, on_log=logs.append
    )

    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
    assert [e["step"] for e in logs if "loss" in e] == list(range(1, 17)) and logs[0]["max_steps"] == 16
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapter now does something

    assert result.best_metric is None and result.best_epoch == 4.0
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    val = _samples(colours[64:72], cfg, with_answer=False)
    mine = predict(cfg, model, processor, val, LABELS, progress=False)
    reloaded = predict(
        cfg, load_for_inference(cfg, result.adapter_dir), processor, val, LABELS, progress=False
    )
    np.testing.assert_allclose(mine[prob_columns(LABELS)], reloaded[prob_columns(LABELS)], atol=1e-5)


def test_learns_an_easy_colour_task_and_keeps_the_best_epoch(tiny_models, colours, tmp_path):
    # Full fine-tuning: a random tiny model's LM head caps its logits near zero, which LoRA alone
    # lifts only slowly; trained weights everywhere learn this task in a few seconds.
    cfg = _cfg(tiny_models, "qwen2_vl", epochs=6.0, lr=2e-3, batch_size=4, logging_steps=8)
    cfg.model.finetune = "full"
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    train, held_out = _samples(colours[:64], cfg), _samples(colours[64:], cfg, with_answer=False)
    logs: list[dict] = []
    result = train_fold(cfg, model, processor, train, held_out, LABELS, tmp_path, on_log=logs.append)

    evals = [e for e in result.log_history if "eval_macro_f1" in e]
    assert [e["epoch"] for e in evals] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert [e for e in logs if "eval_accuracy" in e] and result.best_metric == max(
        e["eval_macro_f1"] for e in evals
    )
    gold = colours["label"][64:]
    for mode in ("score", "generate"):
        cfg.predict.mode = mode
        table = predict(cfg, model, processor, held_out, LABELS, progress=False)
        metrics = score(gold, table["pred"], LABELS)
        assert metrics["accuracy"] >= 0.6, (mode, metrics)
        if mode == "score":  # the model holds the best epoch's weights, not the last epoch's
            assert metrics["macro_f1"] == pytest.approx(result.best_metric)
    assert (result.adapter_dir / "model.safetensors").exists()  # finetune=full saves the whole model


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_image_rows_train(family, tiny_models, colours, tmp_path):
    cfg = _cfg(tiny_models, family, eval=False, lr=5e-3)
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    samples = _samples(_two_images(colours[:4]), cfg)
    assert all(len(s["images"]) == 2 for s in samples)
    result = train_fold(cfg, model, processor, samples, [], LABELS, tmp_path)
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert losses and all(np.isfinite(losses))


def _mix_file(tmp_path, colours) -> str:
    records = [
        {
            "messages": [
                {"role": "user", "content": f"Capital no. {i}?"},
                {"role": "assistant", "content": f"City {i}"},
            ]
        }
        for i in range(8)
    ]
    records.append(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Some colour"}]},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "Yes, sure"},
            ],
            "images": [colours["image"][0]],
        }
    )
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    return str(path)


def test_mixed_in_general_samples_are_trained_on(tiny_models, colours, tmp_path):
    cfg = _cfg(tiny_models, "smolvlm", eval=False, lr=5e-3)
    cfg.train.mix_dataset, cfg.train.mix_ratio = _mix_file(tmp_path, colours), 0.5
    picks = [s["id"] for s in mix_samples(cfg, 8)]
    assert len(picks) == 4 and len(set(picks)) == 4 and picks == [s["id"] for s in mix_samples(cfg, 8)]
    cfg.seed += 1
    assert [s["id"] for s in mix_samples(cfg, 8)] != picks  # the seed decides which lines

    cfg.train.mix_ratio = 9 / 8  # all nine lines, so the image + multi-turn one is in
    processor = load_processor(cfg)
    samples = _samples(colours[:8], cfg)
    dataset = training_dataset(cfg, processor, samples)
    assert len(dataset) == 17
    completions = [r["completion"] for r in dataset]
    assert sum(c.startswith(" City ") for c in completions) == 8
    assert " Yes, sure<end_of_utterance>" in completions
    model = load_model(cfg, training=True)
    result = train_fold(cfg, model, processor, samples, [], LABELS, tmp_path / "fold")
    assert [e["step"] for e in result.log_history if "loss" in e] == [1, 2, 3, 4, 5]  # 17 rows / 4


def test_a_prompt_longer_than_max_length_fails_loud(tiny_models, colours, tmp_path):
    cfg = _cfg(tiny_models, "llava", max_length=12)
    processor = load_processor(cfg)
    samples = _samples(colours[:2], cfg)
    trainer = build_trainer(
        cfg, load_model(cfg), processor, training_dataset(cfg, processor, samples), tmp_path
    )
    with pytest.raises(ValueError, match="longer than train.max_length=12"):
        trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_trainer_loss_is_the_plain_full_logits_loss_with_the_same_gradients(
    family, tiny_models, colours, tmp_path
):
    # trl 1.16 scores only the supervised positions through its fused LM head (compact on CUDA,
    # chunked here); it must give what transformers' full-logits loss gives, gradients included.
    from vlmexp.bench.answer_only_loss import answer_only_loss

    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    set_seed(0)
    model = load_model(cfg, training=True)
    samples = _samples(colours[:3], cfg) + _samples(colours[3:4], cfg, prompt="reason_label")
    trainer = build_trainer(cfg, model, processor, training_dataset(cfg, processor, samples), tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(samples))])
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    model.train()
    got, g_got = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)))
    want, g_want = loss_and_grads(lambda: model(**batch).loss)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in g_want) > 0
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    if family == "qwen2_5_vl":  # the bench's loop-side loss is the same function too
        with torch.no_grad():
            torch.testing.assert_close(answer_only_loss(model, batch), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_probed_shape_from_the_run_encoder_equals_the_processors(tiny_models, colours, family):
    from vlmexp.engine.run_caches import RunCaches
    from vlmexp.engine.trainer import _probe_shape

    cfg = _cfg(tiny_models, family)
    processor = load_processor(cfg)
    dataset = training_dataset(cfg, processor, _samples(colours[:4], cfg))
    encoder = RunCaches.for_run(cfg, processor).encoder
    plain = _probe_shape(cfg, processor, dataset)
    assert plain[0] > 0 and plain[1] > 0
    assert _probe_shape(cfg, processor, dataset, encoder=encoder) == plain
    assert encoder.misses == 4  # the rows are now encoded for the fold's batches


def test_checkpointing_decision_from_the_probed_shape(tiny_models, colours, tmp_path):
    from vlmexp.engine import memory
    from vlmexp.engine.trainer import _probe_shape

    cfg = _cfg(tiny_models, "qwen2_5_vl")
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    dataset = training_dataset(cfg, processor, _samples(colours[:4], cfg))
    tokens, patches = _probe_shape(cfg, processor, dataset)
    trainer = build_trainer(cfg, model, processor, dataset, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert tokens == batch["input_ids"].shape[1]  # the longest row, as the collator pads it
    assert patches == int(batch["image_grid_thw"][0].prod()) > 0
    need = memory.activation_bytes(model, cfg.train.batch_size, tokens, patches)
    decide = memory.gradient_checkpointing_needed
    assert decide("auto", model, cfg.train.batch_size, tokens, patches, free_bytes=need)[0] is True
    assert decide("auto", model, cfg.train.batch_size, tokens, patches, free_bytes=2 * need)[0] is False
    cfg.model.finetune = "full"  # full fine-tuning adds 12 bytes per weight (gradient + AdamW moments)
    full = load_model(cfg, training=True)
    n_full = sum(p.numel() for p in full.parameters())
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gap = memory.activation_bytes(full, 4, tokens, patches) - memory.activation_bytes(
        model, 4, tokens, patches
    )
    assert gap > 12 * (n_full - n_lora)  # and the vision tower's activations, now that it trains


@pytest.mark.gpu
def test_bf16_training_on_cuda_feeds_lora_bf16_inputs_and_validates_between(tiny_models, colours, tmp_path):
    # speed.lora_bf16_inputs: inside training steps (autocast) lora_A gets bf16 inputs; validation between
    # them runs without autocast, where the cast must be back on (a bf16 input to fp32 weights fails).
    cfg = _cfg(tiny_models, "qwen2_vl", epochs=2.0, lr=5e-3, eval=True)
    processor = load_processor(cfg)
    set_seed(0)
    model = load_model(cfg, training=True).cuda()
    seen: set[torch.dtype] = set()
    for name, m in model.named_modules():
        if name.endswith("lora_A.default") and "visual" not in name:
            m.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype) if _m.training else None)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    train, val = _samples(colours[:16], cfg), _samples(colours[64:72], cfg, with_answer=False)
    result = train_fold(cfg, model, processor, train, val, LABELS, tmp_path)
    assert seen == {torch.bfloat16}
    assert result.val_table is not None and len(result.val_table) == 8
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in before)


@pytest.mark.gpu
def test_batches_reach_the_gpu_without_a_host_sync(tiny_models, colours, tmp_path):
    # A blocking copy of each batch tensor waited for the GPU's queue to drain at every step's start.
    from transformers import TrainerCallback

    from vlmexp.bench.profile import SyncSites

    class Watch(TrainerCallback):
        def __init__(self):
            self.syncs = SyncSites()

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.syncs.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.syncs.__exit__(None, None, None)

    cfg = _cfg(tiny_models, "qwen2_vl", eval=False)
    cfg.train.epochs = 3.0
    processor = load_processor(cfg)
    model = load_model(cfg, training=True).cuda()
    watch = Watch()
    dataset = training_dataset(cfg, processor, _samples(colours[:8], cfg))
    trainer = build_trainer(cfg, model, processor, dataset, tmp_path, callbacks=[watch])
    trainer.train()
    assert sum(watch.syncs.sites.values()) > 0  # the watch works: trl's metrics still sync
    assert not [site for site in watch.syncs.sites if "send_to_device" in site], watch.syncs.report(1)


def test_training_steps_do_not_sync_on_the_loss(tiny_models, colours, tmp_path, monkeypatch):
    # transformers' NaN filter (`torch.isnan(loss)` as a bool) waits for each step's GPU work, so the
    # next batch cannot be collated while the backward runs; the project turns it off.
    cfg = _cfg(tiny_models, "qwen2_vl", eval=False)
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    trainer = build_trainer(
        cfg, model, processor, training_dataset(cfg, processor, _samples(colours[:8], cfg)), tmp_path
    )
    loss_checks = []
    real_isnan = torch.isnan

    def counting_isnan(t, *a, **k):
        if isinstance(t, torch.Tensor) and t.dim() == 0:
            loss_checks.append(t)
        return real_isnan(t, *a, **k)

    monkeypatch.setattr(torch, "isnan", counting_isnan)
    trainer.train()
    assert trainer.state.global_step == 2 and not loss_checks


@pytest.mark.parametrize(("f1s", "best_step"), [((0.2, 0.9), 4), ((0.9, 0.2), 2)])
def test_no_checkpoint_at_the_last_step_and_the_best_weights_kept(
    f1s, best_step, tiny_models, colours, tmp_path, monkeypatch
):
    """2 epochs of 2 steps, validated after each: only checkpoint-2 is written (SkipFinalSave). Best last:
    the weights in memory are the fold's; best first: checkpoint-2's weights are loaded back."""
    from vlmexp.engine.callbacks import EvalCallback

    cfg = _cfg(tiny_models, "qwen2_vl", epochs=2.0, lr=5e-3, batch_size=4)
    processor = load_processor(cfg)
    model = load_model(cfg, training=True)
    scores = iter(f1s)
    weights: dict[int, dict[str, torch.Tensor]] = {}

    def scripted(self, model, step=None):
        weights[step] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        f1 = next(scores)
        return {"eval_accuracy": f1, "eval_macro_f1": f1, "eval_unparsed": 0, "eval_seconds": 0.0}

    monkeypatch.setattr(EvalCallback, "metrics", scripted)
    from vlmexp.engine import async_save

    writers: list[str] = []
    real_save = async_save.torch.save

    def recorded_save(obj, path):
        writers.append(threading.current_thread().name)
        real_save(obj, path)

    monkeypatch.setattr(async_save.torch, "save", recorded_save)
    train, val = _samples(colours[:8], cfg), _samples(colours[64:68], cfg, with_answer=False)
    result = train_fold(cfg, model, processor, train, val, LABELS, tmp_path)
    assert sorted(weights) == [2, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    # checkpoint-2's optimizer state was written by the background writer, and is complete on disk
    assert "vlmexp-checkpoint" in writers
    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    assert (ckpt / "optimizer.pt").exists() and not list(ckpt.glob("*.tmp"))
    assert result.best_metric == 0.9 and result.best_epoch == best_step / 2
    assert not torch.equal(weights[2][next(iter(weights[2]))], weights[4][next(iter(weights[4]))])
    for name, p in model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p.detach(), weights[best_step][name], rtol=0, atol=0, msg=name)
