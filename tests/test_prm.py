"""The PRM (SPEC §6): loss by hand, collator checks, real training steps on a tiny LLaVA,
save/load and step scoring.  GPU/DeepSpeed checks skip with a visible reason."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mmprm_tasks.prm import (
    IGNORE_LABEL,
    PRM_CONFIG_FILE,
    PRMCollator,
    PRMDataError,
    PRMScorer,
    PRMTokens,
    PRMTrainingConfig,
    StepLikelihoodScorer,
    ensure_prm_tokens,
    prm_loss,
    resolve_deepspeed_config,
    train_prm,
)
from mmprm_tasks.settings import TOY_FOUNDATION_DIR, TrainConfig

# ------------------------------------------------------------------------------- fixtures


def png_bytes(color=(200, 30, 30), size=64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def build_tiny_checkpoint(out: Path) -> Path:
    """A random tiny LLaVA from the toy builders (smaller than the toy policy, for speed)."""
    from mmprm_tasks.toy.model import build_tiny_vlm
    from mmprm_tasks.toy.tokenizer import build_tokenizer

    model, processor = build_tiny_vlm(
        build_tokenizer(), vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=2, seed=0
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def processor_tokens(tiny_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    return processor, ensure_prm_tokens(processor)


RED, BLUE = png_bytes((220, 20, 20)), png_bytes((20, 20, 220))
RECORDS = [
    {
        "id": 0,
        "question": "What is 3 + 4?",
        "process": "3 + 4 = 7.<prm>\n\nThe answer is 7.<prm>",
        "labels": [1.0, 1.0],
        "image": RED,
    },
    {
        "id": 1,
        "question": "What is 3 + 4?",
        "process": "3 + 4 = 8.<prm>",
        "labels": [0.0],
        "image": RED,
    },
    {
        "id": 2,
        "question": "What is 5 * 2?",
        "process": "5 * 2 = 10.<prm>\n\n10 - 1 = 8.<prm>\n\nThe answer is 8.<prm>",
        "labels": [1.0, 0.0, 0.0],
        "image": BLUE,
    },
    {
        "id": 3,
        "question": "What is 5 * 2?",
        "process": "5 * 2 = 10.<prm>\n\nThe answer is 10.<prm>",
        "labels": [0.75, 1.0],
        "image": BLUE,
    },
]


# ----------------------------------------------------------------------------------- loss

PRM, YES, NO = 3, 1, 2


def _hand_logits():
    # batch 1, seq 4, vocab 5; <prm> at positions 1 and 3
    ids = torch.tensor([[0, PRM, 4, PRM]])
    logits = torch.zeros(1, 4, 5)
    logits[0, 1, YES], logits[0, 1, NO] = 2.0, 0.0  # p_yes = sigmoid(2)
    logits[0, 3, YES], logits[0, 3, NO] = 0.0, 0.0  # p_yes = 0.5
    logits[0, 0] = torch.tensor([5.0, -3.0, 7.0, 1.0, 0.0])  # non-<prm> positions: no loss
    logits[0, 2] = torch.tensor([-1.0, 9.0, -9.0, 0.0, 2.0])
    logits[0, 1, 0] = 11.0  # other vocabulary entries at a <prm> position: ignored
    return ids, logits


def test_loss_soft_hand_value():
    ids, logits = _hand_logits()
    p = 1 / (1 + math.exp(-2.0))
    first = -(0.75 * math.log(p) + 0.25 * math.log(1 - p))
    second = -(0.0 * math.log(0.5) + 1.0 * math.log(0.5))
    loss = prm_loss(logits, ids, [[0.75, 0.0]], PRM, YES, NO)
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-6)


def test_loss_hard_hand_value():
    ids, logits = _hand_logits()
    p = 1 / (1 + math.exp(-2.0))
    # hard: 0.75 > 0 -> [1, 0]; 0.0 -> [0, 1]
    expected = (-math.log(p) - math.log(0.5)) / 2
    assert prm_loss(logits, ids, [[0.75, 0.0]], PRM, YES, NO, hard=True).item() == pytest.approx(
        expected, abs=1e-6
    )


def test_loss_only_prm_positions_and_yes_no_contribute():
    ids, logits = _hand_logits()
    logits = logits.clone().requires_grad_(True)
    loss = prm_loss(logits, ids, [[0.75, 0.0]], PRM, YES, NO)
    loss.backward()
    grad = logits.grad[0]
    assert torch.all(grad[[0, 2]] == 0)  # non-<prm> positions
    assert torch.all(grad[:, [0, 3, 4]] == 0)  # vocabulary entries other than Yes/No
    assert torch.all(grad[[1, 3]][:, [YES, NO]] != 0)
    # changing anything outside (<prm> position, Yes/No) leaves the loss unchanged
    other = logits.detach().clone()
    other[0, 0] += 100.0
    other[0, 1, 4] -= 50.0
    assert prm_loss(other, ids, [[0.75, 0.0]], PRM, YES, NO).item() == pytest.approx(loss.item())


def test_loss_label_layouts_agree_and_mismatch_fails():
    ids, logits = _hand_logits()
    aligned = torch.full((1, 4), IGNORE_LABEL)
    aligned[0, 1], aligned[0, 3] = 0.75, 0.0
    values = {
        prm_loss(logits, ids, labels, PRM, YES, NO).item()
        for labels in ([[0.75, 0.0]], [0.75, 0.0], torch.tensor([0.75, 0.0]), aligned)
    }
    assert max(values) - min(values) < 1e-7
    with pytest.raises(PRMDataError):
        prm_loss(logits, ids, [[0.75]], PRM, YES, NO)
    with pytest.raises(PRMDataError):
        prm_loss(logits, ids, [0.75, 0.0, 1.0], PRM, YES, NO)
    with pytest.raises(PRMDataError):
        prm_loss(logits, ids, [[1.5, 0.0]], PRM, YES, NO)  # soft labels live in [0, 1]


def test_loss_without_prm_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = prm_loss(logits, torch.zeros(2, 3, dtype=torch.long), [], PRM, YES, NO)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


# ------------------------------------------------------------------------------- collator


def test_collator_places_labels_at_prm_tokens(processor_tokens):
    processor, tokens = processor_tokens
    batch = PRMCollator(processor, tokens)(RECORDS[:3])
    ids, labels = batch["input_ids"], batch["prm_labels"]
    assert labels.shape == ids.shape
    mask = ids == tokens.prm_token_id
    assert mask.sum(dim=1).tolist() == [2, 1, 3]
    assert labels[mask].tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert torch.all(labels[~mask] == IGNORE_LABEL)
    # right padding: the shorter rows end in padding
    assert batch["attention_mask"][1, -1] == 0 and batch["attention_mask"][2, -1] == 1
    assert batch["pixel_values"].shape[0] == 3
    text = processor.tokenizer.decode(ids[0][batch["attention_mask"][0] == 1])
    assert "Question: What is 3 + 4?\nProcess: 3 + 4 = 7.<prm>\n\nThe answer is 7.<prm>" in text


def test_collator_label_count_mismatch_fails(processor_tokens):
    processor, tokens = processor_tokens
    bad = {**RECORDS[0], "labels": [1.0]}
    with pytest.raises(PRMDataError, match="1 labels"):
        PRMCollator(processor, tokens)([bad])


def test_collator_truncation(processor_tokens):
    processor, tokens = processor_tokens
    full = PRMCollator(processor, tokens)([RECORDS[2]])
    positions = (full["input_ids"][0] == tokens.prm_token_id).nonzero().squeeze(-1).tolist()
    cut = positions[1] + 1  # keeps the first two <prm> tokens
    collator = PRMCollator(processor, tokens, max_length=cut)
    batch = collator([RECORDS[2], RECORDS[1]])
    assert batch["input_ids"].shape[1] == cut
    mask = batch["input_ids"] == tokens.prm_token_id
    assert mask.sum(dim=1).tolist() == [2, 1]
    assert batch["prm_labels"][0][mask[0]].tolist() == [1.0, 0.0]
    assert collator.truncated_examples == 1 and collator.dropped_labels == 1
    with pytest.raises(PRMDataError, match="keeps 2 of 3"):
        PRMCollator(processor, tokens, max_length=cut, truncation="error")([RECORDS[2]])
    with pytest.raises(PRMDataError, match="image tokens"):
        PRMCollator(processor, tokens, max_length=8)([RECORDS[2]])


# ------------------------------------------------------------------------------- training


def _train_cfg(**overrides) -> PRMTrainingConfig:
    values = dict(
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_steps=16,
        per_device_train_batch_size=4,
        logging_steps=1,
    )
    values.update(overrides)
    return PRMTrainingConfig(**values)


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def trained_soft(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prm_soft") / "prm"
    metrics = train_prm(tiny_dir, RECORDS, out, _train_cfg(), seed=0)
    return out, metrics


def test_training_soft_labels_decreases_loss(trained_soft, tiny_dir):
    out, metrics = trained_soft
    losses = [e["loss"] for e in metrics["loss_history"]]
    assert metrics["global_step"] == 16 and len(losses) == 16
    assert _mean(losses[-4:]) < _mean(losses[:4]) - 0.05, losses
    assert metrics["label_mode"] == "soft"
    assert metrics["frozen_params"] > 0 and metrics["trainable_params"] > 0
    assert metrics["bf16"] is False and metrics["deepspeed"] is None
    # the vision tower was frozen: its weights are those of the base checkpoint
    from safetensors.torch import load_file

    base = load_file(str(tiny_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    vision = [k for k in base if "vision_tower" in k]
    text = [k for k in base if "language_model" in k and "layers" in k]
    assert vision and all(torch.equal(base[k], trained[k]) for k in vision)
    assert any(not torch.equal(base[k], trained[k]) for k in text)
    config = json.loads((out / PRM_CONFIG_FILE).read_text())
    assert config["prm_token"] == "<prm>" and config["label_mode"] == "soft"


def test_training_hard_labels_decreases_loss(tiny_dir, tmp_path):
    metrics = train_prm(
        tiny_dir, RECORDS, tmp_path / "prm", _train_cfg(label_mode="hard"), seed=0,
        eval_records=RECORDS[:2],
    )
    losses = [e["loss"] for e in metrics["loss_history"]]
    assert metrics["label_mode"] == "hard"
    assert math.isfinite(metrics["eval_loss"])
    assert _mean(losses[-4:]) < _mean(losses[:4]) - 0.05, losses


def test_scorer_round_trip(trained_soft):
    out, _ = trained_soft
    scorer = PRMScorer(out, batch_size=2)
    steps = [["3 + 4 = 7.", "The answer is 7."], ["3 + 4 = 8."], [], ["a <prm> inside", "b", "c"]]
    scores = scorer.score("What is 3 + 4?", RED, steps)
    assert [len(s) for s in scores] == [2, 1, 0, 3]
    assert all(0.0 < p < 1.0 for row in scores for p in row)
    # batching and padding do not change a candidate's scores
    alone = scorer.score("What is 3 + 4?", RED, [steps[1]])[0]
    assert alone == pytest.approx(scores[1], abs=1e-5)
    # the PRM learned its labels: right steps score higher than wrong ones
    assert scores[0][0] > scores[1][0]
    blue = scorer.score("What is 5 * 2?", BLUE, [["5 * 2 = 10.", "10 - 1 = 8.", "The answer is 8."]])[0]
    assert blue[0] > blue[1]


def test_step_likelihood_spans_cover_the_process_exactly(tiny_dir):
    """The generative-verifier baseline: the step scores multiply to the probability of the whole
    process given the head (no token counted twice, none left out), computed here by a separate
    forward pass over the same text."""
    scorer = StepLikelihoodScorer(tiny_dir, batch_size=2)
    steps = [["3 + 4 = 7.", "The answer is 7."], ["3 + 4 = 8."], ["a", "b", "c"]]
    scores = scorer.score("What is 3 + 4?", RED, steps)
    assert [len(s) for s in scores] == [2, 1, 3]
    assert all(0.0 < p <= 1.0 for row in scores for p in row)
    alone = scorer.score("What is 3 + 4?", RED, [steps[0]])[0]
    assert alone == pytest.approx(scores[0], rel=1e-4)  # padding does not change a candidate

    record = {"id": 0, "question": "What is 3 + 4?", "process": scorer.process_text(steps[0]),
              "labels": [0.0, 0.0], "image": RED}
    full = scorer._inputs([record])
    head_len = scorer._process_starts([record])[0]
    with torch.no_grad():
        logp = torch.log_softmax(scorer.model(**full).logits[0].float(), -1)
    ids = full["input_ids"][0]
    last_prm = int((ids == scorer.tokens.prm_token_id).nonzero().max())
    total = sum(float(logp[t - 1, ids[t]]) for t in range(head_len, last_prm + 1))
    assert math.log(scores[0][0]) + math.log(scores[0][1]) == pytest.approx(total, rel=1e-4)


def test_training_from_train_config_adds_prm_token(tiny_dir, tmp_path):
    """A base checkpoint whose tokenizer lacks <prm>: it is added and the embeddings resized."""
    base = tmp_path / "no_prm"
    shutil.copytree(tiny_dir, base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = base / name
        path.write_text(path.read_text().replace('"<prm>"', '"<unused0>"'))
    vocab_before = json.loads((base / "config.json").read_text())["text_config"]["vocab_size"]
    cfg = TrainConfig(learning_rate=1e-3, max_steps=2, per_device_train_batch_size=2, max_length=512)
    metrics = train_prm(base, RECORDS[:2], tmp_path / "prm", cfg, seed=1)
    assert metrics["global_step"] == 2
    assert metrics["prm_token_id"] == vocab_before  # appended after the old vocabulary
    saved = json.loads((tmp_path / "prm" / "config.json").read_text())
    assert saved["text_config"]["vocab_size"] == vocab_before + 1
    scores = PRMScorer(tmp_path / "prm").score("q", RED, [["one", "two"]])
    assert len(scores[0]) == 2


def _sentencepiece_style_tokenizer(pieces):
    """An offline Unigram tokenizer with SentencePiece's Metaspace (``▁`` marks a word start), as
    Llama/InternLM-style checkpoints ship it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = [("<unk>", 0.0)] + [(p, -1.0 - i * 0.01) for i, p in enumerate(pieces)]
    raw = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")


