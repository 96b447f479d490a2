"""The step-aware preference model (SPM) of SPO, split by role.

- :mod:`pycore.spm.model` — the time-conditioned CLIP (adaLN), preprocessing, scoring;
- :mod:`pycore.spm.checkpoints` — loading (hw folders, released checkpoints, aliases, plain CLIP) and saving;
- :mod:`pycore.spm.data` — preference pairs (Pick-a-Pic and manifest forms), decoding, batches;
- :mod:`pycore.spm.losses` — the pair loss, accuracy and margin labels;
- :mod:`pycore.spm.noising` — SPO's noising of both images of a pair on the shared diffusion stack;
- :mod:`pycore.spm.config` / :mod:`pycore.spm.train` — ``hw spm-train``'s configuration and loop;
- :mod:`pycore.spm.score` — ``hw spm-score`` as a function (:func:`~pycore.spm.score.score_manifest`).

Heavy modules (torch, transformers, diffusers) are imported by the submodules, not here.
"""
