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
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler


@dataclass
class Update:
    """Coefficients of one UniP / UniC update (x0 prediction) from sigma s0 to sigma t: the result is
    x_scale * x - m0_scale * m0 - d_scale * (sum_i rho_i * D1_i [+ rho_t * D1_t]), rhos from powers @ rhos = b."""

    x_scale: float  # sigma_t / sigma_s0
    m0_scale: float  # alpha_t * (e^-h - 1), h the log-SNR step
    d_scale: float  # alpha_t * B(h), B(h) = e^-h - 1 (bh2)
    rks: np.ndarray  # [order] the history's log-SNR offsets over h, then 1
    b: np.ndarray  # [order]
    powers: np.ndarray  # [order, order] R[i, j] = rks[j] ** i


class FlowUniPC:
    """One request's UniPC state: the schedule (`timesteps`, `sigmas`) of a diffusers scheduler whose timesteps are
    set, the last converted model outputs (x0 predictions) and the sample before the last predictor."""

    def __init__(self, scheduler: UniPCMultistepScheduler) -> None:
        config = scheduler.config
        self.timesteps = scheduler.timesteps
        self.sigmas = scheduler.sigmas.cpu().double().numpy()  # [steps + 1], the last one the final sigma
        self.order = config.solver_order
        self.lower_order_final = config.lower_order_final
        self.disable_corrector = set(config.disable_corrector)
        self.model_outputs: list[torch.Tensor | None] = [None] * self.order  # oldest first
        self.last_sample: torch.Tensor | None = None
        self.this_order = 0
        self.lower_order_nums = 0
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
        if k > 0 and k - 1 not in self.disable_corrector and self.last_sample is not None:
            sample = self._corrector(x0_pred)
        self.model_outputs = self.model_outputs[1:] + [x0_pred]
        this_order = min(self.order, len(self.timesteps) - k) if self.lower_order_final else self.order
        self.this_order = min(this_order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev_sample = self._predictor(sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        self.step_index += 1
        return (prev_sample,)

    def _lambda(self, index: int) -> float:
        """log(alpha / sigma) at sigma index `index`, alpha = 1 - sigma (+inf at sigma 0)."""
        sigma = self.sigmas[index]
        with np.errstate(divide="ignore"):
            return float(np.log(1.0 - sigma) - np.log(sigma))

    def _update(self, order: int, s0: int, t: int, history: list[int]) -> Update:
        """The coefficients of a UniP / UniC update of `order` from sigma index s0 to t, with the model outputs of
        the `history` indices (newest first) before s0's."""
        lambda_t, lambda_s0 = self._lambda(t), self._lambda(s0)
        h = lambda_t - lambda_s0
        hh = -h  # predict_x0
        h_phi_1 = b_h = math.expm1(hh)  # bh2: B(h) = e^-h - 1
        h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1, []
        for i in range(1, order + 1):
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        with np.errstate(divide="ignore", invalid="ignore"):
            rks = np.array([(self._lambda(si) - lambda_s0) / h for si in history] + [1.0])
        alpha_t = 1.0 - self.sigmas[t]
        return Update(self.sigmas[t] / self.sigmas[s0], alpha_t * h_phi_1, alpha_t * b_h, rks,
                      np.array(b), np.vander(rks, order, increasing=True).T)  # fmt: skip

    def _predictor(self, x: torch.Tensor) -> torch.Tensor:
        """UniP of order `this_order` from the current sigma to the next."""
        k, order, m0 = self.step_index, self.this_order, self.model_outputs[-1]
        update = self._update(order, k, k + 1, history=[k - i for i in range(1, order)])
        out = torch.mul(x, float(update.x_scale)).add_(m0, alpha=-float(update.m0_scale))
        if order > 1:
            rhos = [0.5] if order == 2 else np.linalg.solve(update.powers[:-1, :-1], update.b[:-1])
            self._add_differences(out, m0, rhos, update)
        return out

    def _corrector(self, x0_pred: torch.Tensor) -> torch.Tensor:
        """UniC of the last step's order: the last predictor's update redone with the new model output x0_pred."""
        k, order, m0 = self.step_index, self.this_order, self.model_outputs[-1]
        update = self._update(order, k - 1, k, history=[k - (i + 1) for i in range(1, order)])
        rhos = [0.5] if order == 1 else np.linalg.solve(update.powers, update.b)
        out = torch.mul(self.last_sample, float(update.x_scale)).add_(m0, alpha=-float(update.m0_scale))
        self._add_differences(out, m0, rhos[:-1], update)
        weight = float(update.d_scale * rhos[-1])  # on D1_t = x0_pred - m0
        return out.add_(x0_pred, alpha=-weight).add_(m0, alpha=weight)

    def _add_differences(self, out: torch.Tensor, m0: torch.Tensor, rhos, update: Update) -> None:
        """out -= d_scale * sum_i rhos[i] * D1_i, D1_i = (m_i - m0) / rk_i with m_i the (i + 1)-th newest output."""
        for i, rho in enumerate(rhos):
            with np.errstate(divide="ignore", invalid="ignore"):
                weight = float(update.d_scale * rho / update.rks[i])
            out.add_(self.model_outputs[-(i + 2)], alpha=-weight).add_(m0, alpha=weight)


def device_scheduler(scheduler):
    """`scheduler` (timesteps set) as the executor steps it: `FlowUniPC` where it applies, else itself."""
    return FlowUniPC(scheduler) if FlowUniPC.supports(scheduler) else scheduler
