"""THL's recurrence over one BPTT window: a plain forward loop, and one autograd node with a hand-written backward.

Why one node per window. Left to autograd, every token adds ~120 small nodes (query, read, three GRU tiers,
writer) whose backward runs one at a time, each with per-op overhead, and every weight gets a K=B outer product
per token. Here the forward loop runs outside autograd, keeping per token only the tensors the backward needs;
the backward walks the window in reverse with a few ops per token, and every weight gradient is one GEMM over the
whole window at the end (the per-token hidden states are all known by then). Terms that only need the forward's
records (the GRU gate coefficients of every tier update, from the gate pre-activations the forward kept, and the
writer's Jacobian pieces) are computed for the whole window at once before the reverse walk.

Gradients through the in-place bank. A read at step t sees rows that earlier steps of the window wrote. The
forward records, for every row a read or a write gathers, which step last wrote it (``src``, -1 for rows
already in the bank when the window started: constants under truncated BPTT). The reverse walk keeps a log of
gradients per writing step; a read adds its rows' gradients to the log entries of their writers, and when the
walk reaches a write, the log entry is that write's total downstream gradient (every reader came later).

The state entering the window is detached (``THLState.detach_`` at each window start), so the node returns no
gradient for it.

Two implementations of the per-token loops. ``recurrence.cpp`` runs the forward steps and the reverse walk in C++
(the matmuls through ATen, the small per-row work as plain loops; one thread, like the PyTorch loops), compiled
with torch's extension builder on first use. The PyTorch loops here (``_forward_steps``, ``_backward_steps``)
are the reference and the fallback: no compiler, CUDA, dtypes other than float32/float64, or
``MEMTRAIN_THL_RECURRENCE=python``. Everything batched over the window is shared by both.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
from torch import nn

from models.common.errors import ModelError
from models.common.torch_private import softmax_backward
from models.thl.memory import THLState

log = logging.getLogger(__name__)


def recurrent_parameters(core: nn.Module) -> list[nn.Parameter]:
    """The parameters the window node differentiates, in the order its backward returns their gradients."""
    params = [core.router.query_fast.weight, core.router.query_slow.weight, core.router.slot_kv.weight,
              core.writer.proj_fast.weight, core.writer.proj_slow.weight, core.writer.proj_slow.bias]
    if core.topdown is not None:
        params.append(core.topdown.weight)
    for k, cell in enumerate(core.tiers):
        params += [cell.inp.weight] + ([cell.inp.bias] if k else []) + [cell.hh.weight, cell.hh.bias]
    return params


def run_window(core: nn.Module, q_in_TBX: torch.Tensor, gates0_TBX: torch.Tensor, noise_TBHJ: torch.Tensor | None,
               state: THLState) -> dict:
    """Steps the recurrence over one window (updating ``state`` in place); differentiable when grad is enabled.

    ``q_in_TBX`` and ``gates0_TBX`` are the token-side parts of the router query and of tier 0's gates.
    Returns per-token tier features (T, B, sum(tier_dims)), read weights alpha (T, B, H, kappa) and the records.
    """
    params = recurrent_parameters(core) if torch.is_grad_enabled() else []
    # the recurrence runs in its parameters' dtype even under autocast: its hand-written backward (C++ and
    # PyTorch loops) has no bf16 variant, and its per-token ops are too small for bf16 matmuls to pay
    dtype = next(core.parameters()).dtype
    with torch.autocast(q_in_TBX.device.type, enabled=False):
        q_in_TBX, gates0_TBX = q_in_TBX.to(dtype), gates0_TBX.to(dtype)
        if q_in_TBX.requires_grad or any(p.requires_grad for p in params):
            outs = _WindowNode.apply(core, state, noise_TBHJ, q_in_TBX, gates0_TBX, *params)
        else:
            outs = _forward(core, q_in_TBX, gates0_TBX, noise_TBHJ, state, saved=None)
    return dict(zip(("feats_TBS", "alpha_TBHK", "idx_TBHK", "written_TB", "blended_TB", "gate_TB"), outs))


@contextmanager
def _one_thread():
    """For the PyTorch loops: the per-token ops are tiny (M = batch GEMMs, J-long vectors): OpenMP's fork/join per
    op costs more than it saves, and on a loaded machine a descheduled second thread stalls every op. The batched
    work around the loops (head, input projections, weight gradients) keeps all threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


