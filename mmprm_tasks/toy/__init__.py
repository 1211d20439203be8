"""Synthetic multimodal math world and its tiny vision-language models (issues 4, 11).

* :mod:`.world` — seed problems with images, ground-truth steps, ``first_error_index``;
* :mod:`.tokenizer` — ``build_tokenizer`` (offline BPE + ChatML);
* :mod:`.model` — ``build_tiny_vlm`` (SigLIP + Qwen2 LLaVA, ~2 M parameters);
* :mod:`.corpus` — the training examples of each layout (tagged, PRM process layout, yes/no judgement);
* :mod:`.training` — ``train_toy_model``: the foundation (``assets/toy_foundation``, the PRM's base)
  and the policy fine-tuned from it (``assets/toy_policy``);
* :mod:`.cli` — the ``toy_app`` typer sub-app.
"""
