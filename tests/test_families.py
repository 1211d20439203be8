"""The platform's own code paths through a tiny random-weight twin of every model family users
bring (issue 24; twins in ``tests/twins.py``): the transformers policy, the openai backend against
the CPU server in a subprocess, PRM training (labels at ``<prm>`` after the family's image-token
expansion, Yes/No ids, frozen vision tower, one step, save/reload), ``mmprm score`` and the
evaluation's step scores, and the InternVL / Hugging Face exports read back into each family's
inputs.  Twins and trained PRMs are built once per session and shared by the tests.

Random weights: the tests assert mechanics (lengths, stops, seeds, positions, gradients), never text.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import PolicyServerProcess, policy_requests
from twins import TWINS, build_twin

from mmprm_tasks import cli
from mmprm_tasks.evaluate import score_candidates
from mmprm_tasks.families import FAMILIES, UnknownFamilyError, load_checkpoint
from mmprm_tasks.policy.hf import ChatPrompt, load_transformers_policy
from mmprm_tasks.policy.openai_compat import OpenAIChatPolicy
from mmprm_tasks.prm import (IGNORE_LABEL, PRM_CONFIG_FILE, PRMCollator, PRMDataError, PRMScorer, PRMTrainingConfig,
                             ensure_prm_tokens, train_prm)
from mmprm_tasks.rollouts import parse_rollout
from mmprm_tasks.settings import PolicyConfig, SamplingConfig
from mmprm_tasks.traverse import render_process

NAMES = [pytest.param(name, marks=pytest.mark.skipif(bool(twin.missing()), reason=str(twin.missing())))
         for name, twin in sorted(TWINS.items())]
MAX_NEW = 6
SAMPLING = SamplingConfig(max_new_tokens=MAX_NEW)
RECORDS = [
    {"id": 0, "question": "What is the sum of the numbers?", "process": render_process([["5 + 1 = 6."], ["The answer is 6."]]),
     "labels": [1.0, 0.25]},
    {"id": 1, "question": "What is it?", "process": render_process([["Read 9."], ["9 is odd."], ["The answer is 7."]]),
     "labels": [0.5, 0.0, 0.0]},
]


def png(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A non-square image, so tiling and dynamic resolution see an aspect ratio."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = png()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def twins(tmp_path_factory):
    """Twin checkpoint folders, each built on first use and shared by the session."""
    root = tmp_path_factory.mktemp("twins")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_twin(name, root / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def trained(twins, tmp_path_factory):
    """``(checkpoint dir, metrics)`` of one PRM training step from each twin, shared by the session."""
    root = tmp_path_factory.mktemp("trained")
    done: dict[str, tuple[Path, dict]] = {}

    def get(name: str) -> tuple[Path, dict]:
        if name not in done:
            cfg = PRMTrainingConfig(max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, warmup_ratio=0.0,
                                    bf16=False)
            records = [{**r, "image": IMAGE} for r in RECORDS]
            done[name] = (root / name, train_prm(twins(name), records, root / name, cfg, seed=0))
        return done[name]

    return get


def vision_params(names, name: str) -> set[str]:
    modules = FAMILIES[name].vision_modules
    return {n for n in names if any(part in modules for part in n.split("."))}


# ----------------------------------------------------------------------------- the table


def test_every_twin_has_a_family_entry_and_unknown_families_are_refused(tmp_path):
    assert set(TWINS) <= set(FAMILIES)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(UnknownFamilyError) as excinfo:
        load_checkpoint(tmp_path)
    message = str(excinfo.value)
    assert "\n" not in message and "'blip-2'" in message and "families.py" in message and "vision module" in message


def test_flash_attention_entries_match_the_model_classes(twins):
    """The table's flash_attention says what each family's class declares (it picks the GPU default)."""
    import transformers

    from mmprm_tasks.families import checkpoint_model_type

    for name, twin in TWINS.items():
        if twin.missing():
            continue
        architecture = json.loads((twins(name) / "config.json").read_text())["architectures"][0]
        assert FAMILIES[checkpoint_model_type(twins(name))].flash_attention == bool(
            getattr(transformers, architecture)._supports_flash_attn), name


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize("name", NAMES)
def test_policy_transformers(twins, name):
    """Rendered with the family's chat template and image, generated, stopped, parsed."""
    model_dir = twins(name)
    policy = load_transformers_policy(model_dir, policy=PolicyConfig(model=str(model_dir)), sampling=SAMPLING, capacity=8)
    requests = policy_requests([IMAGE] * 3)
    # The image reaches the model as the family does it: many tokens in the text, or one.
    text = policy.render(ChatPrompt(_messages(requests[0]), [IMAGE]))
    ids = policy.prepare_inputs([text], [[_pil(IMAGE)]])["input_ids"][0]
    image_tokens = int((ids == policy.model.config.image_token_id).sum())
    assert image_tokens > 1 if FAMILIES[name].image_tokens == "expanded" else image_tokens == 1

    first = policy.generate(requests, seed=7)
    assert [len(r) for r in first] == [r.n for r in requests]
    assert all(isinstance(rollout, list) for rollouts in first for rollout in rollouts)
    assert policy.generate(requests, seed=7) == first

    prompts = [ChatPrompt(_messages(r), [r.image]) for r in requests]
    completions = policy.complete(prompts, [r.n for r in requests], seeds=[1, 2, 3])
    again = policy.complete(prompts, [r.n for r in requests], seeds=[1, 2, 3])
    other = policy.complete(prompts, [r.n for r in requests], seeds=[4, 5, 6])
    assert [[c.text for c in cs] for cs in completions] == [[c.text for c in cs] for cs in again]
    assert [[c.text for c in cs] for cs in completions] != [[c.text for c in cs] for cs in other]
    for c in (c for cs in completions for c in cs):
        assert c.finish_reason in ("stop", "length") and 1 <= c.completion_tokens <= MAX_NEW
        assert c.finish_reason == "stop" or c.completion_tokens == MAX_NEW

    # The family's turn-end token stops a sequence: made certain by raising its logit.
    turn_end = policy.tokenizer.convert_tokens_to_ids(FAMILIES[name].turn_end_tokens[0])
    assert turn_end in policy.eos_token_ids
    head = policy.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: out.index_fill(-1, torch.tensor([turn_end]), 1e4))
    try:
        stopped = policy.complete(prompts[:1], [2], seeds=[1])[0]
    finally:
        hook.remove()
    assert [(c.finish_reason, c.completion_tokens, c.text) for c in stopped] == [("stop", 1, "")] * 2
    policy.close()