def test_yes_no_ids_are_resolved_as_vocabulary_tokens_like_the_release():
    """With both ``▁Yes`` and ``Yes`` in the vocabulary, encoding the text gives ``▁Yes``; the
    release reads ``convert_tokens_to_ids('Yes')``, and so does the PRM."""
    letters = list("abcdefghijklmnopqrstuvwxyzAY N")
    tokenizer = _sentencepiece_style_tokenizer(["▁Yes", "▁No", "Yes", "No", "▁", *letters])
    vocab = tokenizer.get_vocab()
    assert tokenizer("Yes", add_special_tokens=False)["input_ids"] == [vocab["▁Yes"]]
    tokens = ensure_prm_tokens(tokenizer)
    assert tokens.yes_id == vocab["Yes"] != vocab["▁Yes"]
    assert tokens.no_id == vocab["No"] != vocab["▁No"]
    assert tokenizer.convert_ids_to_tokens(tokens.prm_token_id) == "<prm>"


def test_a_vocabulary_without_yes_gets_an_error_naming_it():
    tokenizer = _sentencepiece_style_tokenizer(["▁Yes", "▁No", "No", "▁", *"YesNo"])
    with pytest.raises(ValueError, match="no token 'Yes'"):
        ensure_prm_tokens(tokenizer)


