"""Adapters that run other projects' GLA models with gla_ext's kernels.

`from gla_ext.integrations import fla` - flash-linear-attention GLA language models
(`fla.models.GLAForCausalLM` objects or their `save_pretrained` directories). Loading a
directory imports neither fla nor transformers; see gla_ext/integrations/fla.py.
"""
