"""Pre-planned all-to-all dispatch: buffers sized from a forecast, so the count exchange is skipped.

The plain all-to-all dispatch first exchanges how many rows each rank will send to each other
rank (one collective round trip per MoE layer) before it can size the receive buffers. Here both
sides size block s->r from a forecast they share without a message: the number of rows s sent to r
at this layer in the previous step (decode batches change little from step to step), at least one
row. Every block carries its real row count in a header column; padding rows have no expert
(ids -1) and compute nothing. A misprediction (more rows than forecast) sends the overflow rows
point to point (isend/irecv: only the two ranks involved know, and both do), so the result is
exactly that of the plain dispatch. Counters: layers that skipped the count exchange, blocks that
overflowed, padding rows, and the time saved (skips x the measured count-exchange latency).

With a predictor (`parallel.preplan_predictor`, `ctx.routing` a forecast.RoutingLog), the forecast
of layer l+1 comes from the predictor instead: at layer l every rank forecasts the rows it will
send each rank at l+1 from its own tokens' routing so far, and ships that number in an extra
header column of layer l's blocks (or in the count exchange when layer l exchanged counts), so the
receiver sizes the same buffers. Layer 0 keeps the previous step's counts. The `predictor_*`
counters are the subset of skips / overflows / padding whose forecast came from the predictor;
`predict_s` is the time spent predicting (on the critical path, unlike the exchange it replaces).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from moe_serve.distributed.ep import AllToAllDispatcher, _slots, _sort_local, _sum_copies


class PrePlannedAllToAllDispatcher(AllToAllDispatcher):
    def __init__(self, layer: int, ctx):
        super().__init__(layer, ctx)
        self.cap_send: list[int] | None = None  # forecast rows to each rank (= last step's actual)
        self.cap_recv: list[int] | None = None

    def _peer(self, j: int) -> int:
        return self.ctx.ep_global(j)

    def dispatch(self, x, ids, weights, num_experts):
        n, k = ids.shape
        W, group, me, st = self.plan.num_ranks, self.ctx.ep_group, self.ctx.ep_rank, self.ctx.stats
        ids_np = ids.cpu().numpy()
        dest_np = _slots(self.plan, self.l, ids_np) // self.plan.slots_per_rank
        dest = torch.from_numpy(dest_np)
        pair, inv = torch.unique((dest * n + torch.arange(n)[:, None]).reshape(-1), sorted=True, return_inverse=True)
        p_rank, p_tok = torch.div(pair, n, rounding_mode="floor"), pair % n
        if self.ctx.count:
            r = self.ctx.real_tokens
            st.record(self.l, ids_np[:r], dest_np[:r], int(((p_rank != me) & (p_tok < r)).sum()),
                      x.shape[1] * x.element_size())
        inv, cols = inv.view(n, k), torch.arange(k)[None, :].expand(n, k)
        p_ids = torch.full((len(pair), k), -1, dtype=torch.long)
        p_ids[inv, cols] = ids.long()
        p_w = torch.zeros((len(pair), k), dtype=torch.float64)
        p_w[inv, cols] = weights.double()
        actual = torch.bincount(p_rank, minlength=W)  # [W] rows to each rank
        log, pp = self.ctx.routing, self.ctx.preplan
        if log is not None and self.l == 0:
            log.begin(n)
        nxt = log.forecast(self.l, ids, weights, x, self.plan, pp) if log is not None else None  # [W] or None
        nxt_t = nxt if nxt is not None else torch.zeros(W, dtype=torch.long)
        # header columns: this block's real size, the rows its sender forecasts for this pair at layer l+1
        meta = torch.cat((p_ids, p_w.view(torch.int64), actual[p_rank][:, None], nxt_t[p_rank][:, None]), dim=1)
        caps = log.caps.get(self.l) if log is not None else None  # forecast by the predictor at layer l-1
        exchanged = caps is None and self.cap_send is None
        if exchanged:  # first step of this layer, no predictor forecast: exchange the counts (and forecasts)
            t = time.perf_counter()
            recv = torch.empty(W, 2, dtype=torch.long)
            dist.all_to_all_single(recv, torch.stack((actual, nxt_t), 1), group=group)
            pp["count_exchange_s"] += time.perf_counter() - t
            pp["count_exchanges"] += 1
            cs, cr = actual.tolist(), recv[:, 0].tolist()
            if nxt is not None:
                log.caps[self.l + 1] = (nxt.tolist(), recv[:, 1].tolist())
        else:
            send, rcv = caps if caps is not None else (self.cap_send, self.cap_recv)
            cs, cr = [max(c, 1) for c in send], [max(c, 1) for c in rcv]
            cs[me] = cr[me] = max(int(actual[me]), 1)  # the block to itself is known exactly: never overflows
            pp["skipped"] += 1
            pp["predictor_skipped"] += caps is not None
        # rows within their destination's block; those past the block's capacity overflow
        starts = torch.cumsum(actual, 0) - actual
        j = torch.arange(len(pair)) - starts[p_rank]
        cs_t = torch.tensor(cs)
        in_pad = j < cs_t[p_rank]
        pad_pos = (torch.cumsum(cs_t, 0) - cs_t)[p_rank] + j
        x_pad = x.new_zeros(sum(cs), x.shape[1])
        m_pad = torch.full((sum(cs), 2 * k + 2), -1, dtype=torch.long)
        m_pad[:, k:2 * k] = 0
        blk = torch.repeat_interleave(torch.arange(W), cs_t)
        m_pad[:, 2 * k] = actual[blk]  # the header: every row of a block knows the block's real size
        m_pad[:, 2 * k + 1] = nxt_t[blk]  # ... and the forecast of this pair at layer l+1
        x_pad[pad_pos[in_pad]] = x.index_select(0, p_tok[in_pad])
        m_pad[pad_pos[in_pad]] = meta[in_pad]
        r_x = x.new_empty(sum(cr), x.shape[1])
        dist.all_to_all_single(r_x, x_pad, cr, cs, group=group)
        r_m = m_pad.new_empty(sum(cr), 2 * k + 2)
        dist.all_to_all_single(r_m, m_pad, cr, cs, group=group)
        if exchanged:  # blocks may be empty: the exchanged counts are exact
            got = torch.tensor(cr)
        else:  # every block has >= 1 row: its first row's header says the block's real size (and the forecast)
            cr_t = torch.tensor(cr)
            head = r_m[torch.cumsum(cr_t, 0) - cr_t]
            got = head[:, 2 * k]  # [W] real rows each rank sent me
            if nxt is not None:
                log.caps[self.l + 1] = (nxt.tolist(), head[:, 2 * k + 1].tolist())
        ov_send = [max(0, int(a) - c) for a, c in zip(actual.tolist(), cs)]
        ov_recv = [max(0, int(g) - c) for g, c in zip(got.tolist(), cr)]
        ov_x, ov_m, ops = [], [], []
        for q in range(W):
            if ov_send[q]:
                rows = torch.nonzero((p_rank == q) & ~in_pad).reshape(-1)
                ops += [dist.P2POp(dist.isend, x.index_select(0, p_tok[rows]).contiguous(), self._peer(q), group),
                        dist.P2POp(dist.isend, meta[rows].contiguous(), self._peer(q), group)]
            if ov_recv[q]:
                bx, bm = x.new_empty(ov_recv[q], x.shape[1]), meta.new_empty(ov_recv[q], 2 * k + 2)
                ov_x.append(bx)
                ov_m.append(bm)
                ops += [dist.P2POp(dist.irecv, bx, self._peer(q), group), dist.P2POp(dist.irecv, bm, self._peer(q), group)]
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            pp["overflow_blocks"] += sum(1 for v in ov_send if v)
            pp["predictor_overflow_blocks"] += sum(1 for v in ov_send if v) if caps is not None else 0
        pp["padding_rows"] += sum(cs) - int(in_pad.sum())
        pp["predictor_padding_rows"] += sum(cs) - int(in_pad.sum()) if caps is not None else 0
        self.cap_send, self.cap_recv = actual.tolist(), got.tolist()
        r_x = torch.cat([r_x, *ov_x]) if ov_x else r_x
        r_m = torch.cat([r_m, *ov_m]) if ov_m else r_m
        r_ids = r_m[:, :k]
        r_w = r_m[:, k:2 * k].contiguous().view(torch.float64).to(weights.dtype)
        flat = torch.nonzero(r_ids.reshape(-1) >= 0).reshape(-1)
        x_sorted, flat, e = _sort_local(r_x, flat, k, r_ids.reshape(-1)[flat])
        counts = torch.bincount(e, minlength=num_experts)
        return x_sorted, counts, (flat, r_w, r_x.shape[0], k, p_rank, p_tok, in_pad, pad_pos, cs, cr, ov_send,
                                  ov_recv, n)

    def combine(self, y_sorted, state, dtype):
        flat, r_w, R, k, p_rank, p_tok, in_pad, pad_pos, cs, cr, ov_send, ov_recv, n = state
        W, group = self.plan.num_ranks, self.ctx.ep_group
        partial = _sum_copies(y_sorted * r_w.reshape(-1)[flat][:, None], flat, R, k, dtype)  # [R, H]
        H = partial.shape[1]
        back = partial.new_empty(sum(cs), H)
        dist.all_to_all_single(back, partial[:sum(cr)].contiguous(), cs, cr, group=group)
        rows = partial.new_empty(len(p_rank), H)  # one per (token, rank) pair, in pair order
        rows[in_pad] = back[pad_pos[in_pad]]
        ops, off = [], sum(cr)
        for q in range(W):  # overflow partials go back the way they came
            if ov_recv[q]:
                ops.append(dist.P2POp(dist.isend, partial[off:off + ov_recv[q]].contiguous(), self._peer(q), group))
                off += ov_recv[q]
        bufs = {}
        for q in range(W):
            if ov_send[q]:
                bufs[q] = partial.new_empty(ov_send[q], H)
                ops.append(dist.P2POp(dist.irecv, bufs[q], self._peer(q), group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            for q, b in bufs.items():
                rows[torch.nonzero((p_rank == q) & ~in_pad).reshape(-1)] = b
        per_rank = rows.new_zeros(W, n, H)
        per_rank[p_rank, p_tok] = rows
        return per_rank.sum(0)
