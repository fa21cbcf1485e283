"""fla's GLA model classes for the tests that compare with flash-linear-attention, and the small
random models they build. FLA_ERROR says why fla cannot be imported (None when it can); the
tests skip only then (./run.sh test installs fla)."""
from __future__ import annotations

import warnings

import torch

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fla  # noqa: F401  (registers the models with transformers' Auto classes)
        from fla.models import GLAConfig, GLAForCausalLM
    FLA_ERROR = None
except Exception as exc:  # pragma: no cover - the CI installs fla
    GLAConfig = GLAForCausalLM = None
    FLA_ERROR = f"{type(exc).__name__}: {exc}"

VOCAB = 97


def random_fla_model(seed=None, hidden_size=64, num_hidden_layers=2, perturb=0.2, **options):
    """A tiny fla GLAForCausalLM (eval mode) with every parameter perturbed by perturb * randn
    (norm weights and biases too; perturb=0: fla's own initialization). seed=None keeps the
    test's own seeded random stream."""
    if seed is not None:
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GLAForCausalLM(GLAConfig(hidden_size=hidden_size,
                                         num_hidden_layers=num_hidden_layers,
                                         vocab_size=VOCAB, **options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model