RECURRENCE_ENV = "MEMTRAIN_THL_RECURRENCE"
"""auto (default): the C++ loops where they apply, else PyTorch; python: always PyTorch; cpp: fail if unavailable."""
_extension = None  # the compiled loops once built; False when the build failed
_logged: set[str] = set()


def _log_once(level: int, message: str, *args) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message, *args)


def _cpp_extension(required: bool):
    """The compiled loops of ``recurrence.cpp``, built on first use (torch caches the build); None if unavailable."""
    global _extension
    if _extension is None:
        from torch.utils.cpp_extension import load
        try:
            log.info("THL recurrence: loading the C++ loops (compiled on first use, about a minute; cached by torch)")
            source = os.path.join(os.path.dirname(__file__), "recurrence.cpp")
            _extension = load(name="thl_recurrence", sources=[source], extra_cflags=["-O3"])
        except Exception as error:  # no compiler, no ninja, a failed build: all mean "use the PyTorch loops"
            _extension = False
            if required:
                raise ModelError(f"{RECURRENCE_ENV}=cpp but the THL C++ loops could not be built: {error}") from error
            _log_once(logging.WARNING, "THL recurrence: could not build the C++ loops (%s); using the PyTorch loops",
                      error)
    if _extension is False and required:
        raise ModelError(f"{RECURRENCE_ENV}=cpp but the THL C++ loops could not be built (see the earlier warning)")
    return _extension or None


def use_cpp(x: torch.Tensor) -> bool:
    """Whether a window on tensors like ``x`` runs the C++ loops (CPU, float32/float64, not switched off)."""
    mode = os.environ.get(RECURRENCE_ENV, "auto")
    if mode not in ("auto", "cpp", "python"):
        raise ModelError(f"{RECURRENCE_ENV} must be auto, cpp or python, got {mode!r}")
    supported = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if mode == "cpp" and not supported:
        raise ModelError(f"{RECURRENCE_ENV}=cpp: the C++ loops take CPU float32/float64 tensors, got {x.dtype} on "
                         f"{x.device}")
    if mode != "python" and supported and _cpp_extension(required=mode == "cpp") is not None:
        _log_once(logging.INFO, "THL recurrence: C++ loops (models/thl/recurrence.cpp)")
        return True
    _log_once(logging.INFO, "THL recurrence: PyTorch loops (%s=%s, %s on %s)", RECURRENCE_ENV, mode, x.dtype,
              x.device.type)
    return False


def _cpp_config(core) -> dict[str, float]:
    cfg = core.cfg
    names = ("load_penalty", "router_temperature", "read_ema_decay", "write_clip", "novelty_theta", "novelty_beta",
             "blend_threshold", "write_rate", "stale_weight", "underuse_weight", "read_topk")
    return {**{name: float(getattr(cfg, name)) for name in names}, "score_scale": core.router.score_scale}


def _ticks(state: THLState, T: int, timescale: int) -> list[bool]:
    return [(state.pos + t) % timescale == 0 for t in range(T)]


def _stack(records: list[dict], key: str) -> torch.Tensor:
    """One per-step record field, stacked over the window (time first)."""
    return torch.stack([record[key] for record in records])


def _scales(scale: float, decay: float, T: int) -> tuple[list[float], list[float]]:
    """The bank's shared decay scale as each step reads it, and after that step's decay (when it writes)."""
    read, write = [], []
    for _ in range(T):
        read.append(scale)
        scale *= decay
        write.append(scale)
    return read, write


@torch.no_grad()
def _forward(core, q_in_TBX, gates0_TBX, noise_TBHJ, state: THLState, saved: dict | None) -> tuple:
    """The window's forward pass; with ``saved`` (a dict) it also keeps what ``_backward`` needs."""
    cfg = core.cfg
    T = q_in_TBX.size(0)
    K, top = len(cfg.tier_dims), len(cfg.tier_dims) - 1
    keep, keep_dense = saved is not None, saved is not None and cfg.straight_through
    ticks = [_ticks(state, T, tau) for tau in cfg.tier_timescales]
    scales = _scales(state.scale, cfg.memory_decay, T)
    s = state.tiers
    # slow-tier terms, added to the token-side terms for the span of steps that uses them: the query's slow part
    # (rebuilt when the slowest tier ticks) and tier 1's top-down input to tier 0's gates (when tier 1 ticks)
    q_base_TBX = q_in_TBX + core.router.query_slow(s[top])
    pre0_TBX = gates0_TBX + core.topdown(s[1]) if K > 1 else gates0_TBX
    w_slow_BM = core.writer.proj_slow(s[top])
    steps = _forward_steps_cpp if use_cpp(q_in_TBX) else _forward_steps
    hist_TBD, reads, writes, tiers = steps(core, q_in_TBX, gates0_TBX, q_base_TBX, pre0_TBX, w_slow_BM, noise_TBHJ,
                                           state, ticks, scales, keep, keep_dense)
    outs = (torch.cat(hist_TBD, dim=-1), reads["alpha"], reads["idx"], writes["written"], writes["blended"],
            writes["gate"])
    if keep:
        saved.update(ticks=ticks, tiers=tiers, scales=scales, hist=hist_TBD, reads=reads, writes=writes)
        if keep_dense:  # the bank at the window's end; the backward undoes the writes one by one
            saved["bank_end"] = (state.keys_BHDJ.clone(), state.values_BHJV.clone())
    return outs


