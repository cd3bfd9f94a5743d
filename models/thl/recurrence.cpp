// THL's per-token loops in C++: the forward steps and the reverse walk of one BPTT window.
//
// models/thl/recurrence.py holds the reference (_forward_steps, _backward_steps) and all the work batched over
// the window; this file runs the same steps. Matmuls, the top-k and the O(J) products against the bank use
// the same ATen calls as the reference; the small per-row work (gathers, softmax over kappa, GRU gates, the
// writer's decisions, scatters, the read's backward) is plain loops. That removes the per-op Python and
// dispatcher overhead that dominated the token loop.
//
// The loops run on one thread (recurrence.py sets it): the per-token matmuls are bound by streaming the weights,
// so splitting the batch rows over two threads measured no faster, and on a loaded machine much slower.
// Records are time-major (T, B, ...), so row t of a record is one contiguous block.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

using TensorMap = std::unordered_map<std::string, at::Tensor>;
using Ticks = std::vector<std::vector<bool>>;

const at::Tensor& get(const TensorMap& map, const std::string& key) {
  auto it = map.find(key);
  TORCH_CHECK(it != map.end(), "THL recurrence extension: missing tensor '", key, "'");
  return it->second;
}

void check_contiguous(const TensorMap& map) {
  for (const auto& [key, x] : map)
    TORCH_CHECK(!x.defined() || x.is_contiguous(), "THL recurrence extension: tensor '", key,
                "' must be contiguous (the loops index rows of it directly)");
}

double get(const std::unordered_map<std::string, double>& map, const std::string& key) {
  auto it = map.find(key);
  TORCH_CHECK(it != map.end(), "THL recurrence extension: missing config value '", key, "'");
  return it->second;
}

// Row t of a time-major tensor.
template <typename T>
T* step(const at::Tensor& x, int64_t t) {
  return x.data_ptr<T>() + t * x.stride(0);
}

// ATen's out= calls, taking the output by value (views of records are temporaries).
void addmm_into(at::Tensor out, const at::Tensor& self, const at::Tensor& a, const at::Tensor& b) {
  at::addmm_out(out, self, a, b);
}
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }
void bmm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::bmm_out(out, a, b); }

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// tanh(x) = 1 - 2 / (exp(2x) + 1): libm's tanhf is several times slower than expf; the absolute error stays
// within a few ulp of 1 (the GRU adds n to O(1) values).
template <typename T>
T tanh_via_exp(T x) {
  return T(1) - T(2) / (std::exp(T(2) * x) + T(1));
}

// out = softmax(s / temperature) over n values (max-subtracted).
template <typename T>
void tempered_softmax(const T* s, T* out, int64_t n, T temperature) {
  T mx = s[0] / temperature, sum = 0;
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, s[i] / temperature);
  for (int64_t i = 0; i < n; ++i) sum += (out[i] = std::exp(s[i] / temperature - mx));
  for (int64_t i = 0; i < n; ++i) out[i] /= sum;
}

// torch.gru_cell's update from the gate pre-activations gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh
// (blocks r, z, n): r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r gh_n),
// h' = (h - n) z + n.
template <typename T>
void gru_update(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& h, const at::Tensor& out) {
  const int64_t B = h.size(0), d = h.size(1);
  const T *pi = gi.data_ptr<T>(), *ph = gh.data_ptr<T>(), *hp = h.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    const T *i = pi + b * 3 * d, *g = ph + b * 3 * d, *hb = hp + b * d;
    for (int64_t c = 0; c < d; ++c) {
      const T r = sigmoid(g[c] + i[c]);
      const T z = sigmoid(g[d + c] + i[d + c]);
      const T n = tanh_via_exp(i[2 * d + c] + g[2 * d + c] * r);
      o[b * d + c] = (hb[c] - n) * z + n;
    }
  }
}

// out[t] = base[t] + add for t in [begin, end): a slow tier's term over the steps it feeds.
template <typename T>
void add_over_span(const at::Tensor& out, const at::Tensor& base, const at::Tensor& add, int64_t begin, int64_t end) {
  const int64_t n = add.numel();
  const T* a = add.data_ptr<T>();
  for (int64_t t = begin; t < end; ++t) {
    T* o = step<T>(out, t);
    const T* x = step<T>(base, t);
    for (int64_t i = 0; i < n; ++i) o[i] = x[i] + a[i];
  }
}

// out = sum of x[t] for t in [begin, end) (zero when empty).
template <typename T>
void sum_over_span(const at::Tensor& out, const at::Tensor& x, int64_t begin, int64_t end) {
  const int64_t n = out.numel();
  T* o = out.data_ptr<T>();
  std::fill(o, o + n, T(0));
  for (int64_t t = begin; t < end; ++t) {
    const T* xt = step<T>(x, t);
    for (int64_t i = 0; i < n; ++i) o[i] += xt[i];
  }
}

// The THLConfig fields the loops use.
struct Config {
  double load_penalty, score_scale, temperature, read_ema_decay, write_clip, novelty_theta, novelty_beta,
      blend_threshold, write_rate, stale_weight, underuse_weight;
  std::vector<int64_t> taus;