def _messages(request):
    from mmprm_tasks.policy import chat_messages

    return chat_messages(request.prompt)


def _pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.parametrize("name", NAMES)
def test_policy_openai_server(twins, name):
    """The openai backend against ``python -m mmprm_tasks.policy.server --model DIR`` over HTTP."""
    model_dir = twins(name)
    with PolicyServerProcess(model_dir, "--batch-size", "8") as server:
        backend = OpenAIChatPolicy(server.base_url + "/v1", str(model_dir), sampling=SAMPLING)
        requests = policy_requests([IMAGE] * 3)
        rollouts = backend.generate(requests, seed=3)
        assert [len(r) for r in rollouts] == [r.n for r in requests]
        assert backend.generate(requests, seed=3) == rollouts
        body = backend.body(requests[0], seed=5)
        answer = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).json()
        assert len(answer["choices"]) == requests[0].n
        assert all(c["finish_reason"] in ("stop", "length") for c in answer["choices"])
        assert 1 <= answer["usage"]["completion_tokens"] <= MAX_NEW * requests[0].n
        assert all(parse_rollout(c["message"]["content"]) is not None for c in answer["choices"])
        backend.close()


# ----------------------------------------------------------------------------- PRM


def _prm_inputs(model_dir: Path):
    processor, model, fam = load_checkpoint(model_dir)
    return processor, model, fam, ensure_prm_tokens(processor, model, fam)


@pytest.mark.parametrize("name", NAMES)
def test_prm_yes_no_ids_decode_to_yes_and_no(twins, name):
    processor, _, fam, tokens = _prm_inputs(twins(name))
    tokenizer = processor.tokenizer
    assert tokenizer.decode([tokens.yes_id]) == "Yes" and tokenizer.decode([tokens.no_id]) == "No"
    assert tokenizer.convert_ids_to_tokens(tokens.yes_id) == fam.yes_token
    assert tokens.yes_id != tokens.no_id != tokens.prm_token_id


