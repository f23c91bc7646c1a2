"""Hand-written fp64 references of averaging rules, shared by the law's, the engine's and the Trainer's tests."""

from __future__ import annotations


def gap_ema_weights(steps, h, bias):
    """Weights of an EMA sampled at ``steps``: each gap decays by 2^(-gap/(h (step + bias))), fed unit samples."""
    n = len(steps)
    ema = [1.0] + [0.0] * (n - 1)
    for k in range(1, n):
        decay = 2.0 ** (-(steps[k] - steps[k - 1]) / (h * (steps[k] + bias)))
        ema = [decay * e + (1.0 - decay) * (1.0 if i == k else 0.0) for i, e in enumerate(ema)]
    return ema