  Config(const std::unordered_map<std::string, double>& c, std::vector<int64_t> timescales)
      : load_penalty(get(c, "load_penalty")), score_scale(get(c, "score_scale")),
        temperature(get(c, "router_temperature")), read_ema_decay(get(c, "read_ema_decay")),
        write_clip(get(c, "write_clip")), novelty_theta(get(c, "novelty_theta")),
        novelty_beta(get(c, "novelty_beta")), blend_threshold(get(c, "blend_threshold")),
        write_rate(get(c, "write_rate")), stale_weight(get(c, "stale_weight")),
        underuse_weight(get(c, "underuse_weight")), taus(std::move(timescales)) {}
};

constexpr int64_t NEVER_WRITTEN = -(int64_t(1) << 40);  // memory.py's NEVER_WRITTEN

// ---------------------------------------------------------------------------------------------------------------
// Forward: recurrence.py's _forward_steps, with router.read and writer.write (memory.py) inlined.

struct Forward {
  const TensorMap& in;                          // token-side terms, state tensors, weights (see recurrence.py)
  const std::vector<at::Tensor>& tiers;         // tier states entering the window
  const std::vector<TensorMap>& cells;          // per tier: w_ih, w_hh, b_hh (and b_ih for tiers >= 1)
  const Ticks& ticks;
  const std::vector<double>& scale_read;        // the bank's decay scale as step t reads
  const std::vector<double>& scale_write;       // ... and after step t's decay, as it writes
  const Config& cfg;
  int64_t pos;                                  // stream position of the window's first token
  bool keep, keep_dense;                        // keep what the backward needs; also the straight-through parts
  TensorMap reads, writes;                      // records (T, B, ...)
  std::vector<at::Tensor> hist;                 // tier states after every step
  std::unordered_map<std::string, std::vector<at::Tensor>> tier_rec;  // gi, gh, x, s per tier (see recurrence.py)

