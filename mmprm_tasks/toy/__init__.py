"""Synthetic multimodal math world and a tiny vision-language policy (issue 4).

* :mod:`.world` — seed problems with images, ground-truth steps, ``first_error_index``;
* :mod:`.tokenizer` — ``build_tokenizer`` (offline BPE + ChatML);
* :mod:`.model` — ``build_tiny_vlm`` (SigLIP + Qwen2 LLaVA, ~1 M parameters);
* :mod:`.train_policy` — ``train_policy`` (the shipped checkpoint in ``assets/toy_policy``);
* :mod:`.cli` — the ``toy_app`` typer sub-app.
"""
