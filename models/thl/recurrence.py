"""THL's recurrence over one BPTT window: a plain forward loop, and one autograd node with a hand-written backward.

Why one node per window. Left to autograd, every token adds ~120 small nodes (query, read, three GRU tiers,
writer) whose backward runs one at a time, each with per-op overhead, and every weight gets a K=B outer product
per token. Here the forward loop runs outside autograd, keeping per token only the tensors the backward needs;
the backward walks the window in reverse with a few ops per token, and every weight gradient is one GEMM over the
whole window at the end (the per-token hidden states are all known by then). Input-side terms that do not
depend on the recurrence (GRU gate coefficients of tier 0, the writer's Jacobian pieces) are also computed for
the whole window at once before the reverse walk.

Gradients through the in-place bank. A read at step t sees rows that earlier steps of the window wrote. The
forward records, for every row a read or a write gathers, which step last wrote it (``src``, -1 for rows
already in the bank when the window started: constants under truncated BPTT). The reverse walk keeps a log of
gradients per writing step; a read adds its rows' gradients to the log entries of their writers, and when the
walk reaches a write, the log entry is that write's total downstream gradient (every reader came later).

The state entering the window is detached (``THLState.detach_`` at each window start), so the node returns no
gradient for it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from models.thl.memory import THLState


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
    if q_in_TBX.requires_grad or any(p.requires_grad for p in params):
        outs = _WindowNode.apply(core, state, noise_TBHJ, q_in_TBX, gates0_TBX, *params)
    else:
        outs = _forward(core, q_in_TBX, gates0_TBX, noise_TBHJ, state, saved=None)
    return dict(zip(("feats_TBS", "alpha_TBHK", "idx_TBHK", "written_TB", "blended_TB", "gate_TB"), outs))


@contextmanager
def _one_thread():
    """The per-token ops are tiny (M = batch GEMMs, J-long vectors): OpenMP's fork/join per op costs more than
    it saves, and on a loaded machine a descheduled second thread stalls every op. The batched work around the
    loops (head, input projections, weight gradients) keeps all threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ticks(state: THLState, T: int, timescale: int) -> list[bool]:
    return [(state.pos + t) % timescale == 0 for t in range(T)]


def _stack(records: list[dict], key: str) -> torch.Tensor:
    """One per-step record field, stacked over the window (time first)."""
    return torch.stack([record[key] for record in records])


@torch.no_grad()
def _forward(core, q_in_TBX, gates0_TBX, noise_TBHJ, state: THLState, saved: dict | None) -> tuple:
    """The window's forward pass; with ``saved`` (a dict) it also keeps what ``_backward`` needs."""
    cfg = core.cfg
    T, B, _ = q_in_TBX.shape
    dims, taus = cfg.tier_dims, cfg.tier_timescales
    K, top, H = len(dims), len(dims) - 1, cfg.read_heads
    router, writer, cells = core.router, core.writer, core.tiers
    keep, keep_dense = saved is not None, saved is not None and cfg.straight_through
    ticks = [_ticks(state, T, tau) for tau in taus]
    s = list(state.tiers)
    # slow-tier terms, added to the token-side terms for the span of steps that uses them: the query's slow part
    # (rebuilt when the slowest tier ticks) and tier 1's top-down input to tier 0's gates (when tier 1 ticks)
    q_base_TBX = q_in_TBX + router.query_slow(s[top])
    w_slow_BM = writer.proj_slow(s[top])
    pre0_TBX = gates0_TBX + core.topdown(s[1]) if K > 1 else gates0_TBX
    cell0 = cells[0]
    src_BJ = torch.full((B, cfg.memory_slots), -1, dtype=torch.long, device=q_in_TBX.device) if keep else None
    hist = [[] for _ in range(K)]  # tier states after every step
    reads, writes, tick_inputs = [], [], [[] for _ in range(K)]
    scales = []  # (read scale, write scale) per step
    with _one_thread():
        for t in range(T):
            scale_read = state.scale
            q_BX = torch.addmm(q_base_TBX[t], s[0], router.query_fast.weight.t())
            r_BX, read = router.read(q_BX.view(B, H, -1), state, None if noise_TBHJ is None else noise_TBHJ[t],
                                     keep_dense)
            new = [torch.gru_cell(r_BX, s[0], cell0.inp.weight, cell0.hh.weight, pre0_TBX[t], cell0.hh.bias)]
            for k in range(1, K):
                if not ticks[k][t]:
                    new.append(s[k])  # not this tier's tick: hold
                    continue
                x_BX = torch.cat([new[k - 1], r_BX, s[k + 1]] if k < top else [new[k - 1], r_BX], dim=-1)
                new.append(torch.gru_cell(x_BX, s[k], cells[k].inp.weight, cells[k].hh.weight, cells[k].inp.bias,
                                          cells[k].hh.bias))
                if keep:
                    tick_inputs[k].append((t, x_BX, s[k]))
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
                scales.append((scale_read, state.scale))
            state.pos += 1
            for k in range(K):
                hist[k].append(new[k])
            reads.append(read)
            writes.append(write)
    hist_TBD = [torch.stack(h) for h in hist]
    outs = (torch.cat(hist_TBD, dim=-1), _stack(reads, "alpha"), _stack(reads, "idx"), _stack(writes, "written"),
            _stack(writes, "blended"), _stack(writes, "gate"))
    if keep:
        saved.update(ticks=ticks, tick_inputs=tick_inputs, scales=scales, pre0_TBX=pre0_TBX, hist=hist_TBD,
                     reads={key: _stack(reads, key) for key in reads[0]},
                     writes={key: _stack(writes, key) for key in writes[0]})
        if keep_dense:  # the bank at the window's end; the backward undoes the writes one by one
            saved["bank_end"] = (state.keys_BHDJ.clone(), state.values_BHJV.clone())
    return outs


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