def test_yes_no_must_be_single_tokens():
    """A byte-level tokenizer without merges spells 'Yes' in three tokens: a clear error."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        ["abc"],
        trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                            show_progress=False),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(ValueError, match="'Yes', which must be a single token in the vocabulary") as error:
        ensure_prm_tokens(tokenizer)
    assert "3 pieces" in str(error.value)
    # <prm> was added as one special token before the Yes/No check failed
    assert tokenizer("a<prm>b", add_special_tokens=False)["input_ids"].count(
        tokenizer.convert_tokens_to_ids("<prm>")
    ) == 1


def test_shipped_toy_foundation_trains_and_scores(tmp_path):
    """The default PRM base (TrainConfig.base_model) is the shipped foundation, and it trains."""
    assert TrainConfig().base_model == str(TOY_FOUNDATION_DIR)
    out = tmp_path / "prm"
    metrics = train_prm(TOY_FOUNDATION_DIR, RECORDS, out, _train_cfg(max_steps=2), seed=0)
    assert metrics["global_step"] == 2
    scores = PRMScorer(out).score("What is 3 + 4?", RED, [["3 + 4 = 7.", "The answer is 7."]])
    assert len(scores[0]) == 2 and all(0 < p < 1 for p in scores[0])


# --------------------------------------------------------------------------------- config


def test_training_config_defaults_are_the_papers():
    cfg = PRMTrainingConfig.from_train_config(TrainConfig())
    assert cfg.learning_rate == 2e-6 and cfg.lr_scheduler_type == "cosine"
    assert cfg.warmup_ratio == 0.03 and cfg.weight_decay == 0.05 and cfg.num_train_epochs == 3
    assert cfg.freeze_vision_tower and cfg.label_mode == "soft"
    args = cfg.training_arguments("/tmp/unused-prm-args", seed=3)
    assert args.learning_rate == 2e-6 and args.warmup_steps == 0.03
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "cosine"
    assert args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert args.seed == 3 and args.remove_unused_columns is False


def test_deepspeed_configs_resolve():
    for stage in (1, 2, 3):
        path = Path(resolve_deepspeed_config(f"zero{stage}"))
        config = json.loads(path.read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["train_micro_batch_size_per_gpu"] == "auto"
        assert config["gradient_accumulation_steps"] == "auto"
        assert config["bf16"]["enabled"] == "auto"
    assert resolve_deepspeed_config(str(path)) == str(path)
    assert resolve_deepspeed_config(None) is None
    with pytest.raises(FileNotFoundError):
        resolve_deepspeed_config("zero9")


def test_deepspeed_missing_fails_clearly():
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    with pytest.raises(RuntimeError, match="DeepSpeed is not installed"):
        PRMTrainingConfig(deepspeed="zero1").resolved_deepspeed()


@pytest.mark.gpu
def test_gpu_bf16_training_and_scoring(tiny_dir, tmp_path):
    cfg = _train_cfg(max_steps=8)
    assert cfg.use_bf16() == torch.cuda.is_bf16_supported()
    metrics = train_prm(tiny_dir, RECORDS, tmp_path / "prm", cfg, seed=0)
    assert metrics["bf16"] == torch.cuda.is_bf16_supported()
    scorer = PRMScorer(tmp_path / "prm")
    assert scorer.device.type == "cuda"
    scores = scorer.score("What is 3 + 4?", RED, [["3 + 4 = 7.", "The answer is 7."]])
    assert len(scores[0]) == 2 and all(0 < p < 1 for p in scores[0])


@pytest.mark.gpu
def test_gpu_deepspeed_zero1(tiny_dir, tmp_path, monkeypatch):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (the gpu extra)")
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}.items():
        monkeypatch.setenv(name, value)
    metrics = train_prm(tiny_dir, RECORDS, tmp_path / "prm", _train_cfg(max_steps=4, deepspeed="zero1"), seed=0)
    assert metrics["deepspeed"].endswith("zero1.json") and metrics["global_step"] == 4


@pytest.mark.gpu
def test_gpu_flash_attention_selected_when_installed():
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (the gpu extra)")
    assert PRMTrainingConfig(bf16=True).resolved_attn_implementation() == "flash_attention_2"


def test_no_flash_attention_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the gpu tests")
    assert PRMTrainingConfig().resolved_attn_implementation() is None


def test_tokens_dataclass_from_processor(processor_tokens):
    processor, tokens = processor_tokens
    assert isinstance(tokens, PRMTokens)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<prm>") == tokens.prm_token_id
    assert tok("Yes", add_special_tokens=False)["input_ids"] == [tokens.yes_id]
    assert tok("No", add_special_tokens=False)["input_ids"] == [tokens.no_id]


def test_training_logs_a_few_lines_instead_of_printing_every_step(tiny_dir, tmp_path, caplog, capsys):
    import logging

    with caplog.at_level(logging.INFO, logger="mmprm_tasks.prm"):
        metrics = train_prm(tiny_dir, RECORDS, tmp_path / "prm", _train_cfg(), seed=0)
    lines = [r.getMessage() for r in caplog.records if "PRM training step" in r.getMessage()]
    assert len(metrics["loss_history"]) == metrics["global_step"] == 16  # full history kept
    assert lines[0].startswith("PRM training step 1/16") and lines[-1].startswith("PRM training step 16/16")
    assert "{'loss'" not in capsys.readouterr().out


def test_length_grouped_batches_hold_paths_of_similar_length(tiny_dir, tmp_path):
    """train.group_by_length: the trainer's sampler puts paths of similar length in one batch (the
    Trainer cannot measure path records itself: the collator tokenises them)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmprm_tasks.prm import PRMTrainer, record_length

    records = [{**RECORDS[0], "id": i, "question": "x" * (5 + 37 * (i % 4))} for i in range(512)]
    lengths = [record_length(r) for r in records]
    args = _train_cfg(per_device_train_batch_size=8).training_arguments(tmp_path, seed=0)

    def batches(train_lengths):
        trainer = PRMTrainer(model=AutoModelForImageTextToText.from_pretrained(tiny_dir), args=args,
                             train_dataset=records, processing_class=AutoProcessor.from_pretrained(tiny_dir),
                             train_lengths=train_lengths)
        order = list(trainer._get_train_sampler())
        return [sorted(lengths[i] for i in order[k:k + 8]) for k in range(0, len(order), 8)]

    grouped = batches(lengths)
    assert sorted(i for b in grouped for i in b) == sorted(lengths)  # every path once
    # Four lengths: sorted mega-batches of 16 batches leave at most 3 of each mixed.
    assert sum(b[0] == b[-1] for b in grouped) >= 48
    assert sum(b[0] == b[-1] for b in batches(None)) <= 2  # shuffled: 8 of one length is rare
