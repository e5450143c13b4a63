"""Optional glue to training frameworks. Each submodule imports its framework lazily:
``from distill_ops.integrations.hf import DistillTrainer`` needs transformers."""
