"""Recipes: what a user runs, built from the engine (``rlx.train``) and the parts.

- ``experiment``: the default experiment ``Experiment`` (gin ``rlx.Experiment``) and
  ``run`` (SFT warm-up → RL against a verifier → evaluation → export).
- ``rlhf``: ``RLHFExperiment`` (reward model, then RL against it) and
  ``DPOExperiment`` (DPO / IPO / SimPO), with their synthetic pairs from
  ``preference_data``.
- ``prepare``: the shared preparation (settings check, problems, tokenizer, model,
  SFT warm-up from ``sft``, evaluation, reward pool, reference, the RL phase,
  outputs); ``components`` resolves objectives and tasks by name, import path or gin
  reference; ``bindings`` refuses gin bindings a recipe would ignore.

The engine never imports this package; the console entry point ``rlx.cli`` does.
"""
