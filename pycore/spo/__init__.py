"""Step-aware Preference Optimization (SPO): configuration, rollouts, the training loop and sampling.

The step-aware preference model lives in :mod:`pycore.spm`, the diffusion stack (loading, prompt
encoding, schedule, VAE) in :mod:`pycore.diffusion`. Heavy modules are imported by the submodules.
"""