def _forward_steps(core, q_in_TBX, gates0_TBX, q_base_TBX, pre0_TBX, w_slow_BM, noise_TBHJ, state, ticks, scales,
                   keep: bool, keep_dense: bool) -> tuple:
    """The per-token loop in PyTorch (the reference for ``recurrence.cpp``). Updates ``state``, ``q_base_TBX``
    and ``pre0_TBX`` in place; returns the tier states after every step (T, B, d_k) per tier, the read and write
    records stacked over time, and the tier records: per tier, the GRU gate pre-activations ``gi`` and ``gh`` of
    every update (tier 0: every step; tier k >= 1: every tick) and for k >= 1 the input ``x`` and previous state
    ``s`` of each tick."""
    cfg = core.cfg
    T, B, _ = q_in_TBX.shape
    dims, taus = cfg.tier_dims, cfg.tier_timescales
    K, top, H = len(dims), len(dims) - 1, cfg.read_heads
    router, writer, cells = core.router, core.writer, core.tiers
    s = list(state.tiers)
    cell0 = cells[0]
    src_BJ = torch.full((B, cfg.memory_slots), -1, dtype=torch.long, device=q_in_TBX.device) if keep else None
    hist = [[] for _ in range(K)]  # tier states after every step
    reads, writes = [], []
    tier_rec = {key: [[] for _ in range(K)] for key in ("gi", "gh", "x", "s")}
    with _one_thread():
        for t in range(T):
            q_BX = torch.addmm(q_base_TBX[t], s[0], router.query_fast.weight.t())
            r_BX, read = router.read(q_BX.view(B, H, -1), state, None if noise_TBHJ is None else noise_TBHJ[t],
                                     keep_dense)
            gi = torch.addmm(pre0_TBX[t], r_BX, cell0.inp.weight.t())
            gh = torch.addmm(cell0.hh.bias, s[0], cell0.hh.weight.t())
            new = [_gru_update(gi, gh, s[0])]
            if keep:
                tier_rec["gi"][0].append(gi)
                tier_rec["gh"][0].append(gh)
            for k in range(1, K):
                if not ticks[k][t]:
                    new.append(s[k])  # not this tier's tick: hold
                    continue
                x_BX = torch.cat([new[k - 1], r_BX, s[k + 1]] if k < top else [new[k - 1], r_BX], dim=-1)
                gi = torch.addmm(cells[k].inp.bias, x_BX, cells[k].inp.weight.t())
                gh = torch.addmm(cells[k].hh.bias, s[k], cells[k].hh.weight.t())
                new.append(_gru_update(gi, gh, s[k]))
                if keep:
                    for key, value in zip(("gi", "gh", "x", "s"), (gi, gh, x_BX, s[k])):
                        tier_rec[key][k].append(value)
                if k == 1:  # tier 0 sees the new top-down term from the next step on
                    end = min(t + 1 + taus[1], T)
                    torch.add(gates0_TBX[t + 1:end], core.topdown(new[1]), out=pre0_TBX[t + 1:end])
            if ticks[top][t]:  # the slowest tier ticked: its query part from the next step, its write part now
                end = min(t + 1 + taus[top], T)
                torch.add(q_in_TBX[t + 1:end], router.query_slow(new[top]), out=q_base_TBX[t + 1:end])
                w_slow_BM = writer.proj_slow(new[top])
            state.tiers = s = new
            state.scale *= cfg.memory_decay  # decay every slot: one float
            write = writer.write(new[0], w_slow_BM, state, router, keep, keep_old_kv=keep_dense)
            if keep:
                read.update(q=q_BX, r=r_BX, src=src_BJ.gather(1, read["idx"].view(B, -1)).view_as(read["idx"]))
                write.update(src_old=src_BJ.gather(1, write["slot"][:, None]).squeeze(1),
                             src_best=src_BJ.gather(1, write["best"][:, None]).squeeze(1))
                src_BJ.scatter_(1, write["slot"][:, None], t)
            state.pos += 1
            for k in range(K):
                hist[k].append(new[k])
            reads.append(read)
            writes.append(write)
    reads = {key: _stack(reads, key) for key in (reads[0] if keep else ("alpha", "idx"))}
    writes = {key: _stack(writes, key) for key in (writes[0] if keep else ("written", "blended", "gate"))}
    if keep:  # a tier that did not tick in this window (and tier 0's x and s) has (0, B, width) records
        widths = dict(gi=[3 * d for d in dims], gh=[3 * d for d in dims], x=[c.inp.in_features for c in cells], s=dims)
        tier_rec = {key: [torch.stack(rows) if rows else q_in_TBX.new_zeros(0, B, width)
                          for rows, width in zip(tier_rec[key], widths[key])] for key in tier_rec}
    return [torch.stack(h) for h in hist], reads, writes, tier_rec


