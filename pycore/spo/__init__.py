"""Step-aware Preference Optimization (SPO): the step-aware preference model and its training.

Heavy modules (torch, transformers, diffusers) are imported by the submodules, not here:
``from pycore.spo.preference import StepAwarePreferenceModel``.
"""