  template <typename T>
  void run() const {
    // the suffix _r marks records (T, B, ...); rows that only the backward needs are row 0 without keep
    const auto rd = [&](const std::string& key) { return get(reads, key); };
    const auto wr = [&](const std::string& key) { return get(writes, key); };
    const at::Tensor mem = get(in, "mem"), keys = get(in, "keys"), values = get(in, "values");
    const at::Tensor mem_norm = get(in, "mem_norm"), load = get(in, "load"), last_write = get(in, "last_write");
    const at::Tensor q_in = get(in, "q_in"), gates0 = get(in, "gates0");
    const at::Tensor q_base = get(in, "q_base"), pre0 = get(in, "pre0");
    const bool noisy = in.count("noise");
    const at::Tensor noise = noisy ? get(in, "noise") : at::Tensor();
    const at::Tensor w_qf_t = get(in, "w_qf").t(), w_qs_t = get(in, "w_qs").t(), w_kv_t = get(in, "w_kv").t();
    const at::Tensor w_pf_t = get(in, "w_pf").t(), w_ps_t = get(in, "w_ps").t(), b_ps = get(in, "b_ps");
    const int64_t T_ = q_in.size(0), B = q_in.size(1), K = tiers.size(), top = K - 1;
    const int64_t H = keys.size(1), D = keys.size(2), J = keys.size(3), V = values.size(3), M = mem.size(1);
    const int64_t kappa = get(reads, "idx").size(3), HV = H * V, E = D + V;
    const at::Tensor w_td_t = K > 1 ? get(in, "w_td").t() : at::Tensor();

    const at::Tensor alpha_r = rd("alpha"), idx_r = rd("idx"), q_r = rd("q"), r_r = rd("r"), keys_r = rd("keys");
    const at::Tensor values_r = rd("values");
    const at::Tensor src_r = keep ? rd("src") : at::Tensor(), dense_r = keep_dense ? rd("dense") : at::Tensor();
    const at::Tensor written_r = wr("written"), blended_r = wr("blended"), gate_r = wr("gate"), slot_r = wr("slot");
    const at::Tensor u_r = wr("u"), u_norm_r = wr("u_norm"), clip_r = wr("clip"), w_r = wr("w"), old_r = wr("old");
    const at::Tensor target_r = wr("target"), new_r = wr("new"), coef_r = wr("coef");
    const at::Tensor target_scale_r = wr("target_scale"), best_r = wr("best"), best_row_r = wr("best_row");
    const at::Tensor src_old_r = keep ? wr("src_old") : at::Tensor(), src_best_r = keep ? wr("src_best") : at::Tensor();
    const at::Tensor old_keys_r = keep_dense ? wr("old_keys") : at::Tensor();
    const at::Tensor old_values_r = keep_dense ? wr("old_values") : at::Tensor();
    const std::vector<at::Tensor> &gi_r = tier_rec.at("gi"), &gh_r = tier_rec.at("gh");
    const std::vector<at::Tensor> &x_r = tier_rec.at("x"), &s_r = tier_rec.at("s");
    std::vector<at::Tensor> prev = tiers;  // tier states before the step
    std::vector<at::Tensor> w_ih_t, w_hh_t, b_ih, b_hh;
    for (int64_t k = 0; k < K; ++k) {
      w_ih_t.push_back(cells[k].at("w_ih").t());
      w_hh_t.push_back(cells[k].at("w_hh").t());
      b_ih.push_back(k ? cells[k].at("b_ih") : at::Tensor());  // tier 0's input bias is pre0
      b_hh.push_back(cells[k].at("b_hh"));
    }

    // scratch
    const auto opts = mem.options();
    at::Tensor scores = at::empty({B, H, J}, opts), top_scores = at::empty({B, H, kappa}, opts);
    at::Tensor td = K > 1 ? at::empty({B, w_td_t.size(1)}, opts) : at::Tensor();
    at::Tensor q_slow = at::empty({B, w_qs_t.size(1)}, opts), w_slow = get(in, "w_slow").clone();
    at::Tensor dots = at::empty({B, 1, J}, opts), kv = at::empty({B, w_kv_t.size(1)}, opts);
    at::Tensor src = keep ? at::full({B, J}, -1, opts.dtype(at::kLong)) : at::Tensor();

    T *mem_p = mem.data_ptr<T>(), *keys_p = keys.data_ptr<T>(), *values_p = values.data_ptr<T>();
    T *mem_norm_p = mem_norm.data_ptr<T>(), *load_p = load.data_ptr<T>();
    int64_t* last_write_p = last_write.data_ptr<int64_t>();
    const T lp = T(cfg.load_penalty), temperature = T(cfg.temperature), rho = T(cfg.read_ema_decay);
    const T load_add = T((1 - cfg.read_ema_decay) * J / H);
    const T no_novelty = T(1.0 - cfg.novelty_theta), beta = T(cfg.novelty_beta);
    const T blend_threshold = T(cfg.blend_threshold), write_rate = T(cfg.write_rate);
    const T stale_weight = T(cfg.stale_weight), underuse_weight = T(cfg.underuse_weight);
    std::vector<int64_t> tick(K, 0);  // ticks of each tier so far

    for (int64_t t = 0; t < T_; ++t) {
      const int64_t rt = keep ? t : 0;  // records only the backward needs have one scratch row without keep
      const double sr = scale_read[t];
      const T sw = T(scale_write[t]);
      const int64_t pos_t = pos + t;

      // the read: scores of every slot per head (load penalty; Gumbel noise in training), top-kappa, softmax
      const at::Tensor q = q_r[rt];
      addmm_into(q, q_base[t], prev[0], w_qf_t);
      T* sc = scores.data_ptr<T>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          T* s = sc + (b * H + h) * J;
          const T* ld = load_p + b * J;
          if (noisy) {
            const T* z = step<T>(noise, t) + (b * H + h) * J;
            for (int64_t j = 0; j < J; ++j) s[j] = z[j] - lp * ld[j];
          } else {
            for (int64_t j = 0; j < J; ++j) s[j] = ld[j] * -lp;
          }
        }
      scores.view({B * H, 1, J}).baddbmm_(q.view({B * H, 1, D}), keys.view({B * H, D, J}), 1,
                                           sr * cfg.score_scale);
      at::Tensor idx_t = idx_r[t];
      at::topk_out(top_scores, idx_t, scores, kappa, -1, true, true);
      if (keep_dense) {  // the dense softmax over all slots (straight-through)
        T* dn = step<T>(dense_r, t);
        for (int64_t i = 0; i < B * H; ++i) tempered_softmax(sc + i * J, dn + i * J, J, temperature);
      }
      const int64_t* idx = step<int64_t>(idx_r, t);
      const T* top_p = top_scores.data_ptr<T>();
      T *alpha = step<T>(alpha_r, t), *ks = step<T>(keys_r, rt), *vs = step<T>(values_r, rt);
      T* r = step<T>(r_r, rt);
      for (int64_t b = 0; b < B; ++b) {
        T* ld = load_p + b * J;
        for (int64_t j = 0; j < J; ++j) ld[j] *= rho;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t bh = b * H + h;
          const int64_t* ix = idx + bh * kappa;
          T* a = alpha + bh * kappa;
          tempered_softmax(top_p + bh * kappa, a, kappa, temperature);
          for (int64_t d = 0; d < D; ++d)
            for (int64_t k = 0; k < kappa; ++k) ks[(bh * D + d) * kappa + k] = keys_p[(bh * D + d) * J + ix[k]];
          for (int64_t k = 0; k < kappa; ++k)
            std::copy_n(values_p + (bh * J + ix[k]) * V, V, vs + (bh * kappa + k) * V);
          for (int64_t v = 0; v < V; ++v) {  // r = scale sum_k alpha_k v_k
            T acc = 0;
            for (int64_t k = 0; k < kappa; ++k) acc += a[k] * vs[(bh * kappa + k) * V + v];
            r[b * HV + h * V + v] = acc * T(sr);
          }
          for (int64_t k = 0; k < kappa; ++k) ld[ix[k]] += a[k] * load_add;  // read-load EMA
        }
      }

