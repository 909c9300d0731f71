"""FastSampler: DDPM, DDIM and few-step solvers (DPM-Solver++, UniPC) as fast as the hardware allows, same
images as the oracle.

Follow one image from noise to pixels:

1. Its seed (a uint32) keys all of its noise: x_T = noise(seed, step T), and the z added at the step that
   visits model timestep t is noise(seed, step t) (Philox, ``ddpm_fast.philox`` / ``kernels.random``).
   So an image depends on its seed alone, never on its batch or position in it.
2. The sampler keeps a batch of such images in static buffers (x in float32, channels-last), a step
   counter on the device and a coefficient table (``coefficients.reverse_table``, one row per step).
3. One step = eps = U-Net(x, t) under autocast (bf16 on CUDA) with t read from the device, then the fused
   reverse update ``kernels.reverse_update`` (x0, clip, posterior mean, in-kernel noise: one launch),
   then counter += 1. On CUDA that step is captured once as a CUDA graph and replayed S times; nothing
   in the loop talks to the host. The multistep solvers (``solvers.py``) keep their last x0 predictions
   (and UniPC its last sample) in static buffers beside x and use ``kernels.solver_update`` instead; their
   lower-order first and last steps are table rows, so the same single captured step replays.
4. After the last step x is x_0 in [-1, 1]; ``(x + 1) / 2`` makes pixels (see ``pipeline.py``).

Every optimisation is a switch (compile, cuda_graph, fused_update, embedding_table, channels_last,
dtype), so a benchmark can show what each one buys; every combination computes the same images up to
float rounding. On the CPU the GPU-only ones are off and the same code runs eagerly (the CI path).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch

from . import coefficients as coef
from . import ops, philox, solvers
from .checks import check_variance, host_to_device, model_device, resolve_timesteps
from .schedule import NoiseSchedule

__all__ = ["FastSampler", "reverse_update_torch", "solver_update_torch", "model_image_shape"]

SEED_LIMIT = 2**32  # seeds are uint32: the low half of the Philox key
DEFAULT_BATCH_SIZE = 256
AUTOCAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _step_noise(seeds: torch.Tensor, step: torch.Tensor, shape) -> torch.Tensor:
    """The seed-keyed z of one step: (B, *shape) float32, image b keyed by (seeds[b], step[b]).

    seeds, step: int64 (B,) device tensors. Unlike ``ops.seeded_noise`` this reads no values on the
    host (no range checks), so it can be captured in a CUDA graph.
    """
    return philox.seeded_normal(seeds, step, math.prod(shape)).view(seeds.shape[0], *shape)


def reverse_update_torch(x_t, eps, table, row, noise=None, clip=None) -> torch.Tensor:
    """The torch twin of ``kernels.reverse_update`` (unfused: a handful of element-wise ops).

    x_t: (B, C, H, W) float32; eps: same shape, any float dtype; table: (S, 8) float32 on x_t's device
    (``coefficients`` layout); row: int64 (1,) device tensor (the step counter); noise: z of x_t's shape
    or None (z = 0); clip: None or r > 0 to clamp the predicted x0 to [-r, r]. Returns x_prev, float32.
    """
    c = table.index_select(0, row).view(-1, coef.NUM_COLUMNS, 1, 1, 1).unbind(1)  # each (1, 1, 1, 1)
    e = eps.float()
    x0 = x_t * c[coef.SQRT_RECIP_AB] - e * c[coef.SQRT_RECIPM1_AB]
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    x_prev = c[coef.C_X0] * x0 + c[coef.C_XT] * x_t + c[coef.C_EPS] * e
    if noise is not None:
        x_prev = x_prev + c[coef.SIGMA] * noise
    return x_prev


def solver_update_torch(x, eps, table, row, history=(), last=None, noise=None) -> torch.Tensor:
    """The torch twin of ``kernels.solver_update``: one multistep-solver step, x, history and last in place.

    x: (B, C, H, W) float32; eps: same shape, any float dtype; table: (S, 24) float32 (``solvers`` layout)
    on x's device; row: int64 (1,) device tensor; history: 0-3 float32 tensors like x (h_1 newest); last:
    like x when the solver corrects (UniPC), else None; noise: z like x or None (z = 0). Returns x.
    """
    c = table.index_select(0, row).view(-1, solvers.NUM_SOLVER_COLUMNS, 1, 1, 1).unbind(1)  # each (1, 1, 1, 1)
    e = eps.float()
    m = x * c[coef.SQRT_RECIP_AB] - e * c[coef.SQRT_RECIPM1_AB]
    xc = x
    if last is not None:
        xc = c[solvers.K_X] * x + c[solvers.K_LAST] * last + c[solvers.K_M] * m
        for h, k in zip(history, solvers.K_H):
            xc = xc + c[k] * h
        last.copy_(xc)
    x_next = c[coef.C_X0] * m + c[coef.C_XT] * xc + c[coef.C_EPS] * e
    for h, k in zip(history, solvers.C_H):
        x_next = x_next + c[k] * h
    if noise is not None:
        x_next = x_next + c[coef.SIGMA] * noise
    for newer, older in zip(history[-2::-1], history[:0:-1]):  # h_3 <- h_2, h_2 <- h_1
        older.copy_(newer)
    if history:
        history[0].copy_(m)
    return x.copy_(x_next)


@dataclass
class _Run:
    """Static state of one batch geometry: the buffers a captured graph reads and writes.

    A CUDA graph records tensor addresses, so these buffers live as long as the run and are refilled,
    never replaced. graphs maps a number of steps to the graph that performs that many steps.
    """

    x: torch.Tensor  # (B, C, H, W) float32 current sample, compute memory format, updated in place
    seeds: torch.Tensor  # (B,) int64 per-image noise keys
    noise: torch.Tensor | None  # (B, C, H, W) float32 z from a torch.Generator, else None (seed-keyed)
    counter: torch.Tensor  # (1,) int64 index of the current table row (the step), advanced on device
    history: tuple = ()  # multistep solvers: their last x0 predictions, like x, newest first
    last: torch.Tensor | None = None  # UniPC: the sample before its last predictor, like x
    graphs: dict = field(default_factory=dict)
    pool: object = None  # CUDA graph memory pool shared by this run's graphs
    eager: bool = False  # capture failed: replay the same step eagerly

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def state(self) -> list:
        """Every buffer a step updates: x, the solver history and last."""
        return [self.x, *self.history, *([self.last] if self.last is not None else [])]


class FastSampler:
    """Sample images from an eps-prediction model with a compiled, CUDA-graph-captured loop.

    model: a ``ddpm_fast.UNet``, a diffusers ``UNet2DModel`` or any callable ``model(x, t) -> eps``
    (x (B, C, H, W) float, t int64 (B,); outputs with ``.sample`` or tuples are unwrapped). nn.Modules
    are deep-copied: the sampler never changes the caller's model (eval mode, memory format, tables).
    schedule: the ``NoiseSchedule`` the model was trained with.
    timesteps: None (all T steps), an int n or a descending list. An int n takes diffusers' spacing:
        "leading" (DDPMScheduler's) for ddpm/ddim, the solver's ``timestep_spacing`` (default "linspace",
        as DPMSolverMultistepScheduler and UniPCMultistepScheduler) for the multistep solvers.
    solver: "ddpm" (ancestral), "ddim", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "unipc" or a
        ``solvers.SolverSpec``; None = "ddim" when eta is given, else "ddpm". The multistep solvers match
        diffusers' schedulers at their defaults (lower_order_final, final sigma zero, midpoint / bh2 with
        the corrector). solver_options: their options as keyword arguments of ``solvers.solver_spec``
        (order, solver_type, lower_order_final, corrector, disable_corrector, timestep_spacing, steps_offset,
        lambda_min_clipped).
    variance: "fixed_large" (sigma^2 = beta, Ho's CIFAR-10 choice) or "fixed_small" (posterior variance).
    clip_x0: False, True (clamp the predicted x0 to [-1, 1]) or a range r > 0 (clamp to [-r, r]); ddpm
        and ddim only (diffusers' multistep schedulers have no clipping).
    eta: None for DDPM ancestral steps, a float >= 0 for DDIM (0 = deterministic).
    dtype: autocast dtype of the model: None = bfloat16 on CUDA, float32 on CPU. The sample itself and
        the update math stay float32.
    channels_last: run the model and keep x in channels-last memory format (tensor cores like NHWC).
    compile: None = torch.compile on CUDA only; True/False forces it; a string picks the mode. On CUDA
        the default mode is "max-autotune-no-cudagraphs" (the sampler captures graphs itself). Inductor's
        own CUDA graphs cannot nest inside the sampler's capture, so with cuda_graph on "max-autotune"
        runs as its "max-autotune-no-cudagraphs" twin (``settings["compile"]`` says so) and
        "reduce-overhead" (default + inductor's graphs, no twin) is refused with a ValueError; with
        cuda_graph=False every mode runs as asked.
    cuda_graph: capture the step as a CUDA graph and replay it (CUDA only).
    steps_per_graph: how many steps one graph holds (fewer replays, bigger graphs).
    fused_update: the Triton reverse-update kernel with in-kernel noise (CUDA; on the CPU only under
        TRITON_INTERPRET=1 with DDPM_FAST_BACKEND=triton); False = the torch twin.
    embedding_table: for models with ``precompute_time_embeddings`` (ddpm_fast.UNet), precompute every
        resblock's time projection for all T timesteps once.
    device: where to sample; None = the model's device.
    image_shape: (C, H, W); None = read from ``model.config`` (sample_size, in_channels).
    """

    def __init__(
        self,
        model,
        schedule: NoiseSchedule,
        *,
        timesteps=None,
        solver=None,
        solver_options: dict | None = None,
        variance: str = "fixed_large",
        clip_x0: bool | float = False,
        eta: float | None = None,
        dtype: torch.dtype | None = None,
        channels_last: bool = True,
        compile: bool | str | None = None,
        cuda_graph: bool = True,
        steps_per_graph: int = 1,
        fused_update: bool = True,
        embedding_table: bool = True,
        device=None,
        image_shape=None,
    ):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a ddpm_fast.NoiseSchedule, got {type(schedule).__name__}")
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t) -> eps, got {type(model).__name__}")
        self.schedule = schedule
        self.variance = check_variance(variance)
        self.clip = _clip_range(clip_x0)
        self.solver = _resolve_solver(solver, solver_options, eta)
        self.eta = self.solver.eta
        if self.solver.multistep and self.clip is not None:
            raise ValueError(f"clip_x0 is not available with {self.solver.name}: diffusers' multistep schedulers "
                             "do not clip x0 (use solver='ddpm' or 'ddim' to clip)")
        self.device = torch.device(device) if device is not None else model_device(model)
        on_cuda = self.device.type == "cuda"
        self.image_shape = model_image_shape(model, image_shape)

        self.dtype = dtype if dtype is not None else (torch.bfloat16 if on_cuda else torch.float32)
        if self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"dtype must be one of float32, bfloat16, float16 (the autocast dtype), got {self.dtype}")
        if not isinstance(steps_per_graph, int) or isinstance(steps_per_graph, bool) or steps_per_graph < 1:
            raise ValueError(f"steps_per_graph must be an int >= 1, got {steps_per_graph!r}")
        self.channels_last = bool(channels_last)
        self.cuda_graph = bool(cuda_graph) and on_cuda
        self.steps_per_graph = steps_per_graph
        self.update_backend = _update_backend(self.device, fused_update)
        self.compile_mode = _compile_mode(compile, on_cuda, self.cuda_graph)

        self.model = self._prepare_model(model, embedding_table)
        self._predict_eps = self._eps_function()
        self._runs: dict = {}
        self.set_timesteps(timesteps)

    # -- preparation (once) -------------------------------------------------------------------------
    def _prepare_model(self, model, embedding_table: bool):
        """Our own copy of the model: eval mode, on the device, channels-last, time table if it has one."""
        if not isinstance(model, torch.nn.Module):
            self.embedding_table = False
            return model
        model = copy.deepcopy(model).eval().requires_grad_(False).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.embedding_table = bool(embedding_table) and hasattr(model, "precompute_time_embeddings")
        if self.embedding_table:
            model.precompute_time_embeddings(self.schedule.num_timesteps)
        return model

    def _eps_function(self):
        """eps = model(x, t) under autocast, unwrapped to a tensor; compiled when asked."""
        model, device_type = self.model, self.device.type
        use_autocast = self.dtype != torch.float32

        def predict_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture
            with torch.autocast(device_type, dtype=self.dtype, enabled=use_autocast, cache_enabled=False):
                out = model(x, t)
            if hasattr(out, "sample"):  # diffusers' UNet2DOutput
                out = out.sample
            elif isinstance(out, (tuple, list)):
                out = out[0]
            return out

        if self.compile_mode is None:
            return predict_eps
        # dynamic=False: one specialised graph per batch size (each batch size gets its own capture anyway)
        return torch.compile(predict_eps, mode=self.compile_mode, dynamic=False)

    def set_timesteps(self, timesteps=None) -> None:
        """Choose the visited timesteps (None, an int count or a descending list); drops cached captures."""
        spec, T = self.solver, self.schedule.num_timesteps
        if spec.multistep and isinstance(timesteps, int) and not isinstance(timesteps, bool):
            self._set_steps(solvers.spec_timesteps(self.schedule, timesteps, spec))
        else:
            self._set_steps(resolve_timesteps(timesteps, T))

    def _set_steps(self, steps: list[int], last_sigma: float | None = None) -> None:
        """Build the coefficient table for ``steps``. last_sigma overrides the noise std of the last
        step (0 by default): diffusers' scheduler adds noise at the last step whenever its t > 0."""
        if self.solver.multistep:
            table = solvers.solver_table(self.schedule, steps, self.solver)
        else:
            table = coef.reverse_table(self.schedule, steps, self.variance, self.clip is not None, self.eta,
                                       recompute_eps=self.solver.use_clipped_model_output)
        if last_sigma is not None:
            table[-1, coef.SIGMA] = float(last_sigma)
        self.timesteps = list(steps)
        self.table = table.to(device=self.device, dtype=torch.float32)  # (S, 8 or 24), read on device each step
        self._t_steps = torch.tensor(steps, dtype=torch.int64, device=self.device)  # (S,) model timesteps
        self._draws_noise = (table[:, coef.SIGMA] != 0).tolist()  # which steps consume a generator draw
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget every captured graph and its static buffers (they hold device memory)."""
        self._runs.clear()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def settings(self) -> dict:
        """What is actually switched on (after CPU/GPU resolution): for benchmarks and logs."""
        return {
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "channels_last": self.channels_last, "compile": self.compile_mode, "cuda_graph": self.cuda_graph,
            "steps_per_graph": self.steps_per_graph, "update": self.update_backend,
            "embedding_table": self.embedding_table, "steps": self.num_steps, "variance": self.variance,
            "clip_x0": self.clip, "eta": self.eta, **self.solver.as_dict(),
        }

    def __repr__(self) -> str:
        return f"FastSampler({', '.join(f'{k}={v!r}' for k, v in self.settings.items())})"

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int | None = None, seeds=None, batch_size: int | None = None, generator=None,
               clamp: bool = True) -> torch.Tensor:
        """Generate images: (N, C, H, W) float32 on the sampler's device, in [-1, 1] when clamp=True.

        seeds: N uint32 seeds (list, range or int64 tensor); image i is a pure function of seeds[i], at
            any batch size. None: n seeds drawn from torch's global RNG (torch.manual_seed repeats them).
        generator: instead of seeds, a torch.Generator (or a list of N) drawing noise in DDPMPipeline's
            order: x_T = randn((N, C, H, W)), then one z per noisy step, on the generator's device. The
            N images then form one batch (the draw order couples them).
        batch_size: images per step (default min(N, 256)); a short last batch is padded, not recompiled.
        clamp: clamp the final x_0 to [-1, 1] (the oracle returns it unclamped).
        """
        if generator is not None:
            if seeds is not None:
                raise ValueError("give seeds (seed-keyed noise) or generator (DDPMPipeline's noise), not both")
            out = self._sample_with_generator(_check_count(n), generator)
        else:
            out = self._sample_seeded(_resolve_seeds(n, seeds), batch_size)
        return out.clamp_(-1.0, 1.0) if clamp else out

    def _sample_seeded(self, seeds: torch.Tensor, batch_size) -> torch.Tensor:
        total = seeds.shape[0]
        batch = min(_check_batch_size(batch_size), total)
        # NaN-filled so a slot the loop failed to write can never pass as an image
        out = torch.full((total, *self.image_shape), float("nan"), dtype=torch.float32, device=self.device)
        # pad a short last batch with copies of its last seed: images are independent, so the extra rows
        # are discarded and the batch keeps its compiled graph and capture
        padded_all = torch.cat([seeds, seeds[-1:].expand(-total % batch)])
        # every batch's seeds reach the device in one pinned, non-blocking copy: a copy from pageable
        # memory would make the host wait for the GPU once per batch
        device_seeds = host_to_device(padded_all, self.device)
        for start in range(0, total, batch):
            chunk = seeds[start:start + batch]
            padded = padded_all[start:start + batch]
            run = self._run_for(batch, generator_noise=False)
            run.seeds.copy_(device_seeds[start:start + batch])  # device to device
            # from the CPU seeds (already range-checked): checking device seeds would sync
            x_T = ops.seeded_noise(padded, self.schedule.num_timesteps, self.image_shape, device=self.device,
                                   backend=self.update_backend)  # noise step T
            run.x.copy_(x_T)
            self._denoise(run)
            out[start:start + chunk.shape[0]] = run.x[:chunk.shape[0]]
        return out

    def _sample_with_generator(self, n: int, generator) -> torch.Tensor:
        draw = _generator_draw(generator, (n, *self.image_shape), self.device)
        run = self._run_for(n, generator_noise=True)
        run.x.copy_(draw())  # x_T: the first draw, as DDPMPipeline makes it
        self._denoise(run, draw=draw)  # then one draw before each noisy step
        return run.x.clone(memory_format=torch.contiguous_format)

    def _denoise(self, run: _Run, draw=None) -> None:
        """Run every step on run.x in place. draw: None (seed-keyed noise) or a function returning the
        next generator draw, copied into run.noise before each noisy step."""
        run.counter.zero_()
        for buffer in run.state[1:]:  # zero, not stale: a zero coefficient times a NaN left over is NaN
            buffer.zero_()
        if draw is not None:  # a host-side draw before each step: one step per replay
            for noisy in self._draws_noise:
                if noisy:
                    run.noise.copy_(draw(), non_blocking=True)
                self._replay(run, 1)
            return
        steps_left = self.num_steps
        while steps_left:
            chunk = min(self.steps_per_graph, steps_left)
            self._replay(run, chunk)
            steps_left -= chunk

    def _replay(self, run: _Run, steps: int) -> None:
        """Perform ``steps`` steps: replay their captured graph, or run the step eagerly."""
        graph = run.graphs.get(steps) if self.cuda_graph and not run.eager else None
        if graph is None and self.cuda_graph and not run.eager:
            graph = self._capture(run, steps)
        if graph is not None:
            graph.replay()
        else:
            for _ in range(steps):
                self._step(run)

    def _step(self, run: _Run) -> None:
        """One denoising step on the static buffers; reads the step from run.counter (graph-safe)."""
        t = self._t_steps.index_select(0, run.counter).expand(run.batch)  # (B,) int64, on device
        eps = self._predict_eps(run.x, t)
        if self.solver.multistep:
            self._solver_step(run, eps, t)
        elif self.update_backend == "triton":
            from . import kernels

            seeds = None if run.noise is not None else run.seeds
            # in place: each element is read and written by the same program (eps is already computed)
            kernels.reverse_update(run.x, eps, self.table, run.counter, out=run.x, seeds=seeds,
                                   noise=run.noise, clip=self.clip)
        else:
            z = run.noise if run.noise is not None else _step_noise(run.seeds, t, self.image_shape)
            run.x.copy_(reverse_update_torch(run.x, eps, self.table, run.counter, z, self.clip))
        run.counter.add_(1)

    def _solver_step(self, run: _Run, eps: torch.Tensor, t: torch.Tensor) -> None:
        """The fused multistep update: x, history and last in place, the row from run.counter."""
        seeded = self.solver.sde and run.noise is None
        if self.update_backend == "triton":
            from . import kernels

            # a generator's z only matters to the SDE solver (sigma is 0 in the ODE solvers' tables)
            kernels.solver_update(run.x, eps, self.table, run.counter, run.history, run.last,
                                  seeds=run.seeds if seeded else None, noise=run.noise if self.solver.sde else None)
        else:
            z = _step_noise(run.seeds, t, self.image_shape) if seeded else (run.noise if self.solver.sde else None)
            solver_update_torch(run.x, eps, self.table, run.counter, run.history, run.last, z)

    # -- static buffers and CUDA graphs ---------------------------------------------------------------
    def _run_for(self, batch: int, generator_noise: bool) -> _Run:
        """The cached static state for this batch size and noise source (made on first use)."""
        key = (batch, generator_noise)  # image shape and dtype are fixed per sampler
        run = self._runs.get(key)
        if run is None:
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format

            def image_buffer() -> torch.Tensor:
                return torch.zeros((batch, *self.image_shape), dtype=torch.float32, device=self.device
                                   ).contiguous(memory_format=fmt)

            run = _Run(x=image_buffer(),
                       seeds=torch.zeros(batch, dtype=torch.int64, device=self.device),
                       noise=image_buffer() if generator_noise else None,
                       counter=torch.zeros(1, dtype=torch.int64, device=self.device),
                       history=tuple(image_buffer() for _ in range(self.solver.num_history)),
                       last=image_buffer() if self.solver.corrects else None)
            self._check_model_output(run)
            self._runs[key] = run
        return run

    def _check_model_output(self, run: _Run) -> None:
        """One eager forward on the zero buffers: a clear error for a model of the wrong shape."""
        eps = self._predict_eps(run.x, self._t_steps[:1].expand(run.batch))
        if not isinstance(eps, torch.Tensor) or tuple(eps.shape) != tuple(run.x.shape):
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"the model must return eps of the input's shape {tuple(run.x.shape)}, got {got} "
                             "(models predicting a learned variance or v are not supported)")

    def _capture(self, run: _Run, steps: int):
        """Capture ``steps`` steps as one CUDA graph (after warm-up), or fall back to eager steps."""
        # the sampler's device, whatever the caller's current device is: torch.cuda.graph makes its
        # capture stream (and the pool handle its memory) on the current device
        with torch.cuda.device(self.device):
            return self._capture_on_device(run, steps)

    def _capture_on_device(self, run: _Run, steps: int):
        # warm-up and capture must leave the sample (x_T is already in place) and solver state where they were
        saved_state, saved_counter = [b.clone() for b in run.state], run.counter.clone()
        if run.pool is None:
            # warm-up on a side stream (torch's recipe): compiles, autotunes, allocates workspaces
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    run.counter.zero_()  # stay inside the table however short it is
                    self._step(run)
            torch.cuda.current_stream(self.device).wait_stream(side)
            run.pool = torch.cuda.graph_pool_handle()
            run.counter.copy_(saved_counter)
        graph = torch.cuda.CUDAGraph()
        caller_stream = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph, pool=run.pool, stream=torch.cuda.Stream(self.device)):
                for _ in range(steps):
                    self._step(run)
        except Exception as err:  # never silently wrong: warn and replay the same step eagerly
            warnings.warn(f"CUDA graph capture failed ({type(err).__name__}: {err}); sampling eagerly",
                          RuntimeWarning, stacklevel=3)
            run.eager = True
            graph = None
        finally:
            # torch.cuda.graph ends the capture before it restores the caller's stream: when capture_end
            # raises, the capture stream stays current, and the eager steps would run on it unordered
            # with the caller's work
            torch.cuda.set_stream(caller_stream)
        # capture records kernels without running them, but a failed capture may have run some: restore
        for buffer, saved in zip(run.state, saved_state):
            buffer.copy_(saved)
        run.counter.copy_(saved_counter)
        if graph is not None:
            run.graphs[steps] = graph
        return graph


# -- helpers ------------------------------------------------------------------------------------------
def _resolve_solver(solver, options, eta) -> "solvers.SolverSpec":
    """The checked SolverSpec of FastSampler's solver / solver_options / eta arguments."""
    if solver is None:
        solver = "ddim" if eta is not None else "ddpm"
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"solver_options must be a dict of solver_spec keyword arguments, got {type(options).__name__}")
    if isinstance(solver, solvers.SolverSpec):
        if options:
            raise ValueError("give the solver options in the SolverSpec or in solver_options, not both")
        if eta is not None and solver.eta != eta:
            raise ValueError("give eta in the SolverSpec or as eta=, not both")
        return solvers.solver_spec(solver)
    if eta is not None and solver != "ddim":
        raise ValueError(f"eta is DDIM's parameter: use solver='ddim' (or leave solver unset), not {solver!r}")
    try:
        return solvers.solver_spec(solver, eta=eta, **(options or {}))
    except TypeError as err:
        raise ValueError(f"bad solver_options: {err}") from None

def _clip_range(clip_x0) -> float | None:
    if clip_x0 is None or clip_x0 is False:
        return None
    if clip_x0 is True:
        return 1.0
    if isinstance(clip_x0, (int, float)) and float(clip_x0) > 0:
        return float(clip_x0)
    raise ValueError(f"clip_x0 must be False, True or a range r > 0 (clamp x0 to [-r, r]), got {clip_x0!r}")



def model_image_shape(model, image_shape) -> tuple[int, int, int]:
    """(C, H, W) from the argument or from model.config (ddpm_fast and diffusers configs both work)."""
    if image_shape is None:
        config = getattr(model, "config", None)
        size, channels = getattr(config, "sample_size", None), getattr(config, "in_channels", None)
        if size is None or channels is None:
            raise ValueError("cannot read the image size from the model (no config.sample_size/in_channels): "
                             "pass image_shape=(C, H, W)")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        image_shape = (channels, height, width)
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    return shape


def _update_backend(device: torch.device, fused_update: bool) -> str:
    """"triton" (the fused kernel) or "torch" (its unfused twin) for this device: ``ops.resolve_backend``'s
    choice (DDPM_FAST_BACKEND overrides "auto") for the float32 sample buffer."""
    if not fused_update:
        return "torch"
    return ops.resolve_backend("auto", torch.empty(0, device=device))


# torch.compile modes that turn on inductor's own CUDA graphs, and their twin without them (if any)
_INDUCTOR_GRAPH_MODES = {"max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": None}


def _compile_mode(compile, on_cuda: bool, cuda_graph: bool) -> str | None:
    """The torch.compile mode, or None for eager (see FastSampler's ``compile``)."""
    if compile is None:
        compile = on_cuda
    if isinstance(compile, str):
        if not (cuda_graph and compile in _INDUCTOR_GRAPH_MODES):
            return compile
        twin = _INDUCTOR_GRAPH_MODES[compile]
        if twin is None:  # inductor's graph would be captured inside ours: replays would read stale inputs
            raise ValueError(f"compile mode {compile!r} captures inductor's own CUDA graphs, which cannot run inside "
                             "the sampler's graph: use compile='default' or 'max-autotune-no-cudagraphs' (or "
                             "cuda_graph=False to let inductor capture instead)")
        return twin
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be None, a bool or a torch.compile mode string, got {compile!r}")
    if not compile:
        return None
    # the sampler captures its own CUDA graphs: inductor's would nest inside ours
    return "max-autotune-no-cudagraphs" if on_cuda else "default"


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the number of images) must be an int >= 1, got {n!r}")
    return n


def _check_batch_size(batch_size) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


def _resolve_seeds(n, seeds) -> torch.Tensor:
    """The (N,) int64 CPU seed tensor from ``seeds`` or, when None, n seeds from torch's global RNG."""
    if seeds is None:
        if n is None:
            raise ValueError("give n (how many images) or seeds (one uint32 per image)")
        return torch.randint(0, SEED_LIMIT, (_check_count(n),), dtype=torch.int64)
    if isinstance(seeds, torch.Tensor):
        if seeds.is_floating_point() or seeds.dtype == torch.bool or seeds.ndim != 1:
            raise TypeError(f"seeds must be a 1-D integer tensor, got dtype {seeds.dtype} shape {tuple(seeds.shape)}")
        seeds = seeds.detach().to("cpu", torch.int64)
    else:
        try:
            values = [int(s) for s in seeds]
        except (TypeError, ValueError):
            raise TypeError(f"seeds must be a sequence of ints, got {seeds!r}") from None
        seeds = torch.tensor(values, dtype=torch.int64)
    if seeds.numel() == 0:
        raise ValueError("seeds is empty: give at least one seed")
    if n is not None and _check_count(n) != seeds.numel():
        raise ValueError(f"n={n} but {seeds.numel()} seeds were given: pass one seed per image "
                         "(or only one of n and seeds)")
    if int(seeds.min()) < 0 or int(seeds.max()) >= SEED_LIMIT:
        raise ValueError(f"seeds must lie in [0, 2**32), got {int(seeds.min())}..{int(seeds.max())}")
    return seeds


def _generator_draw(generator, shape, device: torch.device):
    """A function returning the next N(0, 1) draw of ``shape`` exactly as diffusers' randn_tensor makes it:
    on the generator's device (a CPU generator draws on the CPU, then the tensor moves), float32.
    A list of generators draws each image from its own generator."""
    generators = generator if isinstance(generator, (list, tuple)) else None
    if generators is not None:
        if len(generators) != shape[0]:
            raise ValueError(f"got {len(generators)} generators for {shape[0]} images: pass one per image")
        if not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError("generator must be a torch.Generator or a list of them")
        if len(generators) == 1:
            generator, generators = generators[0], None
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")

    def draw() -> torch.Tensor:
        if generators is None:
            return host_to_device(torch.randn(shape, generator=generator, device=generator.device,
                                              dtype=torch.float32), device)
        return host_to_device(torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device,
                                                     dtype=torch.float32) for g in generators]), device)

    return draw
