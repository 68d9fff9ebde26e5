// Paged decode attention for CPU, fp32, contract of
// braid.kernels.reference.paged_decode_attention: out [S, Hq, Dv], lse [S, Hq]
// (a row with no keys: out 0, lse -inf). Strided K/V views are fine (MLA reads
// two views of one latent cache layer); the last dim must be contiguous.
// One pass over each sequence's blocks per KV head with an online softmax, no
// gathered copy of the cache (algorithm above paged_decode).
// Also the KV write (write_kv) and the LSE merge (merge_states), below.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BRAID_PD_AVX2 1
#endif

namespace {

// paged_decode: each item, the keys of one (row, KV head) (or a part of them, see
// context_parts), is walked in tiles of up to kTile keys (row pointers, so any
// block size and strides): the tile's scores for the G query heads of that KV head
// (query head h * G + g reads KV head h), an online-softmax step (running max m and
// sum l per head; what the output accumulator holds is rescaled by exp(m_old -
// m_new)), then the tile's V rows into the accumulator. Each K and V row is read
// from memory once for all G heads, then from L1; the next tile's rows are
// prefetched while a tile computes. AVX2/FMA where built for it, else plain loops.
constexpr int kTile = 16;
constexpr int kPrefetchLocality = 2;  // into L2: measured faster than into L1 (3)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {  // one call's sizes, strides and data
  const float *q, *k, *v;
  const int64_t* tables;
  int64_t Hq, Hkv, G, D, Dv, Dvp, B, MB;  // Dvp: Dv rounded up to 8 (accumulator row)
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;
  float scale;
};

struct TileRows {  // up to kTile keys: their K and V rows
  const float *k[kTile], *v[kTile];
  int n = 0;
};

// Asks for the next tile's rows a few at a time, from inside the current tile's
// loops (blocks are small, often a page each, so the hardware prefetcher stops at
// every block; a burst of prefetches stalls on the miss buffers).
class Prefetcher {
 public:
  // rows' first kn floats of K and vn of V (0: none), over `slots` step() calls
  void start(const TileRows* rows, int64_t kn, int64_t vn, int64_t slots) {
    rows_ = rows, kn_ = kn, vn_ = vn, i_ = 0;
    rate_ = (rows->n + slots - 1) / std::max<int64_t>(slots, 1);
  }
  void step() {
    for (int r = 0; r < rate_ && i_ < rows_->n; ++r, ++i_) {
      lines(rows_->k[i_], kn_);
      lines(rows_->v[i_], vn_);
    }
  }
  void flush() {
    rate_ = kTile;
    step();
  }

 private:
  static void lines(const float* x, int64_t n) {  // the 64-byte lines of x[0, n)
#if defined(__GNUC__)
    if (n <= 0) return;
    const uintptr_t end = reinterpret_cast<uintptr_t>(x + n);
    for (uintptr_t c = reinterpret_cast<uintptr_t>(x) & ~uintptr_t(63); c < end; c += 64)
      __builtin_prefetch(reinterpret_cast<const void*>(c), 0, kPrefetchLocality);
#endif
  }
  const TileRows* rows_ = nullptr;
  int64_t kn_ = 0, vn_ = 0;
  int i_ = 0, rate_ = 0;
};

struct State {  // G heads over some keys: max m, sum l, unnormalized output acc [G, Dvp]
  std::vector<float> m, l, alpha, acc, s;  // s: the tile's scores, then weights [G, kTile]
  Prefetcher pf;
  TileRows rows[3];  // the tile being computed, the next, the next item's first
  void reset(int64_t G, int64_t Dvp) {
    m.assign(G, kNegInf);
    l.assign(G, 0.f);
    alpha.resize(G);
    acc.assign(G * Dvp, 0.f);
    s.resize(G * kTile);
  }
};

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

#ifdef BRAID_PD_AVX2
// exp(x) for x <= 0 to about 1 ulp (Cephes expf: x = n ln2 + r with ln2 in two
// parts, |r| <= ln2/2, a degree-6 polynomial for e^r, times 2^n built in the
// exponent bits). x < -87.3 (and -inf) gives 0; NaN stays NaN.
inline __m256 exp_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);  // NaN passes (max returns its second operand)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// The lane sums of a[0..7] as one vector [sum a[0], ..., sum a[7]].
inline __m256 hsum8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  // u0 = [a0..a3 over lanes 0-3 | a0..a3 over lanes 4-7], u1 the same for a4..a7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// s[g * kTile + j] = scale * (q_g . k_j) for the G heads and 8 key rows k[0..7].
void scores8(const Problem& p, const float* q, const float* const* k, float* s, Prefetcher& pf) {
  const int64_t D = p.D, D8 = D & ~int64_t(7);
  for (int64_t g = 0; g < p.G; ++g) {
    const float* qg = q + g * D;
    float* sg = s + g * kTile;
#ifdef BRAID_PD_AVX2
    __m256 acc[8];  // one per key; reduced across lanes at the end
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) {
      const __m256 qv = _mm256_loadu_ps(qg + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(k[j] + d), qv, acc[j]);
    }
    pf.step();
    const __m256 dots = hsum8(acc);
    if (D8 == D) {  // (a scalar pass after a vector store would stall on store forwarding)
      _mm256_storeu_ps(sg, _mm256_mul_ps(dots, _mm256_set1_ps(p.scale)));
      continue;
    }
    _mm256_storeu_ps(sg, dots);
#else
    for (int j = 0; j < 8; ++j) sg[j] = dot(qg, k[j], D8);
#endif
    for (int j = 0; j < 8; ++j) {
      for (int64_t d = D8; d < D; ++d) sg[j] += qg[d] * k[j][d];  // D % 8 tail
      sg[j] *= p.scale;
    }
  }
}