def _gru_coefficients(gi, gh, h_prev):
    """For h' = (1 - z) n + z h, n = tanh(gi_n + r gh_n), [r, z] = sigmoid(gi_rz + gh_rz) (torch.gru_cell):
    returns A and Ah (..., 3, d) and z with d gi = dh' * A, d gh = dh' * Ah and dh = dh' z + d gh @ W_hh."""
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


def _outer_sum(pairs) -> torch.Tensor:
    """sum_i dy_i^T x_i over (dy (B, out), x (B, in)) pairs, as one GEMM."""
    return _flat(torch.stack([dy for dy, _ in pairs])).t() @ _flat(torch.stack([x for _, x in pairs]))


@torch.no_grad()
def _backward(core, sv: dict, dfeats_TBS: torch.Tensor, dalpha_TBHK: torch.Tensor) -> list[torch.Tensor]:
    cfg = core.cfg
    dims, taus = cfg.tier_dims, cfg.tier_timescales
    K, top, H, D = len(dims), len(dims) - 1, cfg.read_heads, cfg.head_dim
    rd, wr, hist, init, ticks = sv["reads"], sv["writes"], sv["hist"], sv["init"], sv["ticks"]
    T, B = rd["q"].shape[:2]
    router, writer, cells = core.router, core.writer, core.tiers
    w_qf, w_qs, w_kv = router.query_fast.weight, router.query_slow.weight, router.slot_kv.weight
    w_pf, w_ps = writer.proj_fast.weight, writer.proj_slow.weight
    w_ih0, w_hh0 = cells[0].inp.weight, cells[0].hh.weight
    dtype, device, tiny = dfeats_TBS.dtype, dfeats_TBS.device, torch.finfo(dfeats_TBS.dtype).tiny
    scale_read = [r for r, _ in sv["scales"]]
    scale_write_T11 = torch.tensor([w for _, w in sv["scales"]], dtype=dtype, device=device).view(T, 1, 1)
    score_factor = [s * router.score_scale / cfg.router_temperature for s in scale_read]  # d score -> d logit
    dS = dfeats_TBS.split(list(dims), dim=-1)
    # a held slow-tier state gets the feature gradient of its whole span: suffix sums make that one subtraction
    suffix = [None] + [torch.cat([dS[k].flip(0).cumsum(0).flip(0), dS[k].new_zeros(1, B, dims[k])])
                       for k in range(1, K)]

    # tier 0's gate coefficients for the whole window (its inputs and previous states are all known now)
    s0_prev_TBD = torch.cat([init[0][None], hist[0][:-1]])
    gi0_TBX = torch.matmul(rd["r"], w_ih0.t()).add_(sv["pre0_TBX"])
    A0, Ah0, Z0 = _gru_coefficients(gi0_TBX, F.linear(s0_prev_TBD, w_hh0, cells[0].hh.bias), s0_prev_TBD)

    # the writer, new = lerp(old, target, coef), is linear in d new given these per-step coefficients:
    #   d gate = d new . P;  d w = d new * Rw + d gate * Qw;  d best = d gate * Qb;  d old = d new * (1 - coef)
    w, u, best, old = wr["w"], wr["u"], wr["best_row"], wr["old"]
    coef, gate = wr["coef"][..., None], wr["gate"][..., None]
    written, blended = wr["written"][..., None], wr["blended"][..., None]
    P = ((written & blended) * cfg.write_rate) * (wr["target"] - old) + (coef * ~blended / scale_write_T11) * w
    dgate_dcos = -cfg.novelty_beta * gate * (1 - gate)  # gate = sigmoid(beta (1 - theta - cos))
    w_n, b_n = w.norm(dim=-1, keepdim=True), best.norm(dim=-1, keepdim=True)
    wb, den = (w * best).sum(-1, keepdim=True), w_n * b_n + 1e-8  # cos = w.b / den
    Qw = dgate_dcos * (best / den - w * (wb * b_n / (w_n.clamp_min(tiny) * den * den)))
    Qb = dgate_dcos * (w / den - best * (wb * w_n / (b_n.clamp_min(tiny) * den * den)))
    Rw, keep_old = coef * wr["target_scale"][..., None], 1 - coef
    # the clip w = u c, c = min(1, clip / (|u| + 1e-6)): where it is active, d u = c d w - slope (d w . u) u
    u_n = wr["u_norm"]
    clip_slope = ((cfg.write_clip / (u_n + 1e-6) <= 1) * cfg.write_clip) / (u_n.clamp_min(tiny) * (u_n + 1e-6) ** 2)

    # gradients per writing step; row T collects the rows that predate the window (constants: dropped)
    log_mem = w.new_zeros(T + 1, B, cfg.memory_dim)
    log_kv = w.new_zeros(T + 1, B, H, w_kv.size(0) // H)
    log_keys, log_values = log_kv[..., :D], log_kv[..., D:]
    src_read, src_old, src_best = (torch.where(src < 0, T, src) for src in (rd["src"], wr["src_old"], wr["src_best"]))
    b_B, h_H = torch.arange(B, device=device), torch.arange(H, device=device)
    b_B11, h_1H1 = b_B.view(B, 1, 1), h_H.view(1, H, 1)
    alpha = rd["alpha"]
    alpha_scaled = alpha * torch.tensor(scale_read, dtype=dtype, device=device).view(T, 1, 1, 1)
    q_BH1D = rd["q"].view(T, B, H, 1, D)
    straight_through = "dense" in rd
    if straight_through:
        keys_BHDJ, values_BHJV = (x.clone() for x in sv["bank_end"])
        slot_BHD1 = wr["slot"].view(T, B, 1, 1, 1).expand(T, B, H, D, 1)
        slot_BH1V = wr["slot"].view(T, B, 1, 1, 1).expand(T, B, H, 1, values_BHJV.size(-1))

    DQ, DU = torch.zeros_like(rd["q"]), torch.zeros_like(u)
    DGI0, DGH0 = torch.zeros_like(gi0_TBX), torch.zeros_like(gi0_TBX)
    g = [x.new_zeros(B, d) for d, x in zip(dims, init)]  # d loss / d tier state after the step being undone
    spans = {"q": [], "w": [], "td": []}  # (summed gradient, the slow state it came from)
    tick_inputs = [{t: (x, s) for t, x, s in sv["tick_inputs"][k]} for k in range(K)]
    tick_grads = [[] for _ in range(K)]
    with _one_thread():
        for t in reversed(range(T)):
            # the write: its log entry holds every later reader's gradient of the row and of its key/value
            dnew = torch.addmm(log_mem[t], log_kv[t].view(B, -1), w_kv)
            dgate = (dnew * P[t]).sum(-1, keepdim=True)
            dw = torch.addcmul(dnew * Rw[t], dgate, Qw[t])
            log_mem.index_put_((src_old[t], b_B), dnew * keep_old[t], accumulate=True)
            log_mem.index_put_((src_best[t], b_B), dgate * Qb[t], accumulate=True)
            du = torch.addcmul(dw * wr["clip"][t], (dw * u[t]).sum(-1, keepdim=True) * clip_slope[t], u[t], value=-1,
                               out=DU[t])
            g[0] = torch.addmm(g[0], du, w_pf)
            dr = None
            if ticks[top][t]:  # the new slowest state made the query's slow part (steps t+1..) and the write's (t..)
                end = min(t + taus[top], T)
                dq_slow, dw_slow = DQ[t + 1:end + 1].sum(0), DU[t:end].sum(0)
                g[top] = torch.addmm(torch.addmm(g[top], dq_slow, w_qs), dw_slow, w_ps)
                spans["q"].append((dq_slow, hist[top][t]))
                spans["w"].append((dw_slow, hist[top][t]))
            for k in range(top, 0, -1):
                if not ticks[k][t]:
                    continue
                dh = g[k] + (suffix[k][t] - suffix[k][min(t + taus[k], T)])
                if k == 1:  # the new tier-1 state made tier 0's top-down term (steps t+1..)
                    dtd = DGI0[t + 1:min(t + 1 + taus[1], T)].sum(0)
                    dh = torch.addmm(dh, dtd, core.topdown.weight)
                    spans["td"].append((dtd, hist[1][t]))
                x, s_prev = tick_inputs[k][t]
                cell = cells[k]
                A, Ah, z = _gru_coefficients(cell.inp(x), cell.hh(s_prev), s_prev)
                dgi, dgh = (dh.unsqueeze(1) * A).view(B, -1), (dh.unsqueeze(1) * Ah).view(B, -1)
                g[k] = torch.addmm(dh * z, dgh, cell.hh.weight)
                dx = dgi @ cell.inp.weight  # x = [lower tier's new state; r; upper tier's previous state]
                lower, d_r, upper = dx.split([dims[k - 1], cfg.value_dim, dx.size(1) - dims[k - 1] - cfg.value_dim], 1)
                g[k - 1] = g[k - 1] + lower
                dr = d_r if dr is None else dr + d_r
                if k < top:
                    g[k + 1] = g[k + 1] + upper
                tick_grads[k].append((dgi, dgh, x, s_prev))
            # tier 0
            dh = g[0] + dS[0][t]
            torch.mul(dh.unsqueeze(1), A0[t], out=DGI0[t].view(B, 3, -1))
            torch.mul(dh.unsqueeze(1), Ah0[t], out=DGH0[t].view(B, 3, -1))
            g[0] = torch.addmm(dh * Z0[t], DGH0[t], w_hh0)
            dr = torch.mm(DGI0[t], w_ih0) if dr is None else torch.addmm(dr, DGI0[t], w_ih0)
            # the read: r = scale sum_k alpha_k v_k; alpha = softmax(score / temperature)
            dr_BHV1 = dr.view(B, H, -1, 1)
            log_values.index_put_((src_read[t], b_B11, h_1H1), alpha_scaled[t].unsqueeze(3) * dr_BHV1.transpose(2, 3),
                                  accumulate=True)
            dalpha = torch.add(dalpha_TBHK[t], torch.matmul(rd["values"][t], dr_BHV1).squeeze(3), alpha=scale_read[t])
            dlogit = torch._softmax_backward_data(dalpha, alpha[t], -1, dtype).mul_(score_factor[t])
            dq_BHD1 = torch.matmul(rd["keys"][t], dlogit.unsqueeze(3))
            log_keys.index_put_((src_read[t], b_B11, h_1H1), dlogit.unsqueeze(3) * q_BH1D[t], accumulate=True)
            if straight_through:  # the dense softmax over the bank as this step read it: undo this step's write first
                keys_BHDJ.scatter_(3, slot_BHD1[t], wr["old_keys"][t])
                values_BHJV.scatter_(2, slot_BH1V[t], wr["old_values"][t])
                dsoft = torch.matmul(values_BHJV, dr_BHV1).squeeze(3).mul_(scale_read[t])
                ddense = torch._softmax_backward_data(dsoft, rd["dense"][t], -1, dtype).mul_(score_factor[t])
                dq_BHD1 = dq_BHD1 + torch.matmul(keys_BHDJ, ddense.unsqueeze(3))
            DQ[t] = dq_BHD1.view(B, -1)
            g[0] = torch.addmm(g[0], DQ[t], w_qf)

    # spans that used the window's initial (detached) states still give their weights a gradient
    first = [next((t for t in range(T) if ticks[k][t]), T) for k in range(K)]
    spans["q"].append((DQ[:first[top] + 1].sum(0), init[top]))
    spans["w"].append((DU[:first[top]].sum(0), init[top]))
    grads = [DQ, DGI0, _flat(DQ).t() @ _flat(s0_prev_TBD), _outer_sum(spans["q"]),
             log_kv[:T].reshape(T * B, -1).t() @ _flat(wr["new"]), _flat(DU).t() @ _flat(hist[0]),
             _outer_sum(spans["w"]), torch.stack([d for d, _ in spans["w"]]).sum((0, 1))]
    if K > 1:
        spans["td"].append((DGI0[:first[1] + 1].sum(0), init[1]))
        grads.append(_outer_sum(spans["td"]))
    grads += [_flat(DGI0).t() @ _flat(rd["r"]), _flat(DGH0).t() @ _flat(s0_prev_TBD), _flat(DGH0).sum(0)]
    for k in range(1, K):
        cell = cells[k]
        if not tick_grads[k]:  # the tier never ticked in this window
            grads += [torch.zeros_like(p) for p in (cell.inp.weight, cell.inp.bias, cell.hh.weight, cell.hh.bias)]
            continue
        dgi, dgh, x, s_prev = (torch.cat(items) for items in zip(*tick_grads[k]))
        grads += [dgi.t() @ x, dgi.sum(0), dgh.t() @ s_prev, dgh.sum(0)]
    return grads
