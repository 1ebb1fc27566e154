"""The gradient-error study: approximate against exact backprop, measured.

For one model, one batch (x, y) and a list of storage policies,
``study_gradients`` computes the exact gradient and each policy's gradient at
the same parameters on the same batch, and reports, per parameter tensor, per
layer (in forward order) and overall:

* ``rel_err``: ||g - g_exact|| / ||g_exact|| (for a stochastic policy: the mean
  over its R draws of the single-draw error);
* ``cosine``: <g, g_exact> / (||g|| ||g_exact||) (mean over draws);
* ``bias``: ||mean_r g_r - g_exact|| / ||g_exact||, the error of the mean of R
  draws with different seeds (equal to ``rel_err`` for a deterministic policy);
  for an unbiased policy it falls like ``spread / sqrt(R)``;
* ``spread``: sqrt(sum_r ||g_r - mean_r g_r||^2 / (R - 1)) / ||g_exact||, the
  draw-to-draw standard deviation (0 for a deterministic policy);
* the yardstick, SGD's own minibatch noise at the same parameters: exact
  gradients of M minibatches of the same size, ``noise`` = sqrt(sum_m ||g_m -
  mean_m g_m||^2 / (M - 1)) / ||g_exact|| (the standard deviation of a
  minibatch gradient, in units of the studied batch's exact gradient norm), and
  ``err_over_noise`` = ||g - g_exact|| / (that standard deviation). A ratio well
  below 1 means the approximation moves the gradient by much less than the
  choice of minibatch does;
* optionally (``systematic=True``) ``avg_err``: the relative error of the
  gradient averaged over the M noise minibatches, ||mean_m (g_m - g_exact,m)||
  / ||mean_m g_exact,m||. Noise averages out over SGD steps, a systematic error
  does not: this is the error of the descent direction over M steps.

Every gradient pass restores the model's parameters and buffers (BN running
statistics) afterwards, so the passes do not drift: all policies see the same
state. Under an exact-forward policy (paper, generic) the forward pass is
bit-identical to the exact one; under naive and approximate-forward it is the
policy's own forward (that is what those baselines are).

The package: ``grads`` (gradients of one batch, layer order, batches), ``stats``
(``Study`` and ``study_gradients``), ``tables`` (text, CSV, JSON), ``plots``,
``experiments`` and ``window`` (the ready-made experiments).

Layer depth: the modules that own parameters, numbered in the order they are
first called during one forward pass of the model (for a
pre-activation ResNet-20: 0 = the first conv, then bn1, conv1, bn2, conv2 of
each block, ..., 37 = the last BN, 38 = the classifier). A parameter's depth is
its module's.

``python -m npapprox.cli study`` (``npapprox study``) runs the ready-made
experiments: ``depth``, ``activations``, ``training``, ``optimizers``, ``window``.
"""
from __future__ import annotations

from .experiments import (
    EXPERIMENTS,
    StudyConfig,
    exact_trainer,
    run_activations,
    run_depth,
    run_optimizers,
    run_training,
    train_policy,
)
from .grads import DEFAULT_POLICIES, INPUT, Layer, draws_of, gradients, is_stochastic, layer_order, sample_batches
from .plots import plot_activations, plot_depth, plot_optimizers, plot_training, plot_window
from .stats import Noise, PolicyGrads, Study, minibatch_noise, study_gradients
from .tables import activations_table, optimizers_table, training_table, window_table
from .window import cifar_like, run_window, window_policies

__all__ = ["DEFAULT_POLICIES", "EXPERIMENTS", "INPUT", "RUNNERS", "Layer", "Noise", "PolicyGrads", "Study",
           "StudyConfig", "activations_table", "cifar_like", "draws_of", "exact_trainer", "gradients",
           "is_stochastic", "layer_order", "minibatch_noise", "optimizers_table", "plot_activations", "plot_depth",
           "plot_optimizers", "plot_training", "plot_window", "run", "run_activations", "run_depth",
           "run_optimizers", "run_training", "run_window", "sample_batches", "study_gradients", "train_policy",
           "training_table", "window_policies", "window_table"]

RUNNERS = {"depth": run_depth, "activations": run_activations, "training": run_training,
           "optimizers": run_optimizers, "window": run_window}


def run(experiment: str, cfg: StudyConfig, log=print) -> dict:
    """Run one experiment (or ``"all"``: each in turn); returns its result."""
    if experiment == "all":
        return {e: RUNNERS[e](cfg, log) for e in EXPERIMENTS}
    if experiment not in RUNNERS:
        raise ValueError(f"unknown experiment {experiment!r}; expected one of {', '.join(EXPERIMENTS)} or all")
    return RUNNERS[experiment](cfg, log)
