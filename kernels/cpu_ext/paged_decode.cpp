// Paged decode attention for CPU, fp32: one pass over each sequence's blocks per
// KV head, no gathered copy of the cache. Contract of
// braid.kernels.reference.paged_decode_attention: out [S, Hq, Dv], lse [S, Hq]
// (a row with no keys: out 0, lse -inf). Strided K/V views are fine (MLA reads
// two views of one latent cache layer); the last dim must be contiguous.
// Also the KV write (write_kv, below).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Dot product in 8 independent lanes: vectorizes without reassociating one sum.
inline float dot(const float* a, const float* b, int64_t n) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += a[i + j] * b[i + j];
  float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

std::vector<at::Tensor> paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tables,
                                     at::Tensor lens, double scale) {
  TORCH_CHECK(q.dtype() == at::kFloat && k_cache.dtype() == at::kFloat && v_cache.dtype() == at::kFloat,
              "paged_decode: float32 only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "paged_decode: bad ranks");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "paged_decode: K/V last dim must be contiguous");
  q = q.contiguous();
  auto tab = tables.to(at::kLong).contiguous();
  auto len = lens.to(at::kLong).contiguous();
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), B = k_cache.size(2), Dv = v_cache.size(3);
  const int64_t G = Hq / Hkv, MB = tab.size(1);
  TORCH_CHECK(Hq % Hkv == 0 && k_cache.size(3) == D, "paged_decode: head shapes do not fit");
  auto out = at::zeros({S, Hq, Dv}, q.options());
  auto lse = at::full({S, Hq}, -std::numeric_limits<float>::infinity(), q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tp = tab.data_ptr<int64_t>();
  const int64_t* lp = len.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* ep = lse.data_ptr<float>();
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  const float sc = static_cast<float>(scale);
  const int64_t NB = k_cache.size(0);
  TORCH_CHECK(v_cache.size(0) == NB && v_cache.size(1) == Hkv && v_cache.size(2) == B, "paged_decode: K/V caches differ");
  TORCH_CHECK(len.numel() == S && tab.size(0) == S, "paged_decode: one length and one table row per query row");
  for (int64_t s = 0; s < S; ++s) {  // every block a row reads is a block of the cache
    TORCH_CHECK(lp[s] <= MB * B, "paged_decode: sequence longer than its block table");
    for (int64_t b = 0; b * B < lp[s]; ++b)
      TORCH_CHECK(tp[s * MB + b] >= 0 && tp[s * MB + b] < NB, "paged_decode: block id outside the cache");
  }
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t s = idx / Hkv, h = idx % Hkv, n = lp[s];
      if (n <= 0) continue;
      scores.assign(G * n, 0.f);
      for (int64_t t = 0; t < n; ++t) {  // scores of the G query heads of this KV head
        const int64_t blk = tp[s * MB + t / B];
        const float* k = kp + blk * ks0 + h * ks1 + (t % B) * ks2;
        for (int64_t g = 0; g < G; ++g) scores[g * n + t] = dot(qp + (s * Hq + h * G + g) * D, k, D) * sc;
      }
      std::vector<float> inv(G);
      for (int64_t g = 0; g < G; ++g) {  // softmax of each head's row, its LSE
        float* row = scores.data() + g * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) m = row[t] > m ? row[t] : m;
        float l = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          row[t] = std::exp(row[t] - m);
          l += row[t];
        }
        inv[g] = 1.f / l;
        ep[s * Hq + h * G + g] = m + std::log(l);
      }
      float* o = op + (s * Hq + h * G) * Dv;
      for (int64_t t = 0; t < n; ++t) {  // each V row read once for the G heads
        const int64_t blk = tp[s * MB + t / B];
        const float* v = vp + blk * vs0 + h * vs1 + (t % B) * vs2;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * n + t] * inv[g];
          float* og = o + g * Dv;
          for (int64_t d = 0; d < Dv; ++d) og[d] += p * v[d];
        }
      }
    }
  });
  return {out, lse};
}

