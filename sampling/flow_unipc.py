"""UniPC multistep over a flow-matching schedule, stepping on the device without host syncs.

diffusers' `UniPCMultistepScheduler.step` (the reference pipeline's scheduler) computes its coefficients as
0-dim tensors on the sample's device: about a hundred tiny kernels per step, and for a corrector of order >= 2 a
`torch.linalg.solve`, which synchronises the host with the device. With a dozen requests in flight each step pays
that once per request and once more per action chunk (docs/benchmarks.md: 17-31 ms of a 65 ms step).

`FlowUniPC` is the same solver for the configurations a flow checkpoint uses (`use_flow_sigmas`,
`prediction_type="flow_prediction"`, `predict_x0`, UniP / UniC of `solver_type` bh2, any `solver_order`,
`lower_order_final`, `disable_corrector`, no thresholding, no `solver_p`): its coefficients are float64 numbers
computed on the host from the schedule's sigmas, and each step is a few fused multiply-adds on the device.
Every update is linear in the sample and the model outputs, so the result equals diffusers' up to float32
rounding (tests/test_flow_unipc.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler


class FlowUniPC:
    """One request's UniPC state over the schedule of a diffusers scheduler whose timesteps are set: the step index,
    the last `solver_order` converted model outputs (x0 predictions) and the sample before the last predictor."""

    def __init__(self, scheduler: UniPCMultistepScheduler) -> None:
        config = scheduler.config
        self.sigmas = scheduler.sigmas.cpu().double().numpy()  # [steps + 1], the last one the final sigma
        self.solver_order = config.solver_order
        self.lower_order_final = config.lower_order_final
        self.disable_corrector = set(config.disable_corrector)
        self.model_outputs: list[torch.Tensor | None] = [None] * self.solver_order  # oldest first
        self.last_sample: torch.Tensor | None = None
        self.step_index = 0

    @staticmethod
    def supports(scheduler) -> bool:
        """Whether `scheduler` is a UniPC configuration this class reproduces."""
        if type(scheduler) is not UniPCMultistepScheduler:
            return False
        config = scheduler.config
        return (config.use_flow_sigmas and config.prediction_type == "flow_prediction" and config.predict_x0
                and config.solver_type == "bh2" and not config.thresholding
                and scheduler.solver_p is None)  # fmt: skip

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = False):
        """diffusers' `step`: the sample at the next sigma (a 1-tuple, as with `return_dict=False`). `timestep` is
        unused: the step index is counted here, as diffusers does after its first step."""
        k = self.step_index
        x0_pred = torch.add(sample, model_output, alpha=-float(self.sigmas[k]))  # flow: x0 = x - sigma * v
        if k > 0 and k - 1 not in self.disable_corrector:  # UniC: the last step's update redone with x0_pred
            sample = self._update(self.last_sample, k - 1, self._order(k - 1), model_t=x0_pred)
        self.model_outputs = self.model_outputs[1:] + [x0_pred]
        self.last_sample = sample
        prev_sample = self._update(sample, k, self._order(k))  # UniP
        self.step_index += 1
        return (prev_sample,)

    def _order(self, k: int) -> int:
        """The order of step k: the solver's, lower for the first steps (warm-up) and, with `lower_order_final`,
        the last ones."""
        final = len(self.sigmas) - 1 - k if self.lower_order_final else self.solver_order
        return min(self.solver_order, final, k + 1)

    def _lambda(self, index: int) -> float:
        """log(alpha / sigma) at sigma index `index`, alpha = 1 - sigma (+inf at sigma 0)."""
        sigma = self.sigmas[index]
        with np.errstate(divide="ignore"):
            return float(np.log(1.0 - sigma) - np.log(sigma))

    def _update(self, x: torch.Tensor, s0: int, order: int, model_t: torch.Tensor | None = None) -> torch.Tensor:
        """UniP (`model_t` None) or UniC (`model_t`: the x0 prediction at s0 + 1) of `order`, bh2, x0 prediction,
        from the sample x at sigma index s0 to s0 + 1, with the model outputs m0 (at s0) and m_i (at s0 - i):

            x_t = sigma_t / sigma_s0 * x - alpha_t * phi * (m0 + sum_i rho_i * D_i [+ rho_t * (model_t - m0)]),

        phi = e^-h - 1 for the log-SNR step h, D_i = (m_i - m0) / r_i, r_i = (lambda_(s0 - i) - lambda_s0) / h, and
        the rhos solving R rho = b (R[p, j] = r_j^p, r_order = 1), as UniPC defines them."""
        t = s0 + 1
        lambda_s0 = self._lambda(s0)
        h = self._lambda(t) - lambda_s0
        phi = math.expm1(-h)  # h phi_1(h) = B(h) (bh2)
        phi_k, factorial, b = phi / -h - 1.0, 1, []
        for i in range(1, order + 1):
            b.append(phi_k * factorial / phi)
            factorial *= i + 1
            phi_k = phi_k / -h - 1.0 / factorial
        with np.errstate(divide="ignore", invalid="ignore"):
            rks = np.array([(self._lambda(s0 - i) - lambda_s0) / h for i in range(1, order)] + [1.0])
        powers = np.vander(rks, order, increasing=True).T
        if model_t is None:
            rhos = [] if order == 1 else [0.5] if order == 2 else np.linalg.solve(powers[:-1, :-1], b[:-1])
        else:
            rhos = [0.5] if order == 1 else np.linalg.solve(powers, b)
        scale = (1.0 - self.sigmas[t]) * phi
        m0 = self.model_outputs[-1]
        out, m0_weight = torch.mul(x, float(self.sigmas[t] / self.sigmas[s0])), -scale
        for i, rho in enumerate(rhos[: order - 1]):  # the history's differences D_i
            with np.errstate(divide="ignore", invalid="ignore"):
                weight = float(scale * rho / rks[i])
            out.add_(self.model_outputs[-(i + 2)], alpha=-weight)
            m0_weight += weight
        if model_t is not None:
            weight = float(scale * rhos[-1])
            out.add_(model_t, alpha=-weight)
            m0_weight += weight
        return out.add_(m0, alpha=float(m0_weight))


def device_scheduler(scheduler):
    """`scheduler` (timesteps set) as the executor steps it: `FlowUniPC` where it applies, else itself."""
    return FlowUniPC(scheduler) if FlowUniPC.supports(scheduler) else scheduler