def _forward_steps_cpp(core, q_in_TBX, gates0_TBX, q_base_TBX, pre0_TBX, w_slow_BM, noise_TBHJ, state, ticks,
                       scales, keep: bool, keep_dense: bool) -> tuple:
    """``_forward_steps`` in C++ (same arguments, same results)."""
    router, writer = core.router, core.writer
    tensors = dict(q_in=q_in_TBX, gates0=gates0_TBX, q_base=q_base_TBX, pre0=pre0_TBX, w_slow=w_slow_BM,
                   mem=state.mem_BMJ, keys=state.keys_BHDJ, values=state.values_BHJV, mem_norm=state.mem_norm_BJ,
                   load=state.load_BJ, last_write=state.last_write_BJ, w_qf=router.query_fast.weight,
                   w_qs=router.query_slow.weight, w_kv=router.slot_kv.weight, w_pf=writer.proj_fast.weight,
                   w_ps=writer.proj_slow.weight, b_ps=writer.proj_slow.bias)
    if noise_TBHJ is not None:
        tensors["noise"] = noise_TBHJ
    if core.topdown is not None:
        tensors["w_td"] = core.topdown.weight
    cells = [dict(w_ih=cell.inp.weight, w_hh=cell.hh.weight, b_hh=cell.hh.bias) for cell in core.tiers]
    for cell, weights in zip(core.tiers[1:], cells[1:]):  # tier 0's input bias is pre0
        weights["b_ih"] = cell.inp.bias
    with _one_thread():
        hist, reads, writes, tiers = _extension.forward(
            tensors, [s.contiguous() for s in state.tiers], cells, ticks, *scales, _cpp_config(core),
            list(core.cfg.tier_timescales), state.pos, keep, keep_dense)
    state.tiers = [h[-1].clone() for h in hist]
    state.pos += q_in_TBX.size(0)
    state.scale = scales[1][-1]
    return hist, reads, writes, tiers


class _WindowNode(torch.autograd.Function):
    """The window's recurrence as one autograd node: inputs are the token-side terms and the recurrent
    parameters; outputs are the tier features and the read weights (plus non-differentiable records)."""

    @staticmethod
    def forward(ctx, core, state, noise_TBHJ, q_in_TBX, gates0_TBX, *params):
        ctx.core, ctx.saved = core, {"init": [s.detach() for s in state.tiers]}
        outs = _forward(core, q_in_TBX, gates0_TBX, noise_TBHJ, state, ctx.saved)
        ctx.mark_non_differentiable(*outs[2:])
        return outs

    @staticmethod
    def backward(ctx, dfeats_TBS, dalpha_TBHK, *_):
        grads = _backward(ctx.core, ctx.saved, dfeats_TBS, dalpha_TBHK)
        return (None, None, None, *grads)


