"""Prompt presets (policy.prompt_preset): the platform's SPEC §2 prompt and the original release's
InternVL prompt, built as text and laid out by the real backends (tiny LLaVA on CPU, the real
policy server over HTTP)."""

from __future__ import annotations

import httpx
import pytest

from mmprm_tasks.policy import GenerationRequest, chat_messages, openai_messages
from mmprm_tasks.policy.hf import TransformersPolicy
from mmprm_tasks.policy.openai_compat import OpenAIChatPolicy
from mmprm_tasks.rollouts import INTERNVL_SYSTEM_PROMPT, build_prompt
from mmprm_tasks.runs import config_hash, run_config
from mmprm_tasks.settings import PolicyConfig, SamplingConfig, Settings

SAMPLING = SamplingConfig(max_new_tokens=8)
# The release's root and continuation prompts, as data_pipeline/omegaprm.py writes them.
RELEASE_ROOT = ("<image>\n Your task is to answer the question below. Give complete reasoning steps before you "
                "answer, and when you are ready to answer, use Answer: The final answer is ..\n\nQuestion: What is 2+2?")
PLATFORM_ROOT = ("Your task is to answer the question below. Give complete reasoning steps before you "
                 "answer, and when you are ready to answer, use Answer: The final answer is ..\nQuestion: What is 2+2?")


def test_preset_texts():
    assert build_prompt("What is 2+2?") == PLATFORM_ROOT
    assert build_prompt("What is 2+2?", preset="platform") == PLATFORM_ROOT
    assert build_prompt("What is 2+2?", preset="release") == RELEASE_ROOT
    assert build_prompt("What is 2+2?", ["Two and two.", "4"], preset="release") == (
        RELEASE_ROOT + "\nPrevious Steps:<step>Two and two.</step><step>4</step>")
    with pytest.raises(ValueError, match="unknown prompt preset 'internvl'; known: platform, release"):
        build_prompt("q", preset="internvl")


def test_preset_is_a_setting(monkeypatch):
    assert Settings().policy.prompt_preset == "platform"
    monkeypatch.setenv("MMPRM_POLICY__PROMPT_PRESET", "release")
    release = Settings()
    assert release.policy.prompt_preset == "release"
    monkeypatch.setenv("MMPRM_POLICY__PROMPT_PRESET", "chatml")
    with pytest.raises(ValueError, match="prompt_preset"):
        Settings()
    # trees grown under another prompt are not comparable; the default keeps existing hashes
    monkeypatch.delenv("MMPRM_POLICY__PROMPT_PRESET")
    default = Settings()
    assert "prompt_preset" not in run_config(default)["policy"]
    assert config_hash(release) != config_hash(default)


def test_transformers_renders_the_release_prompt(random_policy_dir, images):
    """The processor expands the placeholder in the text: one image, the release's text around it."""
    policy = TransformersPolicy(random_policy_dir, policy=PolicyConfig(prompt_preset="release", batch_size=8),
                                sampling=SAMPLING)
    try:
        request = GenerationRequest("What is 2+2?", images[0], ("Two and two.",), n=2)
        from mmprm_tasks.policy.hf import ChatPrompt

        text = policy.render(ChatPrompt(chat_messages(request.prompt_for("release"), "release"), [request.image]))
        assert text.startswith(f"<|im_start|>system\n{INTERNVL_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{RELEASE_ROOT}")
        assert text.count("<image>") == 1
        out = policy.generate([request], seed=3)  # the processor accepts it: one image token, one image
        assert len(out) == 1 and len(out[0]) == 2
    finally:
        policy.close()


def test_openai_body_carries_the_release_prompt_to_a_real_server(random_policy_dir, images):
    from mmprm_tasks.policy.server import start_server

    server_policy = TransformersPolicy(random_policy_dir, policy=PolicyConfig(batch_size=8), sampling=SAMPLING)
    server = start_server(server_policy, served_model_name="toy")
    try:
        cfg = PolicyConfig(backend="openai", model="toy", base_url=server.base_url, prompt_preset="release")
        backend = OpenAIChatPolicy(server.base_url, "toy", policy=cfg, sampling=SAMPLING)
        request = GenerationRequest("What is 2+2?", images[0], (), n=2)
        body = backend.body(request, seed=1)
        assert body["messages"] == openai_messages(RELEASE_ROOT, images[0], "release")
        system, user = body["messages"]
        assert system == {"role": "system", "content": INTERNVL_SYSTEM_PROMPT}
        # the image is the part before the text; the server's template puts its placeholder there
        assert user["content"][0]["type"] == "image_url"
        assert user["content"][1] == {"type": "text", "text": RELEASE_ROOT[len("<image>\n"):]}
        response = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert len(backend.generate([request], seed=1)[0]) == 2
        backend.close()
        platform = OpenAIChatPolicy(server.base_url, "toy", policy=PolicyConfig(backend="openai", model="toy",
                                                                               base_url=server.base_url),
                                    sampling=SAMPLING)
        only = platform.body(request)["messages"]
        assert [m["role"] for m in only] == ["user"] and only[0]["content"][1]["text"] == PLATFORM_ROOT
        platform.close()
    finally:
        server.stop()
        server_policy.close()
