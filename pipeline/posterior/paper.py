"""The ``paper`` preset: the joint sampler as the authors' code runs it, translated to our VP SDE.

The authors' code (github.com/tristan-deep/joint-diffusion, TensorFlow; files at its HEAD 7077e72)
samples the CelebA + MNIST blend with ``configs/inference/paper/celeba_mnist_pigdm.yaml``: the
``simple`` VE SDE ``dx = sigma^t dw`` (``sigma = 25``, ``sde_lib.py:310-338``), ``num_scales: 600``,
predictor ``euler_maruyama``, corrector ``none``, guidance ``pigdm``, ``lambda_coeff: 0.93``,
``kappa_coeff: 0.88``; images and observations in [0, 1]. One step at time ``t``
(``sampling.py:502-528``), for ``x`` and for ``n`` each under its own prior:

1. **Predictor** (``EulerMaruyamaPredictor.update_fn``, ``sampling.py:122-138``):
   ``x_mean = x + g(t)^2 score(x, t) / N`` under a ``GradientTape``; ``grad_x0_xt = tape.gradient(x_mean,
   x)``, which for a tensor target is the gradient of ``sum(x_mean)``: ``J^T 1``, one vector-Jacobian
   product with a cotangent of ones, ``J = d x_mean / d x``; then ``x = x_mean + g(t) sqrt(1/N) z``.
2. **Guidance** (``PIGDM.joint_denoise_update``, ``guidance.py:121-182``, the blend branch
   ``y = (1 - alpha) x + alpha n``): ``r_t^2 = sigma_t^2 / (sigma_t^2 + 1)`` with ``sigma_t`` the
   marginal std (``rt_squared``, ``guidance.py:75-79``), ``q_t^2 = r_t^2``, ``Sigma_t = r_t^2 + q_t^2``;
   with the residual taken at the predictor's means, ``res = A(x_mean, n_mean) - y``,
   ``x <- x - lambda r_t^2 (1 - alpha) (J_x^T 1) * res / Sigma_t`` and
   ``n <- n - kappa q_t^2 alpha (J_n^T 1) * res / Sigma_t`` (elementwise products: ``J^T 1`` stands in
   for the exact vector-Jacobian product ``J^T ((1 - alpha) res)``). Because ``q_t = r_t``,
   ``r_t^2 / Sigma_t = 1/2`` at every ``t``: the schedule cancels and the pull is ``lambda / 2``.
3. After the last of ``N`` steps at ``t = linspace(1, eps, N)`` (``dt = 1/N``) the sampler returns
   ``x_mean, n_mean``: the last predictor's means, so the last step's guidance is discarded and no
   Tweedie denoising follows (``sampling.py:548-552``).

**Our translation to the VP SDE** (``x_t = a_t x_0 + s_t e``; :mod:`pipeline.diffusion.sde`). A VP
state is a VE state scaled by ``a_t``: ``u_t = x_t / a_t = x_0 + sigma_t e`` with ``sigma_t = s_t / a_t``.

* The predictor is our reverse Euler-Maruyama step (:meth:`VPSDE.reverse_step`), and ``J^T 1`` is taken
  of its mean ``x_mean = x + (beta x / 2 + beta score) dt``, as theirs, by one backward pass of
  ``sum(x_mean) + sum(n_mean)`` through both networks.
* The residual is taken at the predictor's means in data coordinates, ``u_mean = x_mean / a_{t'}`` at
  the time ``t' = t - dt`` the mean belongs to, in [0, 1] units like their images:
  ``res = A((u_x + 1) / 2, (u_n + 1) / 2) - y``. (Without the ``1 / a`` the residual would compare
  ``y`` with an image shrunk by ``a_t``, 0.007 at ``t = 1``.)
* The update is theirs in VE coordinates carried back: ``J`` in VE coordinates is
  ``(a_t / a_{t'}) J_VP``, a step ``du`` (in [0, 1] units) is ``dx = 2 a_{t'} du`` in network units, so
  ``x <- x - 2 lambda a_t (r_t^2 / Sigma_t) c_x (J_x^T 1) * res`` (and ``n`` with ``kappa``, ``c_n``,
  ``q_t``), ``c_x, c_n`` the forward model's coefficients. ``r_t^2 = sigma_t^2 / (1 + sigma_t^2)`` with
  ``sigma_t = s_t / a_t`` (which is ``s_t^2``); it cancels against ``Sigma_t`` as in theirs, and is
  written out so the step reads as theirs.
* Times: our grid (:meth:`VPSDE.timesteps`), ``steps`` network evaluations per prior from ``t = 1`` in
  steps of ``(1 - eps) / steps``, landing on ``t = eps``; theirs evaluates at ``linspace(1, eps, N)``
  with ``dt = 1/N``. The start is ``N(0, I)``, which is the VP prior exactly (their VE start is
  ``N(0, I)`` too, narrower than their ``sigma_1``). The result is the last predictor's means in data
  coordinates, ``x_mean / a_eps`` (network units), with no final guidance, clipping or Tweedie step.

**In the sampler's registries**: the step is the solver ``paper`` (:data:`~pipeline.posterior.sampler.SOLVERS`),
which returns the result itself (no final guided Tweedie step, as theirs); its guidance is part of the step,
so the rule ``paper`` only names it (any other solver refuses it, in one line). The preset ``paper``
(:data:`~pipeline.posterior.sampler.PRESETS`, ``--set sampler.preset=paper``) sets rule, solver, 600 steps and
no final projection, as their code ends. The weights: ``lambda = 0.93``, ``kappa = 0.88`` are theirs for their
VE SDE and networks (:data:`AUTHORS`); the product uses the weights re-tuned for our VP priors on the
validation split (``jointdiff bench tune --rules paper``), shipped in the tuned table
(``pipeline/posterior/tuned.yaml``); figures in ``docs/bench/paper.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.diffusion.sampling import score_fn
from pipeline.diffusion.sde import VPSDE, _bcast
from pipeline.posterior.guidance import Guidance, GuidedDenoiser, Net, register_rule
from pipeline.posterior.sampler import PRESETS, SOLVERS, Noise

STEPS = 600  # num_scales in their celeba_mnist_pigdm.yaml
AUTHORS = {"lambda_x": 0.93, "kappa_n": 0.88}  # lambda_coeff / kappa_coeff in their celeba_mnist_pigdm.yaml
PRESETS.register("paper", {"rule": "paper", "solver": "paper", "steps": STEPS, "final_projection": False})


@register_rule("paper", weights=(AUTHORS["lambda_x"], AUTHORS["kappa_n"]))
def paper_rule(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, t: torch.Tensor) -> Guidance:
    """The guidance of the ``paper`` solver, which runs it inside its own step."""
    raise ValueError("sampler.rule=paper is the guidance of the paper solver: use --set sampler.preset=paper "
                     "(or sampler.solver=paper)")


def predictor_mean(model: Net, sde: VPSDE, x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """The reverse Euler-Maruyama step's mean from ``t`` to ``t - dt``, score ``-e_theta(x, t) / s_t``."""
    return sde.reverse_step(x, t, dt, score_fn(model, sde)(x, t), None)