#ifdef BRAID_PD_AVX2
// The max of x's lanes, in every lane.
inline __m256 hmax_all(__m256 x) {
  x = _mm256_max_ps(x, _mm256_permute2f128_ps(x, x, 1));
  x = _mm256_max_ps(x, _mm256_permute_ps(x, 0x4e));
  return _mm256_max_ps(x, _mm256_permute_ps(x, 0xb1));
}

// The sum of x's lanes.
inline float hsum(__m256 x) {
  __m128 y = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  y = _mm_add_ps(y, _mm_movehl_ps(y, y));
  return _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y)));
}
#endif

// Online-softmax step over a tile of n keys (scores in st.s): per head the new
// max, alpha = exp(m_old - m_new) for what l and acc hold, s -> exp(s - m_new)
// (0 past n), l = l * alpha + sum of the tile's weights.
void softmax_step(State& st, int64_t G, int n) {
  for (int64_t g = 0; g < G; ++g) {
    float* s = st.s.data() + g * kTile;
    for (int j = n; j < kTile; ++j) s[j] = kNegInf;
    const float m_old = st.m[g];
#ifdef BRAID_PD_AVX2
    __m256 mv = _mm256_loadu_ps(s);
    for (int j = 8; j < kTile; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
    mv = _mm256_max_ps(hmax_all(mv), _mm256_set1_ps(m_old));
    __m256 sv = _mm256_setzero_ps();
    for (int j = 0; j < kTile; j += 8) {
      const __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
      _mm256_storeu_ps(s + j, e);
      sv = _mm256_add_ps(sv, e);
    }
    const float m = _mm256_cvtss_f32(mv), sum = hsum(sv);
    const float alpha = m == m_old ? 1.f : _mm256_cvtss_f32(exp_nonpos(_mm256_set1_ps(m_old - m)));
#else
    float m = m_old, sum = 0.f;
    for (int j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
    for (int j = 0; j < kTile; ++j) sum += (s[j] = j < n ? std::exp(s[j] - m) : 0.f);
    const float alpha = m == m_old ? 1.f : std::exp(m_old - m);
#endif
    st.alpha[g] = alpha;
    st.l[g] = st.l[g] * alpha + sum;
    st.m[g] = m;
  }
}

// acc[g, c : c + 8 NV] = alpha_g acc[g, ...] + sum_j w[g, j] v_j[c : c + 8 NV], for every head.
template <int NV>
void pv_cols(const Problem& p, State& st, const float* const* v, int n, int64_t c) {
  for (int64_t g = 0; g < p.G; ++g) {
    float* o = st.acc.data() + g * p.Dvp + c;
    const float* w = st.s.data() + g * kTile;
#ifdef BRAID_PD_AVX2
    const __m256 a = _mm256_set1_ps(st.alpha[g]);
    __m256 r[NV];
    for (int i = 0; i < NV; ++i) r[i] = _mm256_mul_ps(_mm256_loadu_ps(o + 8 * i), a);
    for (int j = 0; j < n; ++j) {
      const __m256 wj = _mm256_set1_ps(w[j]);
      for (int i = 0; i < NV; ++i) r[i] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(v[j] + c + 8 * i), r[i]);
    }
    st.pf.step();
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(o + 8 * i, r[i]);
#else
    for (int d = 0; d < 8 * NV; ++d) o[d] *= st.alpha[g];
    for (int j = 0; j < n; ++j)
      for (int d = 0; d < 8 * NV; ++d) o[d] += w[j] * v[j][c + d];
#endif
  }
}

// The tile's V rows into the accumulator: 64-column strips (8 vector accumulators
// per head, each V strip reused from L1 by the G heads), then the Dv % 8 columns.
void pv(const Problem& p, State& st, const float* const* v, int n) {
  const int64_t Dv8 = p.Dv & ~int64_t(7);
  int64_t c = 0;
  for (; c + 64 <= Dv8; c += 64) pv_cols<8>(p, st, v, n, c);
  switch ((Dv8 - c) / 8) {
    case 7: pv_cols<7>(p, st, v, n, c); break;
    case 6: pv_cols<6>(p, st, v, n, c); break;
    case 5: pv_cols<5>(p, st, v, n, c); break;
    case 4: pv_cols<4>(p, st, v, n, c); break;
    case 3: pv_cols<3>(p, st, v, n, c); break;
    case 2: pv_cols<2>(p, st, v, n, c); break;
    case 1: pv_cols<1>(p, st, v, n, c); break;
    default: break;
  }
  for (int64_t g = 0; g < p.G && Dv8 < p.Dv; ++g) {
    float* o = st.acc.data() + g * p.Dvp;
    const float* w = st.s.data() + g * kTile;
    for (int64_t d = Dv8; d < p.Dv; ++d) {
      float t = o[d] * st.alpha[g];
      for (int j = 0; j < n; ++j) t += w[j] * v[j][d];
      o[d] = t;
    }
  }
}

// One tile of keys into st; the next tile's rows are fetched along the way.
void tile(const Problem& p, const float* q, const TileRows& t, State& st) {
  const int n = t.n;
  for (int j0 = 0; j0 < n; j0 += 8) {
    const float* k8[8];
    for (int j = 0; j < 8; ++j) k8[j] = t.k[std::min(j0 + j, n - 1)];  // a short tile repeats its last row
    scores8(p, q, k8, st.s.data() + j0, st.pf);
  }
  softmax_step(st, p.G, n);
  pv(p, st, t.v, n);
  st.pf.flush();
}

struct Item {  // keys [t0, t1) of row s for KV head h
  int64_t s, h, t0, t1;
};

// Walks the keys of an item block by block: no division per key, and a
// block-table entry read only when a key of that block is used.
class Rows {
 public:
  Rows(const Problem& p, const Item& it)
      : p_(p), table_(p.tables + it.s * p.MB), h_(it.h), t_(it.t0), t1_(it.t1), b_(it.t0 / p.B), off_(it.t0 % p.B) {}
  void gather(TileRows& out) {  // the next up to kTile rows
    for (out.n = 0; out.n < kTile && t_ < t1_; ++out.n, ++t_) {
      if (!kb_) load();
      out.k[out.n] = kb_ + off_ * p_.ks2;
      out.v[out.n] = vb_ + off_ * p_.vs2;
      if (++off_ == p_.B) off_ = 0, ++b_, kb_ = nullptr;
    }
  }

 private:
  void load() {
    const int64_t blk = table_[b_];
    kb_ = p_.k + blk * p_.ks0 + h_ * p_.ks1;
    vb_ = p_.v + blk * p_.vs0 + h_ * p_.vs1;
  }
  const Problem& p_;
  const int64_t* table_;
  int64_t h_, t_, t1_, b_, off_;
  const float *kb_ = nullptr, *vb_ = nullptr;
};

// The G query heads of an item into st (from empty). Tiles are gathered one
// ahead so that each tile's rows are fetched while the one before computes;
// with next, the last tile fetches next's first tile (primed: this call's first
// tile was fetched so by the call before).
void attend(const Problem& p, const Item& it, const Item* next, bool primed, State& st) {
  st.reset(p.G, p.Dvp);
  const float* q = p.q + (it.s * p.Hq + it.h * p.G) * p.D;
  const bool v_in_k = p.v == p.k && p.vs2 == p.ks2 && p.vs1 == p.ks1 && p.vs0 == p.ks0;  // MLA
  const int64_t vn = v_in_k ? 0 : p.Dv;
  // step() calls per tile: one per head after each 8 keys' scores and each 64 V columns
  const int64_t slots = p.G * (kTile / 8 + (p.Dv + 63) / 64);
  Rows rows(p, it);
  rows.gather(st.rows[0]);
  if (!primed) {
    st.pf.start(&st.rows[0], p.D, vn, 1);
    st.pf.flush();
  }
  for (int cur = 0; st.rows[cur].n > 0; cur ^= 1) {
    TileRows* ahead = &st.rows[cur ^ 1];
    rows.gather(*ahead);
    if (ahead->n == 0 && next) Rows(p, *next).gather(*(ahead = &st.rows[2]));
    st.pf.start(ahead, p.D, vn, slots);
    tile(p, q, st.rows[cur], st);
  }
}

// out [G, Dv] = acc / l and lse [G] = m + log(l) of a finished state (with keys).
void finish(const Problem& p, const State& st, float* out, float* lse) {
  for (int64_t g = 0; g < p.G; ++g) {
    const float inv = 1.f / st.l[g];
    const float* a = st.acc.data() + g * p.Dvp;
    for (int64_t d = 0; d < p.Dv; ++d) out[g * p.Dv + d] = a[d] * inv;
    lse[g] = st.m[g] + std::log(st.l[g]);
  }
}

// Flash-decoding: with fewer (row, KV head) items than threads, each item's keys are
// cut into P parts attended in parallel, their states merged by LSE (P = 1: none).
int64_t context_parts(int64_t items, int64_t max_len) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || items >= threads) return 1;
  return std::max<int64_t>(1, std::min((4 * threads + items - 1) / items, max_len / 256));
}

