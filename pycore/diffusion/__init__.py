"""One diffusion stack for every model command (spm-train, spm-score, spo-train, spo-sample).

- :mod:`pycore.diffusion.load` — a base SDXL / SD1.5 model by hub name, diffusers folder or single
  ``.safetensors`` file; VAE override and dtypes; family from the model's configs; scheduler check;
- :mod:`pycore.diffusion.text` — prompt encoding (SDXL: two encoders, pooled, add_time_ids; SD1.5)
  and the classifier-free-guidance UNet call;
- :mod:`pycore.diffusion.schedule` — the noise schedule, forward noising, x̂0, DDIM steps and their
  log-probabilities;
- :mod:`pycore.diffusion.vae` — latents ↔ images through the VAE (scaling and shift factors).

Heavy libraries (torch, diffusers, transformers) are imported by the submodules, not here.
"""
