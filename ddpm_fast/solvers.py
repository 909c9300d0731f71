"""Few-step multistep solvers as coefficient tables: DPM-Solver++ (Lu et al. 2022) and UniPC (Zhao et al. 2023).

For an eps-prediction model every step of these solvers is linear in a handful of tensors, so, like the
DDPM/DDIM tables in ``coefficients.py``, a solver becomes one table row per step and one fused
element-wise update (``kernels.solver_update``, or its torch twin in ``sampler.py``):

    m      = x * SQRT_RECIP_AB - eps * SQRT_RECIPM1_AB                   (this step's x0 prediction)
    xc     = K_X x + K_LAST last + K_M m + sum_j K_Hj h_j                (UniPC's corrector; K_X = 1, rest 0, else)
    last   = xc                                                          (only when the solver corrects)
    x_next = C_X0 m + C_XT xc + C_EPS eps + sum_j C_Hj h_j + SIGMA z
    h_3, h_2, h_1 = h_2, h_1, m                                          (history shift, j = 1 is the newest)

h_j is the x0 prediction of j steps ago, ``last`` UniPC's sample before its last predictor. The
warm-up steps (lower orders while the history fills) and ``lower_order_final`` are rows whose
coefficients on the missing history are zero, so one captured step replays for every step.

Row k belongs to the k-th visited timestep t_k (descending); the step goes from t_k to t_{k+1}, and the
last row to the clean image (diffusers' ``final_sigmas_type="zero"``: alpha = 1, sigma = 0).
Notation: alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), lambda_t = log(alpha_t / sigma_t).
Tables are built in float64 from the schedule and rounded to float32 once for the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import coefficients as C
from .schedule import NoiseSchedule

__all__ = ["SOLVERS", "MULTISTEP_SOLVERS", "SolverSpec", "solver_spec", "solver_timesteps", "spec_timesteps",
           "clipped_last_timestep", "solver_table",
           "solver_orders", "NUM_SOLVER_COLUMNS", "C_H", "K_X", "K_LAST", "K_M", "K_H", "MAX_HISTORY"]

SOLVERS = ("ddpm", "ddim", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "unipc")
MULTISTEP_SOLVERS = ("dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "unipc")
SPACINGS = ("linspace", "leading", "trailing")
MAX_HISTORY = 3

# columns 0..6 are coefficients.py's (T, SQRT_RECIP_AB, SQRT_RECIPM1_AB, C_X0, C_XT, C_EPS, SIGMA); 7 spare
C_H = (8, 9, 10)  # predictor coefficients on h_1, h_2, h_3
K_X, K_LAST, K_M = 11, 12, 13  # corrector coefficients on x, last, m
K_H = (14, 15, 16)  # corrector coefficients on h_1, h_2, h_3
NUM_SOLVER_COLUMNS = 24  # rows stay 32-byte aligned

_DEFAULT_ORDER = {"dpmpp-2m": 2, "dpmpp-3m": 3, "dpmpp-2m-sde": 2, "unipc": 2}
_DEFAULT_TYPE = {"dpmpp-2m": "midpoint", "dpmpp-3m": "midpoint", "dpmpp-2m-sde": "midpoint", "unipc": "bh2"}


@dataclass(frozen=True)
class SolverSpec:
    """One sampler and its options, as diffusers' schedulers name them.

    name: one of SOLVERS. order: solver_order 1..3 (dpmpp-*, unipc; default from the name). solver_type:
    "midpoint"/"heun" (DPM-Solver++) or "bh1"/"bh2" (UniPC). lower_order_final: drop to lower orders on
    the last steps (DPM-Solver++ below 15 steps, UniPC always; DPM-Solver++'s very last step is first
    order anyway with final sigma zero). disable_corrector: UniPC step indices whose corrector is off
    (diffusers' list); corrector=False in :func:`solver_spec` disables it everywhere.
    timestep_spacing / steps_offset: how an int step count becomes timesteps (diffusers' set_timesteps).
    lambda_min_clipped: DPM-Solver++ only (DPMSolverMultistepScheduler's option): an int step count skips
    the noisiest timesteps whose lambda = log(alpha / sigma) lies below it. -inf (the default) skips none;
    the cosine schedule needs it (its alpha-bar reaches ~1e-9 at t = T - 1, where the x0 prediction
    multiplies eps's error by 1 / alpha ~ 3e4); diffusers suggests -5.1 there.
    eta: DDIM's eta (solver "ddim"). use_clipped_model_output: DDIM with clip_x0 recomputes eps from the
    clipped x0 (True, the default) or keeps the model's eps (False: DDIMScheduler.step's default, what
    DDPMPipeline runs).
    """

    name: str
    order: int = 0
    solver_type: str = ""
    lower_order_final: bool = True
    disable_corrector: tuple = ()
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    lambda_min_clipped: float = -math.inf
    eta: float | None = None
    use_clipped_model_output: bool = True
    _checked: bool = field(default=False, repr=False, compare=False)

    @property
    def multistep(self) -> bool:
        return self.name in MULTISTEP_SOLVERS

    @property
    def sde(self) -> bool:
        return self.name == "dpmpp-2m-sde"

    @property
    def corrects(self) -> bool:
        """True when some step runs UniPC's corrector (the update then reads and writes ``last``); with
        the corrector off everywhere UniPC needs neither ``last`` nor the extra history buffer."""
        return self.name == "unipc" and self.disable_corrector != ("all",)

    @property
    def num_history(self) -> int:
        """How many past x0 predictions a step reads: order - 1 (DPM-Solver++), order (UniPC's corrector)."""
        if not self.multistep:
            return 0
        return self.order if self.corrects else self.order - 1

    def as_dict(self) -> dict:
        """The settings as plain values (for logs, run.json and ``FastSampler.settings``)."""
        out = {"solver": self.name}
        if self.multistep:
            out.update(order=self.order, solver_type=self.solver_type, lower_order_final=self.lower_order_final,
                       timestep_spacing=self.timestep_spacing, steps_offset=self.steps_offset)
            if self.lambda_min_clipped != -math.inf:
                out["lambda_min_clipped"] = self.lambda_min_clipped
            if self.corrects:
                out["disable_corrector"] = list(self.disable_corrector)
        elif self.name == "ddim":
            out.update(eta=self.eta, use_clipped_model_output=self.use_clipped_model_output)
        return out


def solver_spec(solver="ddpm", *, order: int | None = None, solver_type: str | None = None,
                lower_order_final: bool = True, corrector: bool = True, disable_corrector=(),
                timestep_spacing: str = "linspace", steps_offset: int = 0, lambda_min_clipped: float = -math.inf,
                eta: float | None = None) -> SolverSpec:
    """A checked :class:`SolverSpec` from a name (or a spec, returned checked). Raises a one-line ValueError."""
    if isinstance(solver, SolverSpec):
        spec = solver
    else:
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
        disabled = disable_corrector
        spec = SolverSpec(name=solver, order=order or _DEFAULT_ORDER.get(solver, 0),
                          solver_type=solver_type or _DEFAULT_TYPE.get(solver, ""),
                          lower_order_final=bool(lower_order_final), disable_corrector=disabled,
                          timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                          lambda_min_clipped=lambda_min_clipped, eta=eta)
        if not corrector:
            spec = replace(spec, disable_corrector=("all",))
    return _check(spec)


def _check(spec: SolverSpec) -> SolverSpec:
    if spec._checked:
        return spec
    if spec.name not in SOLVERS:
        raise ValueError(f"unknown solver {spec.name!r}: use one of {', '.join(SOLVERS)}")
    if spec.name == "ddim":
        eta = 0.0 if spec.eta is None else spec.eta
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"eta must be a float >= 0 for DDIM, got {spec.eta!r}")
        spec = replace(spec, eta=float(eta))
    elif spec.eta is not None:
        raise ValueError(f"eta applies to the 'ddim' solver only, not {spec.name!r}")
    clip = spec.lambda_min_clipped
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or math.isnan(clip) or clip == math.inf:
        raise ValueError(f"lambda_min_clipped must be a number or -inf, got {clip!r}")
    if clip != -math.inf and not spec.name.startswith("dpmpp"):
        raise ValueError(f"lambda_min_clipped applies to the DPM-Solver++ solvers (dpmpp-*), not {spec.name!r} "
                         "(as in diffusers, whose UniPC, DDIM and DDPM schedulers have no such option)")
    spec = replace(spec, lambda_min_clipped=float(clip))
    if not spec.multistep and (spec.order or spec.solver_type or spec.disable_corrector
                               or spec.timestep_spacing != "linspace" or spec.steps_offset
                               or not spec.lower_order_final):
        # ddpm and ddim take diffusers' leading spacing of their own: these options would be ignored
        raise ValueError(f"order, solver_type, lower_order_final, the corrector and the timestep spacing options "
                         f"apply to the multistep solvers ({', '.join(MULTISTEP_SOLVERS)}), not {spec.name!r}")
    if spec.multistep:
        if isinstance(spec.order, bool) or spec.order not in (1, 2, 3):
            raise ValueError(f"solver order must be 1, 2 or 3, got {spec.order!r}")
        types = ("bh1", "bh2") if spec.name == "unipc" else ("midpoint", "heun")
        if spec.solver_type not in types:
            raise ValueError(f"solver_type {spec.solver_type!r} does not fit {spec.name}: use {' or '.join(types)}")
        if spec.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing {spec.timestep_spacing!r} is not supported: use {', '.join(SPACINGS)}")
        if isinstance(spec.steps_offset, bool) or not isinstance(spec.steps_offset, int) or spec.steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {spec.steps_offset!r}")
        disabled = spec.disable_corrector
        if disabled != ("all",):
            try:
                disabled = tuple(sorted({int(i) for i in disabled}))
            except (TypeError, ValueError):
                raise ValueError(f"disable_corrector must be a list of step indices, got {disabled!r}") from None
        if disabled and spec.name != "unipc":
            raise ValueError("the corrector options apply to the 'unipc' solver only")
        if spec.name == "unipc" and spec.order > 1 and not spec.lower_order_final:
            # its last predictor would extrapolate to sigma = 0 (lambda = inf) with order > 1: diffusers gets
            # inf/NaN there too; only final_sigmas_type="sigma_min" (not supported) makes it finite
            raise ValueError("unipc with order > 1 needs lower_order_final=True (the last step ends at sigma 0)")
        spec = replace(spec, disable_corrector=disabled)
    return replace(spec, _checked=True)


def solver_timesteps(num_timesteps: int, n: int, spacing: str = "linspace", steps_offset: int = 0,
                     last_timestep: int | None = None) -> list[int]:
    """The descending timesteps DPMSolverMultistepScheduler / UniPCMultistepScheduler.set_timesteps(n)
    visit: "linspace" rounds linspace(0, L - 1, n + 1) and drops 0; "leading" takes multiples of
    L // (n + 1) plus steps_offset; "trailing" rounds arange(L, 0, -T / n) minus 1. L, the end of the
    range, is T unless lambda_min_clipped moves it (``last_timestep``: see :func:`clipped_last_timestep`);
    "trailing" then visits fewer than n timesteps, as diffusers does."""
    T = num_timesteps
    L = T if last_timestep is None else last_timestep
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"the number of steps must be an int in 1..{T}, got {n!r}")
    if not 1 <= L <= T:
        raise ValueError(f"the last timestep must lie in 1..{T}, got {L!r}")
    if spacing == "linspace":
        steps = np.linspace(0, L - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        steps = (np.arange(0, n + 1) * (L // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        steps = np.arange(L, 0, -T / n).round().astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported: use {', '.join(SPACINGS)}")
    steps = [int(s) for s in steps]
    if not steps or any(a <= b for a, b in zip(steps, steps[1:])) or steps[0] >= T or steps[-1] < 0:
        clipped = (" (where lambda_min_clipped ends the range): use fewer steps, another spacing or a lower "
                   "lambda_min_clipped") if L < T else ": use fewer steps or another spacing"
        raise ValueError(f"{n} steps with {spacing} spacing (offset {steps_offset}) do not give distinct "
                         f"timesteps in 0..{L - 1}{clipped}")
    return steps


def clipped_last_timestep(schedule: NoiseSchedule, lambda_min_clipped: float) -> int:
    """Where DPMSolverMultistepScheduler.set_timesteps ends its range: T minus the number of timesteps
    whose lambda_t = log(alpha_t) - log(sigma_t) is below the clip.

    As diffusers computes it: alpha-bar as a float32 cumulative product of float32 1 - beta (bit for bit
    diffusers' for the cosine schedule; its linear betas come from a float32 linspace, ours are float64
    rounded, so a clip within an ulp of one timestep's lambda may end the range one step apart there).
    """
    T = schedule.num_timesteps
    if lambda_min_clipped == -math.inf:
        return T
    ab = torch.cumprod(1.0 - schedule.betas.float(), dim=0)
    lam = torch.log(ab.sqrt()) - torch.log((1 - ab).sqrt())
    below = int(torch.searchsorted(torch.flip(lam, [0]), torch.tensor(float(lambda_min_clipped))).item())
    if below >= T:
        raise ValueError(f"lambda_min_clipped={lambda_min_clipped} is above every timestep's lambda "
                         f"(max {lam.max().item():.2f}): use a smaller value")
    return T - below


def spec_timesteps(schedule: NoiseSchedule, n: int, spec: SolverSpec) -> list[int]:
    """The descending timesteps a multistep solver visits for an int step count ``n``: diffusers'
    set_timesteps(n) with the spec's spacing, offset and lambda_min_clipped."""
    spec = _check(spec)
    last = clipped_last_timestep(schedule, spec.lambda_min_clipped)
    return solver_timesteps(schedule.num_timesteps, n, spec.timestep_spacing, spec.steps_offset, last)


def solver_orders(spec: SolverSpec, num_steps: int) -> tuple[list[int], list[int]]:
    """(predictor order, corrector order) of every step, as diffusers' step() picks them.

    DPM-Solver++: first order on the first step, at most second on the second; the last step first order
    (final sigma zero), and below 15 steps with lower_order_final the second to last at most second order.
    UniPC: min(order, steps left if lower_order_final, steps done + 1); the corrector at step k uses step
    k - 1's predictor order, 0 where it is off (step 0, disabled steps).
    """
    S, p = num_steps, spec.order
    pred, corr = [], []
    for k in range(S):
        if spec.name == "unipc":
            o = min(p, S - k) if spec.lower_order_final else p
            pred.append(min(o, k + 1))
            off = k == 0 or spec.disable_corrector == ("all",) or (k - 1) in spec.disable_corrector
            corr.append(0 if off else pred[k - 1])
        else:
            done = min(k, p)  # diffusers' lower_order_nums
            if p == 1 or done < 1 or k == S - 1:
                pred.append(1)
            elif p == 2 or done < 2 or (k == S - 2 and spec.lower_order_final and S < 15):
                pred.append(2)
            else:
                pred.append(3)
            corr.append(0)
    return pred, corr


def _alpha_sigma_lambda(ab: float) -> tuple[float, float, float]:
    """alpha, sigma and lambda = log(alpha / sigma) of an alpha-bar; ab = 1 (the clean end) gives lambda = inf."""
    if ab >= 1.0:
        return 1.0, 0.0, math.inf
    return math.sqrt(ab), math.sqrt(1.0 - ab), 0.5 * (math.log(ab) - math.log1p(-ab))


def solver_table(schedule: NoiseSchedule, steps: list[int], spec: SolverSpec) -> torch.Tensor:
    """The (S, NUM_SOLVER_COLUMNS) float64 CPU table of a multistep solver over descending ``steps``."""
    spec = _check(spec)
    if not spec.multistep:
        raise ValueError(f"solver_table builds multistep solvers, not {spec.name!r} (see coefficients.py)")
    S = len(steps)
    ab = schedule.alphas_cumprod.tolist()
    points = [_alpha_sigma_lambda(ab[t]) for t in steps] + [_alpha_sigma_lambda(1.0)]  # + the clean end
    pred, corr = solver_orders(spec, S)
    table = torch.zeros(S, NUM_SOLVER_COLUMNS, dtype=torch.float64)
    for k, t in enumerate(steps):
        row = table[k]
        row[C.T] = t
        row[C.SQRT_RECIP_AB] = 1.0 / points[k][0]
        row[C.SQRT_RECIPM1_AB] = points[k][1] / points[k][0]
        if spec.name == "unipc":
            _unipc_row(row, points, k, pred[k], corr[k], spec.solver_type)
        else:
            _dpmpp_row(row, points, k, pred[k], spec)
    return table


def _dpmpp_row(row: torch.Tensor, points, k: int, order: int, spec: SolverSpec) -> None:
    """DPM-Solver++(2M/3M) and SDE-DPM-Solver++ from t_k to t_{k+1} as coefficients on x, m = h_0, h_1, h_2.

    D0 = m, D1 and D2 are divided differences of the x0 history in lambda; x_next = C x + c0 D0 + c1 D1
    + c2 D2 (+ sigma z), each D a combination of (m, h_1, h_2) written out as a 3-vector.
    """
    a_t, s_t, l_t = points[k + 1]
    _, s_0, l_0 = points[k]
    h = l_t - l_0
    e = math.exp(-h)  # 0 at the clean end (h = inf)
    heun = spec.solver_type == "heun"
    if spec.sde:
        e2 = math.exp(-2.0 * h)
        c_x = s_t / s_0 * e
        c0 = a_t * (1.0 - e2)
        if order == 3 or (order == 2 and heun):
            c1 = a_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
        else:
            c1 = 0.5 * c0 if order == 2 else 0.0
        c2 = a_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) if order == 3 else 0.0
        row[C.SIGMA] = s_t * math.sqrt(1.0 - e2)
    else:
        c_x = s_t / s_0
        c0 = -a_t * (e - 1.0)
        if order == 2:
            c1 = a_t * ((e - 1.0) / h + 1.0) if heun else -0.5 * a_t * (e - 1.0)
        elif order == 3:
            c1 = a_t * ((e - 1.0) / h + 1.0)
        else:
            c1 = 0.0
        c2 = -a_t * ((e - 1.0 + h) / h**2 - 0.5) if order == 3 else 0.0
    D0, D1, D2 = [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    if order >= 2:
        r0 = (l_0 - points[k - 1][2]) / h
        D1_0 = [1.0 / r0, -1.0 / r0, 0.0]
        D1 = D1_0
        if order == 3:
            r1 = (points[k - 1][2] - points[k - 2][2]) / h
            D1_1 = [0.0, 1.0 / r1, -1.0 / r1]
            diff = [u - v for u, v in zip(D1_0, D1_1)]
            D1 = [u + r0 / (r0 + r1) * d for u, d in zip(D1_0, diff)]
            D2 = [d / (r0 + r1) for d in diff]
    weights = [c0 * u + c1 * v + c2 * w for u, v, w in zip(D0, D1, D2)]
    row[K_X] = 1.0  # no corrector: xc = x
    row[C.C_XT] = c_x
    row[C.C_X0] = weights[0]
    row[C_H[0]], row[C_H[1]] = weights[1], weights[2]


def _unipc_rhos(h: float, rks: list[float], order: int, solver_type: str, corrector: bool):
    """UniPC's B(h), h*phi_1 and the rho weights of its divided differences (data prediction, hh = -h).

    rks: lambda offsets (lambda_{s_i} - lambda_{s_0}) / h of the older points, then 1.0 (the new point).
    The predictor solves the (order-1)-system (rho = 0.5 at order 2), the corrector the order-system
    (rho = 0.5 at order 1): R rho = b, R_ij = r_j^i, b_i = phi_{i+1}(hh) * i! / B(h).
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = hh if solver_type == "bh1" else math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial, b = 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = np.array([[r ** i for r in rks] for i in range(order)], dtype=np.float64)
    if corrector:
        rhos = [0.5] if order == 1 else np.linalg.solve(R, np.array(b)).tolist()
    elif order == 1:
        rhos = []
    else:
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], np.array(b[:-1])).tolist()
    return B_h, h_phi_1, rhos


def _unipc_row(row: torch.Tensor, points, k: int, p_order: int, c_order: int, solver_type: str) -> None:
    """UniPC's step k: the corrector UniC-c_order from t_{k-1} to t_k (on last, h_1.., m) and the
    predictor UniP-p_order from t_k to t_{k+1} (on xc, m, h_1..)."""
    # corrector: x = last, m0 = h_1, older points h_2.., the new model output m; xc replaces x
    if c_order:
        a_t, s_t, l_t = points[k]
        _, s_0, l_0 = points[k - 1]
        h = l_t - l_0
        rks = [(points[k - 1 - i][2] - l_0) / h for i in range(1, c_order)] + [1.0]
        B_h, h_phi_1, rhos = _unipc_rhos(h, rks, c_order, solver_type, corrector=True)
        row[K_LAST] = s_t / s_0
        h1 = -a_t * h_phi_1
        for i in range(1, c_order):  # D1_i = (h_{i+1} - h_1) / r_i
            w = -a_t * B_h * rhos[i - 1] / rks[i - 1]
            row[K_H[i]] += w
            h1 -= w
        w = -a_t * B_h * rhos[-1]  # D1_t = m - h_1
        row[K_M] = w
        row[K_H[0]] = h1 - w
    else:
        row[K_X] = 1.0
    # predictor: x = xc, m0 = m, older points h_1..
    a_t, s_t, l_t = points[k + 1]
    _, s_0, l_0 = points[k]
    h = l_t - l_0
    rks = [(points[k - i][2] - l_0) / h for i in range(1, p_order)] + [1.0]
    B_h, h_phi_1, rhos = _unipc_rhos(h, rks, p_order, solver_type, corrector=False)
    row[C.C_XT] = s_t / s_0
    m = -a_t * h_phi_1
    for i in range(1, p_order):  # D1_i = (h_i - m) / r_i
        w = -a_t * B_h * rhos[i - 1] / rks[i - 1]
        row[C_H[i - 1]] = w
        m -= w
    row[C.C_X0] = m