      // the tiers: tier 0 every step; tier k >= 1 on its ticks, from [tier k-1's new state; r; tier k+1's state]
      const at::Tensor r_t = r_r[rt];
      std::vector<at::Tensor> next(K);
      next[0] = hist[0][t];
      addmm_into(gi_r[0][rt], pre0[t], r_t, w_ih_t[0]);
      addmm_into(gh_r[0][rt], b_hh[0], prev[0], w_hh_t[0]);
      gru_update<T>(gi_r[0][rt], gh_r[0][rt], prev[0], next[0]);
      for (int64_t k = 1; k < K; ++k) {
        next[k] = hist[k][t];
        if (!ticks[k][t]) {  // not this tier's tick: hold
          next[k].copy_(prev[k]);
          continue;
        }
        const int64_t j = keep ? tick[k] : 0;
        const at::Tensor x = x_r[k][j];
        const int64_t d_lower = next[k - 1].size(1), width = x.size(1);
        T* xp = x.data_ptr<T>();
        for (int64_t b = 0; b < B; ++b) {
          T* row = xp + b * width;
          std::copy_n(next[k - 1].data_ptr<T>() + b * d_lower, d_lower, row);
          std::copy_n(r + b * HV, HV, row + d_lower);
          if (k < top) std::copy_n(prev[k + 1].data_ptr<T>() + b * prev[k + 1].size(1), prev[k + 1].size(1),
                                   row + d_lower + HV);
        }
        if (keep) s_r[k][j].copy_(prev[k]);
        addmm_into(gi_r[k][j], b_ih[k], x, w_ih_t[k]);
        addmm_into(gh_r[k][j], b_hh[k], prev[k], w_hh_t[k]);
        gru_update<T>(gi_r[k][j], gh_r[k][j], prev[k], next[k]);
        ++tick[k];
        if (k == 1) {  // tier 0 sees the new top-down term from the next step on
          mm_into(td, next[1], w_td_t);
          add_over_span<T>(pre0, gates0, td, t + 1, std::min(t + 1 + cfg.taus[1], T_));
        }
      }
      if (ticks[top][t]) {  // the slowest tier ticked: its query part from the next step, its write part now
        mm_into(q_slow, next[top], w_qs_t);
        add_over_span<T>(q_base, q_in, q_slow, t + 1, std::min(t + 1 + cfg.taus[top], T_));
        addmm_into(w_slow, b_ps, next[top], w_ps_t);
      }

      // the write: w = clip(W [s_fast; s_slow]); novelty against every slot; blend into the most similar slot
      // or replace the stalest / least-read one; the gate scales the write and suppresses it below novelty theta
      const at::Tensor u = u_r[rt], w = w_r[rt];
      addmm_into(u, w_slow, next[0], w_pf_t);
      T *up = u.data_ptr<T>(), *wp = w.data_ptr<T>(), *u_norm = step<T>(u_norm_r, rt), *clip = step<T>(clip_r, rt);
      std::vector<T> w_norm(B);
      for (int64_t b = 0; b < B; ++b) {
        T uu = 0, ww = 0;
        for (int64_t m = 0; m < M; ++m) uu += up[b * M + m] * up[b * M + m];
        u_norm[b] = std::sqrt(uu);
        clip[b] = std::min(T(cfg.write_clip) / (u_norm[b] + T(1e-6)), T(1));
        for (int64_t m = 0; m < M; ++m) {
          wp[b * M + m] = up[b * M + m] * clip[b];
          ww += wp[b * M + m] * wp[b * M + m];
        }
        w_norm[b] = std::sqrt(ww);
      }
      bmm_into(dots, w.view({B, 1, M}), mem);
      bool *written = step<bool>(written_r, t), *blended = step<bool>(blended_r, t);
      T *gate = step<T>(gate_r, t), *coef = step<T>(coef_r, rt), *target_scale = step<T>(target_scale_r, rt);
      int64_t *slot = step<int64_t>(slot_r, rt), *best = step<int64_t>(best_r, rt);
      T *old = step<T>(old_r, rt), *target = step<T>(target_r, rt), *nw = step<T>(new_r, rt);
      T* best_row = step<T>(best_row_r, rt);
      for (int64_t b = 0; b < B; ++b) {
        const T* dt = dots.data_ptr<T>() + b * J;
        const T* mn = mem_norm_p + b * J;
        const T* ld = load_p + b * J;
        const int64_t* lw = last_write_p + b * J;
        int64_t best_j = 0;  // the first maximum, as torch.max
        T best_cos = 0;
        for (int64_t j = 0; j < J; ++j) {
          const T c = dt[j] / (mn[j] * w_norm[b] + T(1e-8));  // an empty slot: cosine 0
          if (j == 0 || c > best_cos) best_cos = c, best_j = j;
        }
        written[b] = best_cos < no_novelty;
        blended[b] = best_cos >= blend_threshold;
        best[b] = best_j;
        slot[b] = best_j;
        if (!blended[b]) {  // a replace write: the slot with the best staleness / under-use score (first maximum)
          T best_stale = 0;
          for (int64_t j = 0; j < J; ++j) {
            const T stale = std::log1p(T(pos_t - lw[j])) * stale_weight - ld[j] * underuse_weight;
            if (j == 0 || stale > best_stale) best_stale = stale, slot[b] = j;
          }
        }
        gate[b] = sigmoid((no_novelty - best_cos) * beta);
        coef[b] = written[b] ? (blended[b] ? write_rate * gate[b] : T(1)) : T(0);
        target_scale[b] = (blended[b] ? T(1) : gate[b]) / sw;  // rows are stored in units of the scale
        const T* bank = mem_p + b * M * J;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t i = b * M + m;
          old[i] = bank[m * J + slot[b]];
          best_row[i] = bank[m * J + best_j];
          target[i] = wp[i] * target_scale[b];
          const T diff = target[i] - old[i];  // torch.lerp's two-sided formula
          nw[i] = coef[b] < T(0.5) ? old[i] + coef[b] * diff : target[i] - diff * (T(1) - coef[b]);
        }
      }
      mm_into(kv, new_r[rt], w_kv_t);
      const T* kvp = kv.data_ptr<T>();
      for (int64_t b = 0; b < B; ++b) {  // update only the touched row of every cache
        const int64_t s = slot[b];
        T norm = 0;
        for (int64_t m = 0; m < M; ++m) {
          mem_p[(b * M + m) * J + s] = nw[b * M + m];
          norm += nw[b * M + m] * nw[b * M + m];
        }
        mem_norm_p[b * J + s] = std::sqrt(norm);
        if (written[b]) last_write_p[b * J + s] = std::max(last_write_p[b * J + s], pos_t);
        for (int64_t h = 0; h < H; ++h) {
          const int64_t bh = b * H + h;
          T* key_col = keys_p + bh * D * J + s;
          T* value_row = values_p + (bh * J + s) * V;
          if (keep_dense) {
            for (int64_t d = 0; d < D; ++d) step<T>(old_keys_r, t)[bh * D + d] = key_col[d * J];
            std::copy_n(value_row, V, step<T>(old_values_r, t) + bh * V);
          }
          for (int64_t d = 0; d < D; ++d) key_col[d * J] = kvp[b * H * E + h * E + d];
          std::copy_n(kvp + b * H * E + h * E + D, V, value_row);
        }
      }
      if (keep) {  // which step last wrote every row a read or a write gathered (-1: before the window)
        int64_t* sp = src.data_ptr<int64_t>();
        int64_t *src_read = step<int64_t>(src_r, t), *src_old = step<int64_t>(src_old_r, t);
        int64_t* src_best = step<int64_t>(src_best_r, t);
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t i = 0; i < H * kappa; ++i) src_read[b * H * kappa + i] = sp[b * J + idx[b * H * kappa + i]];
          src_old[b] = sp[b * J + slot[b]];
          src_best[b] = sp[b * J + best[b]];
          sp[b * J + slot[b]] = t;
        }
      }
      prev = next;
    }
  }
};