def _gru_update(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """torch.gru_cell from its gate pre-activations gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh (blocks r, z, n):
    h' = (1 - z) n + z h, n = tanh(gi_n + r gh_n), [r, z] = sigmoid(gi_rz + gh_rz)."""
    d = h.size(-1)
    r, z = torch.sigmoid(gi[:, :2 * d] + gh[:, :2 * d]).chunk(2, dim=1)
    n = torch.tanh(torch.addcmul(gi[:, 2 * d:], r, gh[:, 2 * d:]))
    return torch.addcmul(n, h - n, z)


def _gru_coefficients(gi, gh, h_prev):
    """For the GRU update of ``_gru_update``: returns A and Ah (..., 3, d) and z with d gi = dh' * A,
    d gh = dh' * Ah and dh = dh' z + d gh @ W_hh."""
    d = h_prev.size(-1)
    rz = torch.sigmoid(gi[..., :2 * d] + gh[..., :2 * d])
    r, z = rz[..., :d], rz[..., d:]
    gh_n = gh[..., 2 * d:]
    n = torch.tanh(gi[..., 2 * d:] + r * gh_n)
    d_n = (1 - z) * (1 - n * n)
    d_r = d_n * gh_n * r * (1 - r)
    d_z = (h_prev - n) * z * (1 - z)
    return torch.stack([d_r, d_z, d_n], dim=-2), torch.stack([d_r, d_z, d_n * r], dim=-2), z


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.size(-1))