@pytest.mark.parametrize("name", NAMES)
def test_prm_labels_sit_exactly_at_prm_after_image_expansion(twins, name):
    processor, model, fam, tokens = _prm_inputs(twins(name))
    assert model.get_input_embeddings().num_embeddings > tokens.prm_token_id  # resized when added
    batch = PRMCollator(processor, tokens)([{**r, "image": IMAGE} for r in RECORDS])
    input_ids, labels = batch["input_ids"], batch["prm_labels"]
    for row, record in enumerate(RECORDS):
        at_prm = (input_ids[row] == tokens.prm_token_id).nonzero().squeeze(-1)
        labelled = (labels[row] != IGNORE_LABEL).nonzero().squeeze(-1)
        assert at_prm.tolist() == labelled.tolist() and len(at_prm) == len(record["labels"])
        assert labels[row, at_prm].tolist() == record["labels"]
        image_at = (input_ids[row] == model.config.image_token_id).nonzero().squeeze(-1)
        assert (len(image_at) > 1) if fam.image_tokens == "expanded" else (len(image_at) == 1)
        assert int(image_at.max()) < int(at_prm.min())  # the image comes before the process
    # Every sequence-aligned tensor the processor made still lines up with input_ids.
    outputs = model(**{k: v for k, v in batch.items() if k != "prm_labels"})
    assert outputs.logits.shape[:2] == input_ids.shape
    # A max_length that would cut the image's tokens is refused, for every family's image token.
    first_image = int((input_ids[0] == model.config.image_token_id).nonzero()[0])
    with pytest.raises(PRMDataError, match="cuts into the image tokens"):
        PRMCollator(processor, tokens, max_length=first_image + (fam.image_tokens == "expanded"),
                    image_token_id=model.config.image_token_id)([{**RECORDS[0], "image": IMAGE}])


