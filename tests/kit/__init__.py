"""hw's test kit: the tiny models, tokenizers, architecture configs and fake servers that tests,
benchmarks (bench/) and the demo (scripts/demo.sh) share. Nothing here ships in the library.

- :mod:`tests.kit.tokenizer` — a character-level CLIP BPE tokenizer any prompt tokenizes with;
- :mod:`tests.kit.clip` — tiny HF CLIP configs, a tiny plain CLIP folder (PickScore's stand-in)
  and a tiny step-aware preference model (SPM);
- :mod:`tests.kit.diffusion` — tiny SDXL-/SD1.5-shaped UNet, VAE and text encoders, saved as
  diffusers pipeline folders; a near-identity VAE and an SD1.5 denoiser for SPM training tests;
- :mod:`tests.kit.sdxl_arch` — the published SDXL base 1.0 architecture as config dicts (no
  weights), for meta-device shape checks and full-size benchmarks;
- :mod:`tests.kit.open_clip` — tiny open_clip CLIP/CoCa configs and a saver for ``local-dir:``;
- :mod:`tests.kit.fake_openai` — an OpenAI-compatible chat-completions server on 127.0.0.1 with a
  fault plan (``python -m tests.kit.fake_openai --port N``).

Import as ``tests.kit.…`` from the repository root (pytest, bench scripts and the demo run there).
"""