// The KV write: token t's [C, H, D] rows into slot slots[t] (block slot / B,
// offset slot % B) of one layer's cache [num_blocks, C, H, B, D]; slot -1 is
// skipped. Contract of braid.kernels.reference.write_kv_cache, for kv already in
// the cache's dtype: one row copy per (token, c, head), no index tensors.
void write_kv(at::Tensor cache, at::Tensor kv, at::Tensor slots) {
  TORCH_CHECK(cache.dim() == 5 && kv.dim() == 4, "write_kv: cache [N, C, H, B, D] and kv [T, C, H, D]");
  TORCH_CHECK(cache.scalar_type() == kv.scalar_type(), "write_kv: kv must be in the cache's dtype");
  TORCH_CHECK(cache.stride(4) == 1, "write_kv: the cache's last dim must be contiguous");
  kv = kv.contiguous();
  auto sl = slots.to(at::kLong).contiguous();
  const int64_t T = kv.size(0), C = kv.size(1), H = kv.size(2), D = kv.size(3);
  TORCH_CHECK(cache.size(1) == C && cache.size(2) == H && cache.size(4) == D && sl.numel() == T,
              "write_kv: shapes do not fit");
  const int64_t B = cache.size(3), NB = cache.size(0), es = cache.element_size();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sp[t] < NB * B && sp[t] >= -1, "write_kv: slot outside the cache");
  char* cp = static_cast<char*>(cache.data_ptr());
  const char* kp = static_cast<const char*>(kv.data_ptr());
  for (int64_t t = 0; t < T; ++t) {
    if (sp[t] < 0) continue;
    const int64_t blk = sp[t] / B, off = sp[t] % B;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h) {
        char* dst = cp + (blk * cache.stride(0) + c * cache.stride(1) + h * cache.stride(2) + off * cache.stride(3)) * es;
        std::memcpy(dst, kp + ((t * C + c) * H + h) * D * es, D * es);
      }
  }
}

// Exact LSE merge of partial attention states (contract of
// braid.kernels.reference.merge_attn_states, fp32): outs [N, T, H, D] and lses
// [N, T, H] in any strides (the DCP and PCP merges pass views of one packed
// tensor); a NaN or +inf LSE counts as an empty shard; a row no shard saw gets
// out 0, lse -inf. One pass instead of some fifteen small torch ops.
std::vector<at::Tensor> merge_states(at::Tensor outs, at::Tensor lses) {
  TORCH_CHECK(outs.dtype() == at::kFloat && lses.dtype() == at::kFloat, "merge_states: float32 only");
  TORCH_CHECK(outs.dim() == 4 && lses.dim() == 3 && outs.size(0) == lses.size(0) && outs.size(1) == lses.size(1) &&
                  outs.size(2) == lses.size(2),
              "merge_states: shapes do not fit");
  const int64_t N = outs.size(0), T = outs.size(1), H = outs.size(2), D = outs.size(3);
  auto out = at::zeros({T, H, D}, outs.options());
  auto lse = at::full({T, H}, -std::numeric_limits<float>::infinity(), lses.options());
  auto o = outs.accessor<float, 4>();
  auto l = lses.accessor<float, 3>();
  auto ro = out.accessor<float, 3>();
  auto rl = lse.accessor<float, 2>();
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, T * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> w(N);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t t = idx / H, h = idx % H;
      float m = ninf;
      for (int64_t i = 0; i < N; ++i) {
        float x = l[i][t][h];
        w[i] = (std::isnan(x) || x == std::numeric_limits<float>::infinity()) ? ninf : x;
        m = w[i] > m ? w[i] : m;
      }
      if (m == ninf) continue;  // no keys anywhere: out 0, lse -inf
      float total = 0.f;
      for (int64_t i = 0; i < N; ++i) {
        w[i] = std::exp(w[i] - m);
        total += w[i];
      }
      rl[t][h] = m + std::log(total);
      for (int64_t i = 0; i < N; ++i) {
        const float sc = w[i] / total;
        if (sc == 0.f) continue;
        for (int64_t d = 0; d < D; ++d) ro[t][h][d] += o[i][t][h][d] * sc;
      }
    }
  });
  return {out, lse};
}

bool panel_simd();
at::Tensor panel_linear(at::Tensor x, at::Tensor panels, c10::optional<at::Tensor> bias, int64_t n_out, bool simd);
void shm_post(torch::Tensor flags, int64_t index, int64_t seq);
int64_t shm_wait(torch::Tensor flags, std::vector<int64_t> indices, std::vector<int64_t> pids, int64_t seq,
                 double timeout_s);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shm_post", &shm_post, "publish a shared-memory collective's sequence number (release)");
  m.def("shm_wait", &shm_wait, "wait for peers' sequence numbers (acquire; GIL released; deadline; dead peers)");
  m.def("paged_decode", &paged_decode, "paged decode attention (fp32, CPU)");
  m.def("write_kv", &write_kv, "KV cache write by slot (CPU)");
  m.def("panel_simd", &panel_simd, "whether panel_linear has its AVX-512 tiles on this CPU");
  m.def("panel_linear", &panel_linear, "x W^T (+ bias) with W in 16-row panels (fp32, CPU)", py::arg("x"),
        py::arg("panels"), py::arg("bias"), py::arg("n_out"), py::arg("simd") = true);
  m.def("merge_states", &merge_states, "exact LSE merge of partial attention states (fp32, CPU)");
}
