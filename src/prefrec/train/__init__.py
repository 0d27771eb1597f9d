"""Training stages: LoRA SFT (:mod:`prefrec.train.sft`) and preference optimisation
(:mod:`prefrec.train.align`) on ``transformers.Trainer``."""