@torch.no_grad()
def _backward(core, sv: dict, dfeats_TBS: torch.Tensor, dalpha_TBHK: torch.Tensor) -> list[torch.Tensor]:
    cfg = core.cfg
    dims = cfg.tier_dims
    K, top, H = len(dims), len(dims) - 1, cfg.read_heads
    rd, wr, hist, init, ticks = sv["reads"], sv["writes"], sv["hist"], sv["init"], sv["ticks"]
    T, B = rd["q"].shape[:2]
    w_kv = core.router.slot_kv.weight
    dtype, device, tiny = dfeats_TBS.dtype, dfeats_TBS.device, torch.finfo(dfeats_TBS.dtype).tiny
    scale_read, scale_write = sv["scales"]
    dS = [x.contiguous() for x in dfeats_TBS.split(list(dims), dim=-1)]
    # a held slow-tier state gets the feature gradient of its whole span: suffix sums make that one subtraction
    suffix = [None] + [torch.cat([dS[k].flip(0).cumsum(0).flip(0), dS[k].new_zeros(1, B, dims[k])])
                       for k in range(1, K)]

    # GRU gate coefficients of every step of tier 0 and every tick of the slower tiers (inputs all known now)
    s0_prev_TBD = torch.cat([init[0][None], hist[0][:-1]])
    tr = sv["tiers"]
    gru = [_gru_coefficients(gi, gh, s_prev) for gi, gh, s_prev in zip(tr["gi"], tr["gh"], [s0_prev_TBD, *tr["s"][1:]])]

    # the writer, new = lerp(old, target, coef), is linear in d new given these per-step coefficients:
    #   d gate = d new . P;  d w = d new * Rw + d gate * Qw;  d best = d gate * Qb;  d old = d new * (1 - coef)
    scale_write_T11 = torch.tensor(scale_write, dtype=dtype, device=device).view(T, 1, 1)
    w, u, best, old = wr["w"], wr["u"], wr["best_row"], wr["old"]
    coef, gate = wr["coef"][..., None], wr["gate"][..., None]
    written, blended = wr["written"][..., None], wr["blended"][..., None]
    P = ((written & blended) * cfg.write_rate) * (wr["target"] - old) + (coef * ~blended / scale_write_T11) * w
    dgate_dcos = -cfg.novelty_beta * gate * (1 - gate)  # gate = sigmoid(beta (1 - theta - cos))
    w_n, b_n = w.norm(dim=-1, keepdim=True), best.norm(dim=-1, keepdim=True)
    wb, den = (w * best).sum(-1, keepdim=True), w_n * b_n + 1e-8  # cos = w.b / den
    Qw = dgate_dcos * (best / den - w * (wb * b_n / (w_n.clamp_min(tiny) * den * den)))
    Qb = dgate_dcos * (w / den - best * (wb * w_n / (b_n.clamp_min(tiny) * den * den)))
    # the clip w = u c, c = min(1, clip / (|u| + 1e-6)): where it is active, d u = c d w - slope (d w . u) u
    u_n = wr["u_norm"]
    clip_slope = ((cfg.write_clip / (u_n + 1e-6) <= 1) * cfg.write_clip) / (u_n.clamp_min(tiny) * (u_n + 1e-6) ** 2)
    src_read, src_old, src_best = (torch.where(src < 0, T, src) for src in (rd["src"], wr["src_old"], wr["src_best"]))
    a = dict(dS0=dS[0], suffix=suffix, A=[c[0] for c in gru], Ah=[c[1] for c in gru], Z=[c[2] for c in gru],
             P=P, Qw=Qw, Qb=Qb, Rw=coef * wr["target_scale"][..., None], keep_old=1 - coef, clip=wr["clip"],
             clip_slope=clip_slope, u=u, src_read=src_read, src_old=src_old, src_best=src_best,
             alpha=rd["alpha"], dalpha=dalpha_TBHK.contiguous(), keys=rd["keys"], values=rd["values"], q=rd["q"],
             alpha_scaled=rd["alpha"] * torch.tensor(scale_read, dtype=dtype, device=device).view(T, 1, 1, 1))
    if "dense" in rd:  # straight-through: the dense softmax over the bank at every step
        a.update(dense=rd["dense"], slot=wr["slot"], old_keys=wr["old_keys"], old_values=wr["old_values"],
                 keys_end=sv["bank_end"][0].clone(), values_end=sv["bank_end"][1].clone())

    # gradients out of the loop; the logs hold the gradients per writing step (row T: rows that predate the
    # window, constants under truncated BPTT)
    n_ticks = [sum(tick) for tick in ticks]
    g = dict(DQ=torch.zeros_like(rd["q"]), DU=torch.zeros_like(u), DGI0=torch.zeros_like(tr["gi"][0]),
             DGH0=torch.zeros_like(tr["gi"][0]), log_mem=w.new_zeros(T + 1, B, cfg.memory_dim),
             log_kv=w.new_zeros(T + 1, B, H, w_kv.size(0) // H),
             DGI=[None] + [w.new_zeros(n_ticks[k], B, 3 * dims[k]) for k in range(1, K)],
             DGH=[None] + [w.new_zeros(n_ticks[k], B, 3 * dims[k]) for k in range(1, K)],
             # per tick of the slowest tier: the query's and the write's gradient over the span it fed;
             # per tick of tier 1: the gradient of tier 0's gates over the span its top-down term fed
             span_q=w.new_zeros(n_ticks[top], B, rd["q"].size(-1)), span_w=w.new_zeros(n_ticks[top], B, u.size(-1)),
             span_td=w.new_zeros(n_ticks[1] if K > 1 else 0, B, 3 * dims[0]))
    score_factor = [s * core.router.score_scale / cfg.router_temperature for s in scale_read]  # d score -> d logit
    steps = _backward_steps_cpp if use_cpp(dfeats_TBS) else _backward_steps
    steps(core, a, g, ticks, scale_read, score_factor)
    return _weight_gradients(core, sv, g, s0_prev_TBD, ticks)


def _backward_steps(core, a: dict, g: dict, ticks: list[list[bool]], scale_read: list[float],
                    score_factor: list[float]) -> None:
    """The reverse walk over the window in PyTorch (the reference for ``recurrence.cpp``): fills the buffers of
    ``g`` from the per-step coefficients in ``a`` (built by ``_backward``)."""
    cfg = core.cfg
    dims, taus = cfg.tier_dims, cfg.tier_timescales
    K, top, H, D = len(dims), len(dims) - 1, cfg.read_heads, cfg.head_dim
    router, writer, cells = core.router, core.writer, core.tiers
    w_qf, w_qs, w_kv = router.query_fast.weight, router.query_slow.weight, router.slot_kv.weight
    w_pf, w_ps = writer.proj_fast.weight, writer.proj_slow.weight
    w_ih0, w_hh0 = cells[0].inp.weight, cells[0].hh.weight
    T, B = a["q"].shape[:2]
    dtype, device = a["q"].dtype, a["q"].device
    DQ, DU, DGI0, DGH0, log_mem, log_kv = (g[key] for key in ("DQ", "DU", "DGI0", "DGH0", "log_mem", "log_kv"))
    log_keys, log_values = log_kv[..., :D], log_kv[..., D:]
    A, Ah, Z, suffix = a["A"], a["Ah"], a["Z"], a["suffix"]
    b_B, h_H = torch.arange(B, device=device), torch.arange(H, device=device)
    b_B11, h_1H1 = b_B.view(B, 1, 1), h_H.view(1, H, 1)
    q_BH1D = a["q"].view(T, B, H, 1, D)
    straight_through = "dense" in a
    if straight_through:
        keys_BHDJ, values_BHJV = a["keys_end"], a["values_end"]
        slot_BHD1 = a["slot"].view(T, B, 1, 1, 1).expand(T, B, H, D, 1)
        slot_BH1V = a["slot"].view(T, B, 1, 1, 1).expand(T, B, H, 1, values_BHJV.size(-1))
    grad = [torch.zeros(B, d, dtype=dtype, device=device) for d in dims]  # d loss / d tier state after step t
    tick = [sum(t) for t in ticks]  # per tier, the index of step t's tick (counting down)
    with _one_thread():
        for t in reversed(range(T)):
            for k in range(K):
                tick[k] -= ticks[k][t]
            # the write: its log entry holds every later reader's gradient of the row and of its key/value
            dnew = torch.addmm(log_mem[t], log_kv[t].view(B, -1), w_kv)
            dgate = (dnew * a["P"][t]).sum(-1, keepdim=True)
            dw = torch.addcmul(dnew * a["Rw"][t], dgate, a["Qw"][t])
            log_mem.index_put_((a["src_old"][t], b_B), dnew * a["keep_old"][t], accumulate=True)
            log_mem.index_put_((a["src_best"][t], b_B), dgate * a["Qb"][t], accumulate=True)
            u = a["u"][t]
            torch.addcmul(dw * a["clip"][t], (dw * u).sum(-1, keepdim=True) * a["clip_slope"][t], u, value=-1,
                          out=DU[t])
            grad[0] = torch.addmm(grad[0], DU[t], w_pf)
            dr = None
            if ticks[top][t]:  # the new slowest state made the query's slow part (steps t+1..) and the write's (t..)
                end = min(t + taus[top], T)
                dq_slow, dw_slow = g["span_q"][tick[top]], g["span_w"][tick[top]]
                torch.sum(DQ[t + 1:end + 1], 0, out=dq_slow)
                torch.sum(DU[t:end], 0, out=dw_slow)
                grad[top] = torch.addmm(torch.addmm(grad[top], dq_slow, w_qs), dw_slow, w_ps)
            for k in range(top, 0, -1):
                if not ticks[k][t]:
                    continue
                j = tick[k]
                dh = grad[k] + (suffix[k][t] - suffix[k][min(t + taus[k], T)])
                if k == 1:  # the new tier-1 state made tier 0's top-down term (steps t+1..)
                    dtd = torch.sum(DGI0[t + 1:min(t + 1 + taus[1], T)], 0, out=g["span_td"][j])
                    dh = torch.addmm(dh, dtd, core.topdown.weight)
                dgi, dgh = g["DGI"][k][j], g["DGH"][k][j]
                torch.mul(dh.unsqueeze(1), A[k][j], out=dgi.view(B, 3, -1))
                torch.mul(dh.unsqueeze(1), Ah[k][j], out=dgh.view(B, 3, -1))
                grad[k] = torch.addmm(dh * Z[k][j], dgh, cells[k].hh.weight)
                dx = dgi @ cells[k].inp.weight  # x = [lower tier's new state; r; upper tier's previous state]
                lower, d_r, upper = dx.split([dims[k - 1], cfg.value_dim, dx.size(1) - dims[k - 1] - cfg.value_dim], 1)
                grad[k - 1] = grad[k - 1] + lower
                dr = d_r if dr is None else dr + d_r
                if k < top:
                    grad[k + 1] = grad[k + 1] + upper
            # tier 0
            dh = grad[0] + a["dS0"][t]
            torch.mul(dh.unsqueeze(1), A[0][t], out=DGI0[t].view(B, 3, -1))
            torch.mul(dh.unsqueeze(1), Ah[0][t], out=DGH0[t].view(B, 3, -1))
            grad[0] = torch.addmm(dh * Z[0][t], DGH0[t], w_hh0)
            dr = torch.mm(DGI0[t], w_ih0) if dr is None else torch.addmm(dr, DGI0[t], w_ih0)
            # the read: r = scale sum_k alpha_k v_k; alpha = softmax(score / temperature)
            dr_BHV1 = dr.view(B, H, -1, 1)
            src = a["src_read"][t]
            log_values.index_put_((src, b_B11, h_1H1), a["alpha_scaled"][t].unsqueeze(3) * dr_BHV1.transpose(2, 3),
                                  accumulate=True)
            dalpha = torch.add(a["dalpha"][t], torch.matmul(a["values"][t], dr_BHV1).squeeze(3), alpha=scale_read[t])
            dlogit = softmax_backward(dalpha, a["alpha"][t], -1, dtype).mul_(score_factor[t])
            dq_BHD1 = torch.matmul(a["keys"][t], dlogit.unsqueeze(3))
            log_keys.index_put_((src, b_B11, h_1H1), dlogit.unsqueeze(3) * q_BH1D[t], accumulate=True)
            if straight_through:  # the dense softmax over the bank as this step read it: undo this step's write first
                keys_BHDJ.scatter_(3, slot_BHD1[t], a["old_keys"][t])
                values_BHJV.scatter_(2, slot_BH1V[t], a["old_values"][t])
                dsoft = torch.matmul(values_BHJV, dr_BHV1).squeeze(3).mul_(scale_read[t])
                ddense = softmax_backward(dsoft, a["dense"][t], -1, dtype).mul_(score_factor[t])
                dq_BHD1 = dq_BHD1 + torch.matmul(keys_BHDJ, ddense.unsqueeze(3))
            DQ[t] = dq_BHD1.view(B, -1)
            grad[0] = torch.addmm(grad[0], DQ[t], w_qf)


def _backward_steps_cpp(core, a: dict, g: dict, ticks: list[list[bool]], scale_read: list[float],
                        score_factor: list[float]) -> None:
    """``_backward_steps`` in C++ (same arguments, same results)."""
    router, writer, cells = core.router, core.writer, core.tiers
    empty = a["q"].new_empty(0)
    weights = dict(w_kv=router.slot_kv.weight, w_pf=writer.proj_fast.weight, w_qf=router.query_fast.weight,
                   w_qs=router.query_slow.weight, w_ps=writer.proj_slow.weight)
    if core.topdown is not None:
        weights["w_td"] = core.topdown.weight
    with _one_thread():
        _extension.backward({key: x.contiguous() for key, x in a.items() if torch.is_tensor(x)},
                            [empty if x is None else x for x in a["suffix"]], a["A"], a["Ah"],
                            [z.contiguous() for z in a["Z"]], {key: x for key, x in g.items() if torch.is_tensor(x)},
                            [empty if x is None else x for x in g["DGI"]],
                            [empty if x is None else x for x in g["DGH"]], weights,
                            [cell.inp.weight for cell in cells], [cell.hh.weight for cell in cells], ticks,
                            scale_read, score_factor, list(core.cfg.tier_timescales))


def _weight_gradients(core, sv: dict, g: dict, s0_prev_TBD: torch.Tensor, ticks: list[list[bool]]) -> list:
    """Every recurrent weight's gradient as one GEMM over the window, in ``recurrent_parameters`` order."""
    K, top = len(core.tiers), len(core.tiers) - 1
    hist, init, rd, wr = sv["hist"], sv["init"], sv["reads"], sv["writes"]
    T = s0_prev_TBD.size(0)
    DQ, DU, DGI0, DGH0 = g["DQ"], g["DU"], g["DGI0"], g["DGH0"]
    times = [torch.tensor([t for t in range(T) if tick[t]], dtype=torch.long, device=DQ.device) for tick in ticks]
    first = [next((t for t in range(T) if ticks[k][t]), T) for k in range(K)]
    # spans that used the window's initial (detached) states still give their weights a gradient
    top_states = torch.cat([hist[top][times[top]], init[top][None]])
    span_q = torch.cat([g["span_q"], DQ[:first[top] + 1].sum(0)[None]])
    span_w = torch.cat([g["span_w"], DU[:first[top]].sum(0)[None]])
    grads = [DQ, DGI0, _flat(DQ).t() @ _flat(s0_prev_TBD), _flat(span_q).t() @ _flat(top_states),
             g["log_kv"][:T].reshape(T * DQ.size(1), -1).t() @ _flat(wr["new"]), _flat(DU).t() @ _flat(hist[0]),
             _flat(span_w).t() @ _flat(top_states), span_w.sum((0, 1))]
    if K > 1:
        span_td = torch.cat([g["span_td"], DGI0[:first[1] + 1].sum(0)[None]])
        grads.append(_flat(span_td).t() @ _flat(torch.cat([hist[1][times[1]], init[1][None]])))
    grads += [_flat(DGI0).t() @ _flat(rd["r"]), _flat(DGH0).t() @ _flat(s0_prev_TBD), _flat(DGH0).sum(0)]
    for k in range(1, K):  # a tier that never ticked in this window has empty records: zero gradients
        dgi, dgh = _flat(g["DGI"][k]), _flat(g["DGH"][k])
        x, s_prev = _flat(sv["tiers"]["x"][k]), _flat(sv["tiers"]["s"][k])
        grads += [dgi.t() @ x, dgi.sum(0), dgh.t() @ s_prev, dgh.sum(0)]
    return grads