@pytest.mark.parametrize("name", NAMES)
def test_prm_train_step_freezes_the_vision_tower(twins, trained, name):
    """One optimizer step with a finite loss; the parameters that got gradients (those the step
    changed) are listed: none lies in the vision tower, the language model's are among them."""
    out, metrics = trained(name)
    assert metrics["global_step"] == 1 and math.isfinite(metrics["first_loss"]) and metrics["frozen_params"] > 0
    before = load_file(str(twins(name) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    changed = sorted(n for n in after if n not in before or before[n].shape != after[n].shape
                     or not torch.equal(before[n], after[n]))
    vision = vision_params(after, name)
    assert vision, f"no parameter under {FAMILIES[name].vision_modules}"
    assert not vision & set(changed), f"vision parameters trained: {sorted(vision & set(changed))[:5]}"
    assert any("layers" in n and n not in vision for n in changed), changed
    assert set(after) - vision - set(changed) <= {n for n in after if "norm" in n or "bias" in n or "embed" in n}, \
        sorted(set(after) - vision - set(changed))


@pytest.mark.parametrize("name", NAMES)
def test_prm_save_and_reload(trained, name, tmp_path):
    out, metrics = trained(name)
    prm_config = json.loads((out / PRM_CONFIG_FILE).read_text())
    processor, model, fam = load_checkpoint(out)
    tokens = ensure_prm_tokens(processor, family=fam)  # no resize: the saved model knows <prm>
    assert (tokens.prm_token_id, tokens.yes_id, tokens.no_id) == (
        prm_config["prm_token_id"], prm_config["yes_id"], prm_config["no_id"]) == (
        metrics["prm_token_id"], metrics["yes_id"], metrics["no_id"])
    assert model.config.prm_token_id == tokens.prm_token_id
    assert model.get_input_embeddings().num_embeddings > tokens.prm_token_id
    model.save_pretrained(tmp_path)
    again = load_file(str(tmp_path / "model.safetensors"))
    assert {n: t.shape for n, t in again.items()} == {n: t.shape for n, t in load_file(str(out / "model.safetensors")).items()}


@pytest.mark.parametrize("name", NAMES)
def test_score_cli_and_evaluation_step_scores(trained, name, tmp_path, monkeypatch):
    """``mmprm score`` on a release-format file and the evaluation's scorer, from the trained twin."""
    out, _ = trained(name)
    (tmp_path / "img.png").write_bytes(IMAGE)
    candidates = [{"question": "What is 3 + 4?", "image_path": "img.png",
                   "solutions_splits": [["3 + 4 = 7.", "The answer is 7."], ["3 + 4 = 8.", "So 8.", "The answer is 8."]],
                   "labels": [1, 0]}]
    source = tmp_path / "candidates.json"
    source.write_text(json.dumps(candidates))
    monkeypatch.setenv("MMPRM_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(cli.app, ["score", str(source), "--checkpoint", str(out)])
    assert result.exit_code == 0, result.output
    scored = json.loads((tmp_path / "candidates.scored.json").read_text())
    scores = scored[0]["prm_scores"]
    assert [len(s) for s in scores] == [2, 3] and all(0 < p < 1 for s in scores for p in s)

    scorer = PRMScorer(out, batch_size=2)
    problem = {"question": "What is 3 + 4?", "image": IMAGE}
    step_scores = score_candidates(scorer, [problem], [[{"steps": s} for s in candidates[0]["solutions_splits"]]])
    flat = [p for c in step_scores[0] for p in c["step_scores"]]
    assert flat == pytest.approx([p for s in scores for p in s], abs=1e-5)


# ----------------------------------------------------------------------------- exports


@pytest.fixture(scope="session")
def _exports_cache():
    return {}


@pytest.fixture
def exported(_exports_cache, request, tmp_path_factory):
    """One dataset version exported with ``mmprm export internvl`` and ``export hf`` (made by the
    first test that asks; the folders outlive its database)."""
    if not _exports_cache:
        from test_exports import _dataset

        settings = request.getfixturevalue("cli_settings")
        dataset_id = _dataset(settings, tmp_path_factory.mktemp("export_seeds"))
        root = tmp_path_factory.mktemp("exports")
        for kind in ("internvl", "hf"):
            result = CliRunner().invoke(cli.app, ["export", kind, dataset_id, str(root / kind)])
            assert result.exit_code == 0, result.output
        _exports_cache.update(internvl=root / "internvl", hf=root / "hf", dataset_id=dataset_id)
    return _exports_cache


@pytest.mark.parametrize("name", NAMES)
def test_exports_feed_the_family(twins, exported, name):
    """The InternVL folder (read as the release's trainer reads it) and the Parquet dataset give
    records whose labels land on the twin's ``<prm>`` tokens."""
    import datasets

    from mmprm_tasks.formats import read_internvl
    from test_exports import _open_as_release_trainer

    internvl = exported["internvl"]
    lines = [json.dumps(r) for r in _open_as_release_trainer(internvl / "meta.json")]
    from_internvl = [{**r, "image": (internvl / r["image_path"]).read_bytes()} for r in read_internvl(lines)]
    table = datasets.load_dataset("parquet", data_dir=str(exported["hf"] / "data"), split="train")
    from_hf = [{"id": i, "question": row["question"], "process": row["process"], "labels": row["labels"],
                "image": row["image"]} for i, row in enumerate(table)]
    assert len(from_internvl) == len(from_hf) >= 2
    processor, _, _, tokens = _prm_inputs(twins(name))
    for records in (from_internvl, from_hf):
        batch = PRMCollator(processor, tokens)(records)
        for row, record in enumerate(records):
            at_prm = batch["input_ids"][row] == tokens.prm_token_id
            assert batch["prm_labels"][row][at_prm].tolist() == pytest.approx(record["labels"])


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_family_bf16(twins, name, tmp_path):
    """The matrix on CUDA: a bf16 training step (flash-attn where installed and the family takes
    it), GPU scoring and the policy on the GPU."""
    cfg = PRMTrainingConfig(max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3, warmup_ratio=0.0)
    assert cfg.use_bf16()
    metrics = train_prm(twins(name), [{**r, "image": IMAGE} for r in RECORDS], tmp_path / "prm", cfg, seed=0)
    assert metrics["bf16"] and math.isfinite(metrics["first_loss"])
    scorer = PRMScorer(tmp_path / "prm")
    assert scorer.device.type == "cuda"
    scores = scorer.score("What is 3 + 4?", IMAGE, [["3 + 4 = 7.", "The answer is 7."]])
    assert len(scores[0]) == 2 and all(0 <= p <= 1 for p in scores[0])
    policy = load_transformers_policy(twins(name), policy=PolicyConfig(model=str(twins(name))), sampling=SAMPLING,
                                      capacity=8)
    assert policy.device == "cuda"
    requests = policy_requests([IMAGE] * 3)
    assert [len(r) for r in policy.generate(requests, seed=7)] == [r.n for r in requests]
    policy.close()