std::tuple<std::vector<at::Tensor>, TensorMap, TensorMap, std::unordered_map<std::string, std::vector<at::Tensor>>>
forward(
    const TensorMap& in, const std::vector<at::Tensor>& tiers, const std::vector<TensorMap>& cells,
    const Ticks& ticks, const std::vector<double>& scale_read, const std::vector<double>& scale_write,
    const std::unordered_map<std::string, double>& config, std::vector<int64_t> taus, int64_t pos, bool keep,
    bool keep_dense) {
  check_contiguous(in);
  const at::Tensor &q_in = get(in, "q_in"), &keys = get(in, "keys"), &values = get(in, "values");
  const int64_t T_ = q_in.size(0), B = q_in.size(1), K = tiers.size();
  const int64_t H = keys.size(1), D = keys.size(2), J = keys.size(3), V = values.size(3);
  const int64_t M = get(in, "mem").size(1), kappa = int64_t(config.at("read_topk")), Tk = keep ? T_ : 1;
  const auto opts = q_in.options(), longs = opts.dtype(at::kLong), bools = opts.dtype(at::kBool);
  Config cfg(config, std::move(taus));
  Forward f{in, tiers, cells, ticks, scale_read, scale_write, cfg, pos, keep, keep_dense};
  f.reads = {{"alpha", at::empty({T_, B, H, kappa}, opts)}, {"idx", at::empty({T_, B, H, kappa}, longs)},
             {"q", at::empty({Tk, B, H * D}, opts)}, {"r", at::empty({Tk, B, H * V}, opts)},
             {"keys", at::empty({Tk, B, H, D, kappa}, opts)}, {"values", at::empty({Tk, B, H, kappa, V}, opts)}};
  f.writes = {{"written", at::empty({T_, B}, bools)}, {"blended", at::empty({T_, B}, bools)},
              {"gate", at::empty({T_, B}, opts)}, {"slot", at::empty({Tk, B}, longs)},
              {"u", at::empty({Tk, B, M}, opts)}, {"u_norm", at::empty({Tk, B, 1}, opts)},
              {"clip", at::empty({Tk, B, 1}, opts)}, {"w", at::empty({Tk, B, M}, opts)},
              {"old", at::empty({Tk, B, M}, opts)}, {"target", at::empty({Tk, B, M}, opts)},
              {"new", at::empty({Tk, B, M}, opts)}, {"coef", at::empty({Tk, B}, opts)},
              {"target_scale", at::empty({Tk, B}, opts)}, {"best", at::empty({Tk, B}, longs)},
              {"best_row", at::empty({Tk, B, M}, opts)}};
  if (keep) {
    f.reads["src"] = at::empty({T_, B, H, kappa}, longs);
    f.writes["src_old"] = at::empty({T_, B}, longs);
    f.writes["src_best"] = at::empty({T_, B}, longs);
  }
  if (keep_dense) {
    f.reads["dense"] = at::empty({T_, B, H, J}, opts);
    f.writes["old_keys"] = at::empty({T_, B, H, D, 1}, opts);
    f.writes["old_values"] = at::empty({T_, B, H, 1, V}, opts);
  }
  for (int64_t k = 0; k < K; ++k) {  // rows: tier 0 updates every step, tier k >= 1 on its ticks
    const int64_t n = !keep ? 1 : k ? std::count(ticks[k].begin(), ticks[k].end(), true) : T_;
    const int64_t d = tiers[k].size(1), width = cells[k].at("w_ih").size(1);
    f.hist.push_back(at::empty({T_, B, d}, opts));
    f.tier_rec["gi"].push_back(at::empty({n, B, 3 * d}, opts));
    f.tier_rec["gh"].push_back(at::empty({n, B, 3 * d}, opts));
    f.tier_rec["x"].push_back(at::empty({k ? n : 0, B, width}, opts));  // tier 0's input is r, its state hist
    f.tier_rec["s"].push_back(at::empty({k ? n : 0, B, d}, opts));
  }
  at::NoGradGuard no_grad;
  AT_DISPATCH_FLOATING_TYPES(q_in.scalar_type(), "thl_forward", [&] { f.run<scalar_t>(); });
  return {f.hist, f.reads, f.writes, f.tier_rec};
}