// Merge the P partial states of one (row, KV head) (m, l [P, G], acc [P, G, Dvp]) into out and lse.
void merge_parts(const Problem& p, int64_t P, const float* m, const float* l, const float* acc, float* out,
                 float* lse) {
  for (int64_t g = 0; g < p.G; ++g) {
    float mx = kNegInf, total = 0.f;
    for (int64_t i = 0; i < P; ++i) mx = std::max(mx, m[i * p.G + g]);
    if (mx == kNegInf) continue;  // no keys
    for (int64_t i = 0; i < P; ++i) total += l[i * p.G + g] * std::exp(m[i * p.G + g] - mx);
    float* o = out + g * p.Dv;
    for (int64_t i = 0; i < P; ++i) {
      if (m[i * p.G + g] == kNegInf) continue;
      const float w = std::exp(m[i * p.G + g] - mx) / total;
      const float* a = acc + (i * p.G + g) * p.Dvp;
      for (int64_t d = 0; d < p.Dv; ++d) o[d] += a[d] * w;
    }
    lse[g] = mx + std::log(total);
  }
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
  const int64_t NB = k_cache.size(0);
  TORCH_CHECK(v_cache.size(0) == NB && v_cache.size(1) == Hkv && v_cache.size(2) == B, "paged_decode: K/V caches differ");
  TORCH_CHECK(len.numel() == S && tab.size(0) == S, "paged_decode: one length and one table row per query row");
  const int64_t* tp = tab.data_ptr<int64_t>();
  const int64_t* lp = len.data_ptr<int64_t>();
  int64_t max_len = 0;
  for (int64_t s = 0; s < S; ++s) {  // every block a row reads is a block of the cache
    TORCH_CHECK(lp[s] <= MB * B, "paged_decode: sequence longer than its block table");
    for (int64_t b = 0; b * B < lp[s]; ++b)
      TORCH_CHECK(tp[s * MB + b] >= 0 && tp[s * MB + b] < NB, "paged_decode: block id outside the cache");
    max_len = std::max(max_len, lp[s]);
  }
  const Problem p{q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tp,
                  Hq, Hkv, G, D, Dv, (Dv + 7) & ~int64_t(7), B, MB,
                  k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                  v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), static_cast<float>(scale)};
  float* op = out.data_ptr<float>();
  float* ep = lse.data_ptr<float>();
  // Items: part idx % P of the keys of (row, KV head) idx / P (P = 1: all of them).
  const int64_t P = context_parts(S * Hkv, max_len), items = S * Hkv * P;
  auto item = [&](int64_t idx) {
    const int64_t s = idx / (Hkv * P), n = std::max<int64_t>(lp[s], 0), i = idx % P;
    return Item{s, idx / P % Hkv, n * i / P, n * (i + 1) / P};
  };
  std::vector<float> pm(P > 1 ? items * G : 0), pl(pm.size()), pacc(pm.size() * p.Dvp);  // parts' states
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    State st;
    bool primed = false;  // this item's first tile fetched by the one before
    for (int64_t idx = begin; idx < end; ++idx) {
      const Item it = item(idx), nx = item(std::min(idx + 1, end - 1));
      const bool keys = it.t1 > it.t0, fetch_next = keys && idx + 1 < end && nx.t1 > nx.t0;
      if (keys)
        attend(p, it, fetch_next ? &nx : nullptr, primed, st);
      else
        st.reset(G, p.Dvp);  // no keys: m -inf, l 0
      primed = fetch_next;
      if (P == 1) {
        if (keys) finish(p, st, op + (it.s * Hq + it.h * G) * Dv, ep + it.s * Hq + it.h * G);
      } else {
        std::copy(st.m.begin(), st.m.end(), pm.begin() + idx * G);
        std::copy(st.l.begin(), st.l.end(), pl.begin() + idx * G);
        std::copy(st.acc.begin(), st.acc.end(), pacc.begin() + idx * G * p.Dvp);
      }
    }
  });
  if (P == 1) return {out, lse};
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx)  // idx = s * Hkv + h: query heads h * G.. of row s
      merge_parts(p, P, pm.data() + idx * P * G, pl.data() + idx * P * G, pacc.data() + idx * P * G * p.Dvp,
                  op + idx * G * Dv, ep + idx * G);
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