@SOLVERS.register("paper")
def sample_paper(d: GuidedDenoiser, x: torch.Tensor, n: torch.Tensor, ts: torch.Tensor, noise: Noise,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' joint sampler on the VP SDE (module docstring): ``settings.steps`` evaluations per prior
    from ``x, n`` (drawn from ``N(0, I)`` by the caller); returns the last predictor means in data coordinates,
    network units ([-1, 1]): the result itself (``finishes``), so ``ts`` (the other solvers' grid) is unused."""
    s, sde, y, forward = d.settings, d.sde, d.y, d.forward
    if s.rule != "paper":
        raise ValueError(f"solver paper runs its own guidance; sampler.rule={s.rule} cannot go with it: use "
                         "--set sampler.preset=paper")
    steps, shape = s.steps, tuple(y.shape)
    ts = sde.timesteps(steps, device=y.device)
    c_x, c_n = _bcast(forward.coef_x, y), _bcast(forward.coef_n, y)
    for i in range(steps - 1):
        t, t_next = ts[i].expand(shape[0]), ts[i + 1].expand(shape[0])
        dt = ts[i] - ts[i + 1]
        with torch.enable_grad():
            xg, ng = x.detach().requires_grad_(True), n.detach().requires_grad_(True)
            x_mean, n_mean = predictor_mean(d.x_model, sde, xg, t, dt), predictor_mean(d.n_model, sde, ng, t, dt)
            # J^T 1 for both priors from one backward pass (their tape.gradient(x_mean, x))
            jx, jn = torch.autograd.grad(x_mean.sum() + n_mean.sum(), [xg, ng])
        x_mean, n_mean = x_mean.detach(), n_mean.detach()
        a, a_next = _bcast(sde.alpha(t), x), _bcast(sde.alpha(t_next), x)
        res = forward.apply((x_mean / a_next + 1) / 2, (n_mean / a_next + 1) / 2) - y
        sig2 = (_bcast(sde.sigma(t), x) / a) ** 2
        r2 = sig2 / (1 + sig2)
        q2 = r2
        sigma_t = r2 + q2
        beta_dt = _bcast(sde.beta(t), x) * dt
        x = x_mean + torch.sqrt(beta_dt) * noise.randn(shape)
        n = n_mean + torch.sqrt(beta_dt) * noise.randn(shape)
        # their VE step carried back to VP network units: 2 a_t (see the module docstring)
        x = x - 2 * a * s.lambda_x * r2 / sigma_t * c_x * jx * res
        n = n - 2 * a * s.kappa_n * q2 / sigma_t * c_n * jn * res
        if callback is not None:
            callback(i, x, n)
    # the result is the last predictor's means: their last guidance step would be discarded, so it is not taken
    t, dt = ts[-2].expand(shape[0]), ts[-2] - ts[-1]
    a_end = _bcast(sde.alpha(ts[-1].expand(shape[0])), x)
    return predictor_mean(d.x_model, sde, x, t, dt) / a_end, predictor_mean(d.n_model, sde, n, t, dt) / a_end


sample_paper.finishes = True  # type: ignore[attr-defined]