// ---------------------------------------------------------------------------------------------------------------
// Backward: recurrence.py's _backward_steps. ``a`` holds the per-step coefficients that _backward computed for
// the whole window; the buffers in ``g`` (zeros on entry) receive the gradients.

struct Backward {
  const TensorMap& a;
  const std::vector<at::Tensor>& suffix;        // per tier k >= 1: suffix sums of its feature gradient
  const std::vector<at::Tensor>& A;             // per tier: GRU coefficients (see _gru_coefficients)
  const std::vector<at::Tensor>& Ah;
  const std::vector<at::Tensor>& Z;
  const TensorMap& g;
  const std::vector<at::Tensor>& DGI;           // per tier k >= 1, per tick
  const std::vector<at::Tensor>& DGH;
  const TensorMap& weights;
  const std::vector<at::Tensor>& w_ih;
  const std::vector<at::Tensor>& w_hh;
  const Ticks& ticks;
  const std::vector<double>& scale_read;
  const std::vector<double>& score_factor;      // d score -> d logit per step
  const std::vector<int64_t>& taus;

  template <typename T>
  void run() const {
    const auto in = [&](const std::string& key) { return get(a, key); };
    const auto out = [&](const std::string& key) { return get(g, key); };
    const at::Tensor dS0 = in("dS0"), P = in("P"), Qw = in("Qw"), Qb = in("Qb"), Rw = in("Rw");
    const at::Tensor keep_old = in("keep_old"), clip = in("clip"), clip_slope = in("clip_slope"), u = in("u");
    const at::Tensor src_read = in("src_read"), src_old = in("src_old"), src_best = in("src_best");
    const at::Tensor alpha = in("alpha"), dalpha = in("dalpha"), alpha_scaled = in("alpha_scaled");
    const at::Tensor keys = in("keys"), values = in("values"), q = in("q");
    const at::Tensor DQ = out("DQ"), DU = out("DU"), DGI0 = out("DGI0"), DGH0 = out("DGH0");
    const at::Tensor log_mem = out("log_mem"), log_kv = out("log_kv");
    const at::Tensor span_q = out("span_q"), span_w = out("span_w"), span_td = out("span_td");
    const at::Tensor &w_kv = get(weights, "w_kv"), &w_pf = get(weights, "w_pf"), &w_qf = get(weights, "w_qf");
    const at::Tensor &w_qs = get(weights, "w_qs"), &w_ps = get(weights, "w_ps");
    const int64_t T_ = q.size(0), B = q.size(1), K = w_ih.size(), top = K - 1;
    const int64_t H = keys.size(2), D = keys.size(3), kappa = keys.size(4), V = values.size(4);
    const int64_t M = u.size(2), HD = H * D, HV = H * V, E = D + V;
    const at::Tensor w_td = K > 1 ? get(weights, "w_td") : at::Tensor();
    const bool straight_through = a.count("dense");
    const at::Tensor dense = straight_through ? in("dense") : at::Tensor();
    const at::Tensor slot = straight_through ? in("slot") : at::Tensor();
    const at::Tensor old_keys = straight_through ? in("old_keys") : at::Tensor();
    const at::Tensor old_values = straight_through ? in("old_values") : at::Tensor();
    // the bank at the window's end; the walk undoes the writes one by one
    const at::Tensor keys_bank = straight_through ? get(a, "keys_end") : at::Tensor();
    const at::Tensor values_bank = straight_through ? get(a, "values_end") : at::Tensor();
    std::vector<at::Tensor> grad(K), dh(K), dx(K);
    const auto opts = q.options();
    for (int64_t k = 0; k < K; ++k) {
      const int64_t d = w_hh[k].size(1);
      grad[k] = at::zeros({B, d}, opts);  // d loss / d tier state after the step being undone
      dh[k] = at::empty({B, d}, opts);
      if (k) dx[k] = at::empty({B, w_ih[k].size(1)}, opts);
    }
    at::Tensor dnew = at::empty({B, M}, opts), dr = at::empty({B, HV}, opts), dw = at::empty({B, M}, opts);
    at::Tensor dsoft = straight_through ? at::empty({B * H, values_bank.size(2), 1}, opts) : at::Tensor();
    at::Tensor dq_dense = straight_through ? at::empty({B * H, D, 1}, opts) : at::Tensor();
    std::vector<int64_t> tick(K);  // per tier, the index of step t's tick (counting down)
    for (int64_t k = 0; k < K; ++k) tick[k] = std::count(ticks[k].begin(), ticks[k].end(), true);
    std::vector<T> dal(kappa), dl(kappa);

    for (int64_t t = T_ - 1; t >= 0; --t) {
      for (int64_t k = 0; k < K; ++k) tick[k] -= ticks[k][t];
      // the write: its log entry holds every later reader's gradient of the row and of its key/value
      addmm_into(dnew, log_mem[t], log_kv[t].view({B, H * E}), w_kv);
      const T *dn = dnew.data_ptr<T>(), *p = step<T>(P, t), *qw = step<T>(Qw, t), *qb = step<T>(Qb, t);
      const T *rw = step<T>(Rw, t), *ko = step<T>(keep_old, t), *cl = step<T>(clip, t), *cs = step<T>(clip_slope, t);
      const T* up = step<T>(u, t);
      const int64_t *so = step<int64_t>(src_old, t), *sb = step<int64_t>(src_best, t);
      T *dwp = dw.data_ptr<T>(), *du = step<T>(DU, t);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t i = b * M;
        T dgate = 0, proj = 0;
        for (int64_t m = 0; m < M; ++m) dgate += dn[i + m] * p[i + m];
        T *log_old = step<T>(log_mem, so[b]) + i, *log_best = step<T>(log_mem, sb[b]) + i;
        for (int64_t m = 0; m < M; ++m) {
          dwp[i + m] = dn[i + m] * rw[b] + dgate * qw[i + m];
          log_old[m] += dn[i + m] * ko[b];
          log_best[m] += dgate * qb[i + m];
          proj += dwp[i + m] * up[i + m];
        }
        for (int64_t m = 0; m < M; ++m) du[i + m] = dwp[i + m] * cl[b] - proj * cs[b] * up[i + m];
      }
      grad[0].addmm_(DU[t], w_pf);
      dr.zero_();
      if (ticks[top][t]) {  // the new slowest state made the query's slow part (steps t+1..) and the write's (t..)
        const int64_t end = std::min(t + taus[top], T_);
        sum_over_span<T>(span_q[tick[top]], DQ, t + 1, std::min(end + 1, T_));
        sum_over_span<T>(span_w[tick[top]], DU, t, end);
        grad[top].addmm_(span_q[tick[top]], w_qs).addmm_(span_w[tick[top]], w_ps);
      }
      for (int64_t k = top; k > 0; --k) {
        if (!ticks[k][t]) continue;
        const int64_t j = tick[k], d = dh[k].size(1), d_lower = grad[k - 1].size(1);
        const T *gk = grad[k].data_ptr<T>(), *s0 = step<T>(suffix[k], t);
        const T* s1 = step<T>(suffix[k], std::min(t + taus[k], T_));
        T* dhp = dh[k].data_ptr<T>();
        for (int64_t i = 0; i < B * d; ++i) dhp[i] = gk[i] + (s0[i] - s1[i]);
        if (k == 1) {  // the new tier-1 state made tier 0's top-down term (steps t+1..)
          sum_over_span<T>(span_td[j], DGI0, t + 1, std::min(t + 1 + taus[1], T_));
          dh[1].addmm_(span_td[j], w_td);
        }
        const T *cA = step<T>(A[k], j), *cAh = step<T>(Ah[k], j), *z = step<T>(Z[k], j);
        T *dgi = step<T>(DGI[k], j), *dgh = step<T>(DGH[k], j), *gkw = grad[k].data_ptr<T>();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t c = 0; c < 3; ++c)
            for (int64_t i = 0; i < d; ++i) {
              dgi[(b * 3 + c) * d + i] = dhp[b * d + i] * cA[(b * 3 + c) * d + i];
              dgh[(b * 3 + c) * d + i] = dhp[b * d + i] * cAh[(b * 3 + c) * d + i];
            }
        for (int64_t i = 0; i < B * d; ++i) gkw[i] = dhp[i] * z[i];
        grad[k].addmm_(DGH[k][j], w_hh[k]);
        mm_into(dx[k], DGI[k][j], w_ih[k]);  // x = [lower tier's new state; r; upper tier's previous state]
        const int64_t width = dx[k].size(1), d_upper = width - d_lower - HV;
        const T* dxp = dx[k].data_ptr<T>();
        T *lower = grad[k - 1].data_ptr<T>(), *drp = dr.data_ptr<T>();
        T* upper = k < top ? grad[k + 1].data_ptr<T>() : nullptr;
        for (int64_t b = 0; b < B; ++b) {
          const T* row = dxp + b * width;
          for (int64_t i = 0; i < d_lower; ++i) lower[b * d_lower + i] += row[i];
          for (int64_t i = 0; i < HV; ++i) drp[b * HV + i] += row[d_lower + i];
          for (int64_t i = 0; i < d_upper; ++i) upper[b * d_upper + i] += row[d_lower + HV + i];
        }
      }
      {  // tier 0
        const int64_t d = dh[0].size(1);
        const T *gk = grad[0].data_ptr<T>(), *ds = step<T>(dS0, t), *z = step<T>(Z[0], t);
        const T *cA = step<T>(A[0], t), *cAh = step<T>(Ah[0], t);
        T *dhp = dh[0].data_ptr<T>(), *dgi = step<T>(DGI0, t), *dgh = step<T>(DGH0, t);
        for (int64_t i = 0; i < B * d; ++i) dhp[i] = gk[i] + ds[i];
        for (int64_t b = 0; b < B; ++b)
          for (int64_t c = 0; c < 3; ++c)
            for (int64_t i = 0; i < d; ++i) {
              dgi[(b * 3 + c) * d + i] = dhp[b * d + i] * cA[(b * 3 + c) * d + i];
              dgh[(b * 3 + c) * d + i] = dhp[b * d + i] * cAh[(b * 3 + c) * d + i];
            }
        T* g0 = grad[0].data_ptr<T>();
        for (int64_t i = 0; i < B * d; ++i) g0[i] = dhp[i] * z[i];
        grad[0].addmm_(DGH0[t], w_hh[0]);
        dr.addmm_(DGI0[t], w_ih[0]);
      }
      // the read: r = scale sum_k alpha_k v_k; alpha = softmax(score / temperature); score = scale q . key
      const T sr = T(scale_read[t]), sf = T(score_factor[t]);
      const T *drp = dr.data_ptr<T>(), *al = step<T>(alpha, t), *da = step<T>(dalpha, t);
      const T *as = step<T>(alpha_scaled, t), *vs = step<T>(values, t), *ks = step<T>(keys, t), *qp = step<T>(q, t);
      const int64_t* src = step<int64_t>(src_read, t);
      T* dq = step<T>(DQ, t);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t bh = b * H + h;
          const T* drh = drp + b * HV + h * V;
          T sum = 0;
          for (int64_t k = 0; k < kappa; ++k) {
            T* log_value = step<T>(log_kv, src[bh * kappa + k]) + bh * E + D;
            const T* v = vs + (bh * kappa + k) * V;
            T dot = 0;
            for (int64_t i = 0; i < V; ++i) {
              log_value[i] += as[bh * kappa + k] * drh[i];
              dot += v[i] * drh[i];
            }
            dal[k] = da[bh * kappa + k] + sr * dot;
            sum += dal[k] * al[bh * kappa + k];
          }
          for (int64_t k = 0; k < kappa; ++k) dl[k] = al[bh * kappa + k] * (dal[k] - sum) * sf;
          for (int64_t d = 0; d < D; ++d) {
            T acc = 0;
            for (int64_t k = 0; k < kappa; ++k) acc += ks[(bh * D + d) * kappa + k] * dl[k];
            dq[b * HD + h * D + d] = acc;
          }
          for (int64_t k = 0; k < kappa; ++k) {
            T* log_key = step<T>(log_kv, src[bh * kappa + k]) + bh * E;
            for (int64_t d = 0; d < D; ++d) log_key[d] += dl[k] * qp[b * HD + h * D + d];
          }
        }
      if (straight_through) {  // the dense softmax over the bank as this step read it: undo this step's write
        const int64_t J = keys_bank.size(3);
        const int64_t* sl = step<int64_t>(slot, t);
        T *kb = keys_bank.data_ptr<T>(), *vb = values_bank.data_ptr<T>();
        const T *ok = step<T>(old_keys, t), *ov = step<T>(old_values, t), *dn_p = step<T>(dense, t);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t h = 0; h < H; ++h) {
            const int64_t bh = b * H + h;
            for (int64_t d = 0; d < D; ++d) kb[(bh * D + d) * J + sl[b]] = ok[bh * D + d];
            std::copy_n(ov + bh * V, V, vb + (bh * J + sl[b]) * V);
          }
        bmm_into(dsoft, values_bank.view({B * H, J, V}), dr.view({B * H, V, 1}));
        T* ds = dsoft.data_ptr<T>();
        for (int64_t bh = 0; bh < B * H; ++bh) {
          T sum = 0;
          for (int64_t j = 0; j < J; ++j) sum += (ds[bh * J + j] *= sr) * dn_p[bh * J + j];
          for (int64_t j = 0; j < J; ++j) ds[bh * J + j] = dn_p[bh * J + j] * (ds[bh * J + j] - sum) * sf;
        }
        bmm_into(dq_dense, keys_bank.view({B * H, D, J}), dsoft);
        const T* dd = dq_dense.data_ptr<T>();
        for (int64_t i = 0; i < B * HD; ++i) dq[i] += dd[i];
      }
      grad[0].addmm_(DQ[t], w_qf);
    }
  }
};

void backward(const TensorMap& a, const std::vector<at::Tensor>& suffix, const std::vector<at::Tensor>& A,
              const std::vector<at::Tensor>& Ah, const std::vector<at::Tensor>& Z, const TensorMap& g,
              const std::vector<at::Tensor>& DGI, const std::vector<at::Tensor>& DGH, const TensorMap& weights,
              const std::vector<at::Tensor>& w_ih, const std::vector<at::Tensor>& w_hh, const Ticks& ticks,
              const std::vector<double>& scale_read, const std::vector<double>& score_factor,
              const std::vector<int64_t>& taus) {
  check_contiguous(a);
  check_contiguous(g);
  Backward walk{a, suffix, A, Ah, Z, g, DGI, DGH, weights, w_ih, w_hh, ticks, scale_read, score_factor, taus};
  at::NoGradGuard no_grad;
  AT_DISPATCH_FLOATING_TYPES(get(a, "q").scalar_type(), "thl_backward", [&] { walk.run<scalar_t>(); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "THL window forward steps (see recurrence.py: _forward_steps)");
  m.def("backward", &backward, "THL window reverse walk (see recurrence.py: _backward_steps)");
}
