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


def bema_reference(samples, steps, ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0, min_ema_multiplier=0.0):
    """TRL's BEMACallback update written out (fp64 floats or tensors), with TRL's parameter names.

    theta_0 is ``samples[0]``; an EMA starts there and folds each later sample with beta = max(r^-ema_power,
    min_ema_multiplier), r = lag + multiplier * step; the output is ema + r(s_n)^-bias_power (x_n - theta_0).
    Returns ``(output, ema)``: the merge, and the EMA part alone.
    """
    theta0 = ema = out = samples[0]
    for x, t in zip(samples[1:], steps[1:], strict=True):
        r = lag + multiplier * t
        beta = max(r**-ema_power, min_ema_multiplier)
        ema = (1 - beta) * ema + beta * x
        out = ema + r**-bias_power * (x - theta0)
    return out, ema
