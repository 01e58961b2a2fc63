// CPU kernel of hqexport::HQQMatMul: Y = A @ dequant(W)^T (+ bias), dequant exactly HQQ's.
//
// Compiled twice, with HQX_ISA=baseline (x86-64-v2) and HQX_ISA=avx2 (x86-64-v3); custom_op.cpp picks one at run
// time. Everything here lives in that namespace and uses no library templates, so the linker can never merge an
// AVX2 body into the baseline path.
//
// The weight is never materialized: each task dequantizes a few rows, a K-chunk at a time, into an L1-sized float
// buffer and multiplies it with A. Dequantized values are bit-identical to the reference (hqexport/ops/reference.py):
// fp16/bf16 arithmetic is one float operation rounded to the dtype, which equals the dtype's own correctly rounded
// operation because float has more than 2p+2 significand bits (p = 11 for fp16, 8 for bf16).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>

#pragma GCC diagnostic ignored "-Wpsabi"

#include "problem.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace hqx {
namespace HQX_ISA {
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint8_t v8b __attribute__((vector_size(8)));

constexpr int64_t kGemvChunk = 1280;  // K-chunk of the M < 4 path; a multiple of 40 (8 and 10 codes per word)
constexpr int64_t kGemvRows = 8;      // output rows per task of the M < 4 path

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// The sum of the 8 lanes, always in this order (pairs, then pairs of pairs), so every path rounds alike.
inline float hsum(v8f s) { return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); }

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float round_f16(float x) { return static_cast<float>(static_cast<_Float16>(x)); }

// Round to the nearest bfloat16, ties to even; NaN stays NaN.
inline float round_bf16(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  const uint32_t quiet = (u | 0x00400000u) & 0xffff0000u;
  return bits_to_float((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

template <DType D>
inline float load_meta(const void* p, int64_t i) {
  if constexpr (D == DType::F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (D == DType::F16) {
    return static_cast<float>(static_cast<const _Float16*>(p)[i]);
  } else {
    return bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16);
  }
}


// round_f16 and round_bf16 on 8 lanes, the same roundings (vcvtps2ph rounds to nearest even, as the cast does).
inline v8f round_f16(v8f x) {
#ifdef __AVX2__
  __m256 v;
  std::memcpy(&v, &x, sizeof(v));
  v = _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  std::memcpy(&x, &v, sizeof(x));
  return x;
#else
  for (int i = 0; i < 8; ++i) x[i] = round_f16(x[i]);
  return x;
#endif
}

inline v8f round_bf16(v8f x) {
  v8u u;
  std::memcpy(&u, &x, sizeof(u));
  const v8u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  const v8u quiet = (u | 0x00400000u) & 0xffff0000u;
  const v8u out = (u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded;
  std::memcpy(&x, &out, sizeof(x));
  return x;
}

// w = rnd(rnd(code - zero) * scale) in the compute dtype META, then cast to fp16 when A is fp16: for one code (V
// float) or 8 codes of one group (V v8f), the same roundings.
template <DType META, bool TO_F16, typename V>
inline V dequant(V code, float zero, float scale) {
  V w;
  if constexpr (META == DType::F32) {
    w = (code - zero) * scale;
  } else if constexpr (META == DType::F16) {
    w = round_f16(round_f16(code - zero) * scale);
  } else {
    w = round_bf16(round_bf16(code - zero) * scale);
  }
  if constexpr (TO_F16 && META != DType::F16) w = round_f16(w);
  return w;
}

// 8 words of W, one per lane (uint8 zero-extended).
template <typename Word>
inline v8i load_words(const Word* w) {
  if constexpr (sizeof(Word) == 1) {
#ifdef __AVX2__
    return reinterpret_cast<v8i>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
#endif
    v8b b;
    std::memcpy(&b, w, sizeof(b));
    return __builtin_convertvector(b, v8i);
  } else {
    v8i v;
    std::memcpy(&v, w, sizeof(v));
    return v;
  }
}

// The 8 * PER codes of 8 uint8 words as floats, in order (code j of word i is element PER * i + j). For 2 and 4
// codes per byte; one code per byte GCC vectorizes by itself, and 1-bit words are rare enough to stay scalar.
template <int BITS, int PER>
inline void unpack8(const uint8_t* words, float* out) {
  constexpr int mask = (1 << BITS) - 1;
  const v8i v = load_words(words);
  if constexpr (PER == 2) {
    const v8f c0 = __builtin_convertvector(v & mask, v8f), c1 = __builtin_convertvector(v >> BITS, v8f);
    store8(out, __builtin_shufflevector(c0, c1, 0, 8, 1, 9, 2, 10, 3, 11));
    store8(out + 8, __builtin_shufflevector(c0, c1, 4, 12, 5, 13, 6, 14, 7, 15));
  } else {
    static_assert(PER == 4, "8 / BITS codes per byte");
    v8f c[4];
    for (int j = 0; j < 4; ++j) c[j] = __builtin_convertvector((v >> (BITS * j)) & mask, v8f);
    const v8f lo01 = __builtin_shufflevector(c[0], c[1], 0, 8, 1, 9, 2, 10, 3, 11);
    const v8f hi01 = __builtin_shufflevector(c[0], c[1], 4, 12, 5, 13, 6, 14, 7, 15);
    const v8f lo23 = __builtin_shufflevector(c[2], c[3], 0, 8, 1, 9, 2, 10, 3, 11);
    const v8f hi23 = __builtin_shufflevector(c[2], c[3], 4, 12, 5, 13, 6, 14, 7, 15);
    store8(out, __builtin_shufflevector(lo01, lo23, 0, 1, 8, 9, 2, 3, 10, 11));
    store8(out + 8, __builtin_shufflevector(lo01, lo23, 4, 5, 12, 13, 6, 7, 14, 15));
    store8(out + 16, __builtin_shufflevector(hi01, hi23, 0, 1, 8, 9, 2, 3, 10, 11));
    store8(out + 24, __builtin_shufflevector(hi01, hi23, 4, 5, 12, 13, 6, 7, 14, 15));
  }
}

// Codes k0 .. k0+len of row n as floats; k0 is a multiple of the codes per word.
template <typename Word, int BITS, int PER>
inline void unpack(const Problem& p, int64_t n, int64_t k0, int64_t len, float* out) {
  constexpr Word mask = static_cast<Word>((1u << BITS) - 1);
  const Word* row = static_cast<const Word*>(p.W) + n * p.row_words + k0 / PER;
  const int64_t full = len / PER;
  int64_t w = 0;
  if constexpr (sizeof(Word) == 1 && (PER == 2 || PER == 4)) {
    for (; w + 8 <= full; w += 8) unpack8<BITS, PER>(row + w, out + w * PER);
  }
  for (; w < full; ++w) {
    const Word v = row[w];
    for (int j = 0; j < PER; ++j) out[w * PER + j] = static_cast<float>((v >> (BITS * j)) & mask);
  }
  const Word last = full * PER < len ? row[full] : 0;
  for (int64_t j = 0; j < len - full * PER; ++j) out[full * PER + j] = static_cast<float>((last >> (BITS * j)) & mask);
}

template <int BITS>
inline void unpack_bits(const Problem& p, int64_t n, int64_t k0, int64_t len, float* out) {
  unpack<WordOf<BITS>, BITS, codes_per_word(BITS)>(p, n, k0, len, out);
}

using SegmentFn = void (*)(const Problem&, int64_t n, int64_t k0, int64_t len, float* out);

// Dequantized W[n, k0 .. k0+len] (values of A's dtype, as floats).
template <int BITS, DType META, bool TO_F16>
void dequant_segment(const Problem& p, int64_t n, int64_t k0, int64_t len, float* out) {
  unpack_bits<BITS>(p, n, k0, len, out);
  const int64_t first = n * p.K + k0;  // flat index of W[n, k0]
  int64_t i = 0;
  if (p.axis == 1) {  // group of flat index f: f / g, runs of g consecutive elements
    int64_t g = first / p.group_size;
    int64_t run = min64(len, (g + 1) * p.group_size - first);
    while (i < len) {
      const float z = load_meta<META>(p.zero, g);
      const float s = load_meta<META>(p.scale, g);
      float* o = out + i;
      int64_t j = 0;
      for (; j + 8 <= run; j += 8) store8(o + j, dequant<META, TO_F16>(load8(o + j), z, s));
      for (; j < run; ++j) o[j] = dequant<META, TO_F16>(o[j], z, s);
      i += run;
      ++g;
      run = min64(len - i, p.group_size);
    }
  } else {  // group of flat index f: f % G, consecutive groups along the row
    while (i < len) {
      const int64_t g = (first + i) % p.groups;
      const int64_t run = min64(len - i, p.groups - g);
      float* o = out + i;
      for (int64_t j = 0; j < run; ++j) {
        o[j] = dequant<META, TO_F16>(o[j], load_meta<META>(p.zero, g + j), load_meta<META>(p.scale, g + j));
      }
      i += run;
    }
  }
}

template <int BITS, DType META>
SegmentFn pick_rounding(const Problem& p) {
  return p.act == DType::F16 ? &dequant_segment<BITS, META, true> : &dequant_segment<BITS, META, false>;
}

template <int BITS>
SegmentFn pick_meta(const Problem& p) {
  switch (p.meta) {
    case DType::F16:
      return pick_rounding<BITS, DType::F16>(p);
    case DType::BF16:
      return pick_rounding<BITS, DType::BF16>(p);
    default:
      return pick_rounding<BITS, DType::F32>(p);
  }
}

SegmentFn pick_segment(const Problem& p) {
  switch (p.bits) {
    case 1:
      return pick_meta<1>(p);
    case 2:
      return pick_meta<2>(p);
    case 3:
      return pick_meta<3>(p);
    case 4:
      return pick_meta<4>(p);
    default:
      return pick_meta<8>(p);
  }
}

// The order of k inside the GEMM (M >= 4). A dot product may add its terms in any order that W and A share: the
// rounding differs, not the arithmetic. For uint8 words of `per` codes (bits 4, 2, 1), W's blocks of 8 words are
// read as the factorized GEMV reads them, code j of word i at j * 8 + i, so that code j of 8 words is one shift and
// mask of their bytes, without the shuffles that restore k's order (SmolLM2's 4-bit shapes, one thread: 1.03-1.04x
// faster at 128 rows, 1.2-1.3x at 16). One code per word (per 1) is k's own order.
struct KOrder {
  int per = 1;
  int64_t block() const { return 8 * per; }
  int64_t operator()(int64_t k) const {
    if (per == 1) return k;
    const int64_t start = k / block() * block(), i = (k - start) / per, j = (k - start) % per;
    return start + j * 8 + i;
  }
};

// Word order applies: fp32 compute dtype and activations, axis 1, uint8 words (1, 2, 4 or 8 codes), groups of
// whole blocks within rows (then every K-chunk starts on a block and ends on one). At 8 bits it is k's own order,
// and word_order_segment then only saves dequant_segment's second pass over the buffer.
bool word_order_applies(const Problem& p) {
  const int per = static_cast<int>(codes_per_word(p.bits));
  const bool uint8_words = p.bits == 8 || p.bits == 4 || p.bits == 2 || p.bits == 1;
  return uint8_words && p.meta == DType::F32 && p.act == DType::F32 && p.axis == 1 && p.K % p.group_size == 0 &&
         p.group_size % (8 * per) == 0;
}

// Dequantized W[n, k0 .. k0+len] in word order (word_order_applies; k0 and len whole blocks): the values of
// dequant_segment, rounded alike, placed as KOrder places them.
template <int BITS>
void word_order_segment(const Problem& p, int64_t n, int64_t k0, int64_t len, float* out) {
  constexpr int kPer = static_cast<int>(codes_per_word(BITS)), kBlock = 8 * kPer;
  const uint8_t* row = static_cast<const uint8_t*>(p.W) + n * p.row_words + k0 / kPer;
  const int64_t first_group = n * (p.K / p.group_size);
  for (int64_t k = 0; k < len; k += kBlock) {
    const int64_t g = first_group + (k0 + k) / p.group_size;
    const float z = load_meta<DType::F32>(p.zero, g), s = load_meta<DType::F32>(p.scale, g);
    const v8i words = load_words(row + k / kPer);
    for (int j = 0; j < kPer; ++j) {
      const v8f code = __builtin_convertvector((words >> (BITS * j)) & ((1 << BITS) - 1), v8f);
      store8(out + k + 8 * j, dequant<DType::F32, false>(code, z, s));
    }
  }
}

SegmentFn pick_word_order_segment(int bits) {
  switch (bits) {
    case 8:
      return &word_order_segment<8>;
    case 4:
      return &word_order_segment<4>;
    case 2:
      return &word_order_segment<2>;
    default:
      return &word_order_segment<1>;
  }
}

// 8 fp16 values widened to fp32 (exact).
inline v8f load8(const _Float16* p) {
#ifdef __AVX2__
  const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v8f v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
#else
  return v8f{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
#endif
}

// A bfloat16 as stored: the upper half of a float's bits, so widening it is a shift (exact).
struct BFloat16 {
  uint16_t bits;
  explicit operator float() const { return bits_to_float(static_cast<uint32_t>(bits) << 16); }
};

// 8 bfloat16 values widened to fp32 (exact).
inline v8f load8(const BFloat16* p) {
#ifdef __AVX2__
  const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  v8f v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
#else
  v8f v;
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// The dot product of fp32 a with b (fp32, or fp16 / bf16 matrices), in a fixed order.
template <typename B>
inline float dot(const float* a, const B* b, int64_t len) {
  v8f s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    s0 += load8(a + i) * load8(b + i);
    s1 += load8(a + i + 8) * load8(b + i + 8);
    s2 += load8(a + i + 16) * load8(b + i + 16);
    s3 += load8(a + i + 24) * load8(b + i + 24);
  }
  for (; i + 8 <= len; i += 8) s0 += load8(a + i) * load8(b + i);
  const v8f s = (s0 + s1) + (s2 + s3);
  float total = hsum(s);
  // One fused multiply-add per element, spelled out: left to the compiler, the fp32 tail was vectorized (products
  // rounded, then added) and the fp16 one fused, so fp16 factors that are exactly fp32 ones gave other sums.
  for (; i < len; ++i) total = __builtin_fmaf(a[i], static_cast<float>(b[i]), total);
  return total;
}

struct Job {
  const Problem* p;
  SegmentFn segment;
  const float* A;  // [M, K] float
  float* Y;        // [M, N] float, without bias
};

// M < 4: each output row is dequantized once, a chunk at a time, and dotted with every row of A.
void gemv_task(void* data, size_t task) {
  const Job& job = *static_cast<const Job*>(data);
  const Problem& p = *job.p;
  alignas(32) float buf[kGemvChunk];
  const int64_t end = min64(p.N, static_cast<int64_t>(task + 1) * kGemvRows);
  for (int64_t n = static_cast<int64_t>(task) * kGemvRows; n < end; ++n) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t k0 = 0; k0 < p.K; k0 += kGemvChunk) {
      const int64_t len = min64(kGemvChunk, p.K - k0);
      job.segment(p, n, k0, len, buf);
      for (int64_t m = 0; m < p.M; ++m) acc[m] += dot(job.A + m * p.K + k0, buf, len);
    }
    for (int64_t m = 0; m < p.M; ++m) job.Y[m * p.N + n] = acc[m];
  }
}

// ---- GEMM (M >= 4): A packed in panels, W dequantized six rows at a time ----
//
// A is packed once per call into panels of P rows (16, or 8 when M <= 8), k-major: Ap[panel][k][r] =
// A[P * panel + r][k]. A task owns 6 rows of W: per K-chunk it dequantizes them into an L1 buffer and, for every
// panel, computes the 6 x P tile: per k, P / 8 loads of the panel, six broadcasts of W and 6 * P / 8 FMAs into as
// many vector accumulators (the register shape of BLAS GEMMs, with W in the broadcast role so that it needs no
// transposition). The panels stream from L2 past the task's rows of W.

constexpr int kTileW = 6;              // rows of W per task (broadcast operands)
constexpr int64_t kPanelChunk = 1280;  // longest K-chunk (multiple of 40): W buffer 30 KiB

template <int P>
struct PackJob {
  const float* A;
  int64_t M, K;
  KOrder order;
  float* Ap;
};

// out + at[k] holds rows[0..8)[k] for k < 8: one 8 x 8 block of A transposed in registers.
inline void transpose8(const float* const* rows, float* out, const int64_t (&at)[8]) {
  v8f r[8], t[8], s[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(rows[i]);
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved: k = 0, 1, 4, 5 and k = 2, 3, 6, 7
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // four rows of one k per half: s[i + q] holds k = q (low half) and k = q + 4
    for (int j = 0; j < 2; ++j) {
      s[i + 2 * j] = __builtin_shufflevector(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      s[i + 2 * j + 1] = __builtin_shufflevector(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int q = 0; q < 4; ++q) {
    store8(out + at[q], __builtin_shufflevector(s[q], s[4 + q], 0, 1, 2, 3, 8, 9, 10, 11));
    store8(out + at[q + 4], __builtin_shufflevector(s[q], s[4 + q], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

template <int P>
void pack_task(void* data, size_t panel) {
  const PackJob<P>& job = *static_cast<const PackJob<P>*>(data);
  float* out = job.Ap + static_cast<int64_t>(panel) * job.K * P;
  const int64_t m0 = static_cast<int64_t>(panel) * P;
  static const float kZeros[8] = {};
  const float* rows[P];  // a panel's rows past M read as zeros
  for (int r = 0; r < P; ++r) rows[r] = m0 + r < job.M ? job.A + (m0 + r) * job.K : nullptr;
  int64_t k = 0;
  for (; k + 8 <= job.K; k += 8) {
    int64_t at[8];  // where A[., k + q] goes in the panel
    for (int q = 0; q < 8; ++q) at[q] = job.order(k + q) * P;
    for (int g = 0; g < P; g += 8) {
      const float* block[8];
      for (int r = 0; r < 8; ++r) block[r] = rows[g + r] != nullptr ? rows[g + r] + k : kZeros;
      transpose8(block, out + g, at);
    }
  }
  for (; k < job.K; ++k) {
    for (int r = 0; r < P; ++r) out[job.order(k) * P + r] = rows[r] != nullptr ? rows[r][k] : 0.f;
  }
}

// out[i][r] = sum over the chunk of W[i][k] * Ap[k][r], for NR rows of W and the panel's P rows of A.
template <int NR, int P>
void micro_tile(const float* ap, const float (*w)[kPanelChunk], int64_t len, float (*out)[16]) {
  constexpr int V = P / 8;
  v8f acc[NR][V] = {};
  // Unrolled by 4 (GCC does not unroll at -O3): the loop's own increments and branch then share the issue width
  // with four k instead of one; a 128-row GEMM of SmolLM2's shapes ran 1.06-1.12x faster, one or two threads.
#pragma GCC unroll 4
  for (int64_t k = 0; k < len; ++k) {
    v8f a[V];
    for (int v = 0; v < V; ++v) a[v] = load8(ap + k * P + 8 * v);
    for (int i = 0; i < NR; ++i) {
      const float b = w[i][k];
      for (int v = 0; v < V; ++v) acc[i][v] += a[v] * b;
    }
  }
  for (int i = 0; i < NR; ++i) {
    for (int v = 0; v < V; ++v) store8(out[i] + 8 * v, acc[i][v]);
  }
}

using TileFn = void (*)(const float*, const float (*)[kPanelChunk], int64_t, float (*)[16]);

template <int P>
constexpr TileFn kTiles[kTileW + 1] = {nullptr, &micro_tile<1, P>, &micro_tile<2, P>, &micro_tile<3, P>,
                                       &micro_tile<4, P>, &micro_tile<5, P>, &micro_tile<6, P>};

struct PanelJob {
  const Problem* p;
  SegmentFn segment;
  int64_t chunk_unit;  // K-chunks start at multiples of it: whole words, and whole blocks in word order
  const float* Ap;  // [panels, K, P]
  float* Y;         // [M, N] float, without bias
};

template <int P>
void panel_task(void* data, size_t task) {
  const PanelJob& job = *static_cast<const PanelJob*>(data);
  const Problem& p = *job.p;
  alignas(32) float w[kTileW][kPanelChunk];
  alignas(32) float tile[kTileW][16];
  const int64_t n0 = static_cast<int64_t>(task) * kTileW;
  const int nr = static_cast<int>(min64(kTileW, p.N - n0));
  const int64_t panels = (p.M + P - 1) / P;
  // K in about equal chunks (multiples of chunk_unit), one when K <= kPanelChunk: each chunk adds its tile to Y
  const int64_t chunks = (p.K + kPanelChunk - 1) / kPanelChunk;
  const int64_t step = ((p.K + chunks - 1) / chunks + job.chunk_unit - 1) / job.chunk_unit * job.chunk_unit;
  for (int64_t k0 = 0; k0 < p.K; k0 += step) {
    const int64_t len = min64(step, p.K - k0);
    for (int j = 0; j < nr; ++j) job.segment(p, n0 + j, k0, len, w[j]);
    for (int64_t b = 0; b < panels; ++b) {
      kTiles<P>[nr](job.Ap + (b * p.K + k0) * P, w, len, tile);
      const int64_t m0 = b * P;
      const int rows = static_cast<int>(min64(P, p.M - m0));
      for (int r = 0; r < rows; ++r) {
        float* y = job.Y + (m0 + r) * p.N + n0;
        for (int i = 0; i < nr; ++i) y[i] = k0 == 0 ? tile[i][r] : y[i] + tile[i][r];
      }
    }
  }
}

template <int P>
bool gemm_panels(const Problem& p, SegmentFn segment, KOrder order, const float* A, float* Y, const Runner& runner) {
  const int64_t panels = (p.M + P - 1) / P;
  float* ap = static_cast<float*>(std::aligned_alloc(32, static_cast<size_t>(panels * p.K * P) * sizeof(float)));
  if (ap == nullptr) return false;
  PackJob<P> pack{A, p.M, p.K, order, ap};
  runner.parallel_for(runner.ctx, &pack_task<P>, static_cast<size_t>(panels), &pack);
  PanelJob job{&p, segment, std::lcm(int64_t{40}, order.block()), ap, Y};
  runner.parallel_for(runner.ctx, &panel_task<P>, static_cast<size_t>((p.N + kTileW - 1) / kTileW), &job);
  std::free(ap);
  return true;
}

// W's rows by `segment`, their k in `order` (KOrder: natural by default).
bool gemm(const Problem& p, SegmentFn segment, const float* A, float* Y, const Runner& runner, KOrder order = {}) {
  return p.M <= 8 ? gemm_panels<8>(p, segment, order, A, Y, runner) : gemm_panels<16>(p, segment, order, A, Y, runner);
}

// ---- Factorized GEMV (M < 4, fp32 compute and activations, axis 1, groups of whole blocks within rows) ----
//
// Per group, sum_k A[k] * (q[k] - z) * s = s * (sum_k A[k] * q[k]) - s * z * (sum_k A[k]): the codes are multiplied
// as small integers converted to float, the group sums of A are computed once per call, and no weight is
// dequantized. Equal to dequant-then-dot in real arithmetic; in float it differs only by rounding (docs/kernels.md).
//
// A block is 8 words of W (uint8, or uint32 for bits 3) = 8 * PER codes; lane i of a v8i holds word i, and its
// j-th code (k = 8 * PER * block + PER * i + j) meets A permuted into the same order (Ablocks[block][j][i]).
//
// Bytes holding several codes (bits 1, 2, 4) are read as prefixes instead: with m_t = word & (2^(BITS t) - 1)
// (m_PER = the word), sum_j c_j a_j = sum_t m_t a'_t where a'_t = a_{t-1} 2^(-BITS (t-1)) - a_t 2^(-BITS t) and
// a_PER = 0. A code then costs a mask, a conversion and an FMA instead of also a shift (the shift runs on one
// vector pipe of the CPUs measured: 1.15x faster on SmolLM2's layers). The a'_t are computed once per call, one
// rounding each, and each m_t (at most 255) converts to float exactly; the terms m_t a'_t are no larger than
// 2^BITS |a|, so the error stays within the bound the factorized form already has (docs/kernels.md).
constexpr bool prefix_form(int bits, int per) { return per > 1 && bits * per == 8; }

// The sums of one row of A over each group of g inputs (g a multiple of 8), always in this order.
inline void group_sums(const Problem& p, const float* a, float* out) {
  for (int64_t gi = 0; gi < p.K / p.group_size; ++gi) {
    v8f s = {};
    const float* ag = a + gi * p.group_size;
    for (int64_t k = 0; k < p.group_size; k += 8) s += load8(ag + k);
    out[gi] = hsum(s);
  }
}

constexpr int kFastRows = 4;  // output rows per pass: each load of A serves 4 rows

struct FastJob {
  const Problem* p;
  const float* Ablocks;  // [M, K] A permuted per block
  const float* Asums;    // [M, K / g] group sums of A (fp32 compute dtype only: exact_rows has no zero term)
  float* Y;              // [M, N]
};

template <typename Word, int BITS, int PER, int R>
inline void fast_rows(const FastJob& job, int64_t n0) {
  const Problem& p = *job.p;
  constexpr int kBlock = 8 * PER;
  const int64_t groups_per_row = p.K / p.group_size;
  const int64_t blocks_per_group = p.group_size / kBlock;
  const float* scale = static_cast<const float*>(p.scale);
  const float* zero = static_cast<const float*>(p.zero);
  const Word* rows[R];
  const int64_t group_bytes = blocks_per_group * 8 * static_cast<int64_t>(sizeof(Word));
  const Word* ahead[R];  // the next pass's rows, prefetched group by group: rows are short (K * bits / 8 bytes), too
                         // short for the hardware prefetcher to run ahead of a model's weights streaming from memory
  for (int r = 0; r < R; ++r) {
    rows[r] = static_cast<const Word*>(p.W) + (n0 + r) * p.row_words;
    ahead[r] = n0 + R + r < p.N ? rows[r] + R * p.row_words : rows[r];
  }
  for (int64_t m = 0; m < p.M; ++m) {
    const float* ab = job.Ablocks + m * p.K;
    const float* asum = job.Asums + m * groups_per_row;
    v8f total[R] = {};
    float offset[R] = {};
    int64_t block = 0;
    for (int64_t gi = 0; gi < groups_per_row; ++gi) {
      v8f acc[R][2] = {};  // two chains per row (even and odd codes of a word): FMA latency, not throughput, bounds one
      for (int64_t line = 0; line < group_bytes; line += 64) {  // a cache line at a time, not once per block
        for (int r = 0; r < R; ++r) __builtin_prefetch(reinterpret_cast<const char*>(ahead[r] + block * 8) + line);
      }
      for (int64_t b = 0; b < blocks_per_group; ++b, ++block) {
        v8i words[R];
        for (int r = 0; r < R; ++r) words[r] = load_words(rows[r] + block * 8);
        const float* a = ab + block * kBlock;
        for (int j = 0; j < PER; ++j) {
          const v8f av = load8(a + j * 8);
          for (int r = 0; r < R; ++r) {
            v8i code;
            if constexpr (prefix_form(BITS, PER)) {
              code = j + 1 == PER ? words[r] : words[r] & ((1 << (BITS * (j + 1))) - 1);
            } else {
              code = (words[r] >> (BITS * j)) & ((1 << BITS) - 1);
            }
            acc[r][j & 1] += __builtin_convertvector(code, v8f) * av;
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t g = (n0 + r) * groups_per_row + gi;
        total[r] += scale[g] * (acc[r][0] + acc[r][1]);
        offset[r] += scale[g] * zero[g] * asum[gi];
      }
    }
    for (int r = 0; r < R; ++r) {
      const float dot = hsum(total[r]);
      job.Y[m * p.N + n0 + r] = dot - offset[r];
    }
  }
}

// fp16 / bf16 compute dtypes (META): the factorized sum would skip hqq's two roundings of each weight, so the same
// blocks are dequantized instead, in registers, and multiplied with A permuted alike; no buffer, no pass over
// memory of their own. Codes of at most 4 bits take a group's few possible weights from a table: dequant of the
// codes 0..15 on 8 lanes (the reference's roundings) once per group, then one shuffle per 8 codes, where rounding
// every weight costs four conversions. 4-bit layers whose kernel keeps those weights (Problem::weight_tables)
// take table_rows instead, which skips the per-call build, half of this path's time.
template <typename Word, int BITS, int PER, DType META, int R>
inline void exact_rows(const FastJob& job, int64_t n0) {
  const Problem& p = *job.p;
  constexpr int kBlock = 8 * PER;
  const int64_t groups_per_row = p.K / p.group_size;
  const int64_t blocks_per_group = p.group_size / kBlock;
  const Word* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = static_cast<const Word*>(p.W) + (n0 + r) * p.row_words;
  for (int64_t m = 0; m < p.M; ++m) {
    const float* ab = job.Ablocks + m * p.K;
    v8f acc[R][2] = {};
    int64_t block = 0;
    for (int64_t gi = 0; gi < groups_per_row; ++gi) {
      float zero[R], scale[R];
      v8f low[R], high[R];  // BITS <= 4: the weights of codes 0..7 and 8..15
      for (int r = 0; r < R; ++r) {
        zero[r] = load_meta<META>(p.zero, (n0 + r) * groups_per_row + gi);
        scale[r] = load_meta<META>(p.scale, (n0 + r) * groups_per_row + gi);
        if constexpr (BITS <= 4) {
          low[r] = dequant<META, false>(v8f{0, 1, 2, 3, 4, 5, 6, 7}, zero[r], scale[r]);
          high[r] = dequant<META, false>(v8f{8, 9, 10, 11, 12, 13, 14, 15}, zero[r], scale[r]);
        }
      }
      for (int64_t b = 0; b < blocks_per_group; ++b, ++block) {
        v8i words[R];
        for (int r = 0; r < R; ++r) words[r] = load_words(rows[r] + block * 8);
        const float* a = ab + block * kBlock;
        for (int j = 0; j < PER; ++j) {
          const v8f av = load8(a + j * 8);
          for (int r = 0; r < R; ++r) {
            const v8i code = (words[r] >> (BITS * j)) & ((1 << BITS) - 1);
            v8f weight;
            if constexpr (BITS == 4) {
              weight = __builtin_shuffle(low[r], high[r], code);
            } else if constexpr (BITS < 4) {
              weight = __builtin_shuffle(low[r], code);
            } else {
              weight = dequant<META, false>(__builtin_convertvector(code, v8f), zero[r], scale[r]);
            }
            acc[r][j & 1] += weight * av;
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) job.Y[m * p.N + n0 + r] = hsum(acc[r][0] + acc[r][1]);
  }
}

// 4-bit codes of fp16 / bf16 layers with weight tables (Problem::weight_tables; AVX2): vpshufb looks up 32 codes
// per instruction in a group's table of its weights' low bytes and in the one of their high bytes, where exact_rows'
// float shuffle takes 8 and first builds the group's table. A chunk is 32 bytes of a row (64 codes); its weights
// come out 8 at a time in table_order's order, and A is permuted alike (fast_gemv).
constexpr int64_t kTableChunk = kWeightTableGroup;

bool table_applies(const Problem& p) {
#ifdef __AVX2__
  return p.weight_tables != nullptr;
#else
  return false;
#endif
}

// Offset in its chunk of the i-th weight table_rows multiplies. The low nibbles (even k) come first, then the high
// ones; within each, vector v of 8 holds the codes of bytes e that vpunpck{l,h}bw and the widening leave in it.
template <DType META>
constexpr int64_t table_order(int64_t i) {
  const int64_t odd = i / 32, v = (i % 32) / 8, t = i % 8;
  const int64_t e = META == DType::F16 ? 8 * (v / 2) + 16 * (v % 2) + t                   // vcvtph2ps: 8 in order
                                       : 8 * (v / 2) + 4 * (v % 2) + (t < 4 ? t : 12 + t);  // vpunpck{l,h}wd: 4 + 4
  return 2 * e + odd;
}

#ifdef __AVX2__
// The 8 fp32 weights of 8 halves (lane 0 of the pair) and of the next 8 (lane 1), in table_order's order.
template <DType META>
inline void widen(__m256i halves, __m256& first, __m256& second) {
  if constexpr (META == DType::F16) {
    first = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
    second = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
  } else {  // bf16 bits are the high half of fp32's
    first = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), halves));
    second = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), halves));
  }
}

// 32 codes of one nibble of a chunk, looked up and multiplied with their 32 values of A (a).
template <DType META>
inline void table_chunk(__m256i low_bytes, __m256i high_bytes, __m256i codes, const float* a, __m256& acc0,
                        __m256& acc1) {
  const __m256i low = _mm256_shuffle_epi8(low_bytes, codes), high = _mm256_shuffle_epi8(high_bytes, codes);
  __m256 w[4];
  widen<META>(_mm256_unpacklo_epi8(low, high), w[0], w[1]);
  widen<META>(_mm256_unpackhi_epi8(low, high), w[2], w[3]);
  acc0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(a), acc0);
  acc1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(a + 8), acc1);
  acc0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(a + 16), acc0);
  acc1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(a + 24), acc1);
}

template <DType META>
inline void table_rows(const FastJob& job, int64_t n) {
  const Problem& p = *job.p;
  const int64_t groups_per_row = p.K / p.group_size;
  const int64_t chunks_per_group = p.group_size / kTableChunk;
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const uint8_t* row = static_cast<const uint8_t*>(p.W) + n * p.row_words;
  const uint8_t* tables = p.weight_tables + n * groups_per_row * 32;
  for (int64_t m = 0; m < p.M; ++m) {
    const float* a = job.Ablocks + m * p.K;
    const uint8_t* bytes = row;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t gi = 0; gi < groups_per_row; ++gi) {
      const __m256i low = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tables + gi * 32)));
      const __m256i high = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tables + gi * 32 + 16)));
      for (int64_t c = 0; c < chunks_per_group; ++c, a += kTableChunk, bytes += 32) {
        const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
        table_chunk<META>(low, high, _mm256_and_si256(codes, nibble), a, acc[0], acc[1]);
        table_chunk<META>(low, high, _mm256_and_si256(_mm256_srli_epi16(codes, 4), nibble), a + 32, acc[2], acc[3]);
      }
    }
    v8f sum;
    const __m256 total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    std::memcpy(&sum, &total, sizeof(sum));
    job.Y[m * p.N + n] = hsum(sum);
  }
}

// W[n, k0 .. k0+len] of a layer with weight tables, for the GEMM: 8 codes at a time (4 bytes; k0, len and the
// group boundaries are multiples of 8) looked up in their group's tables and widened, where dequant_segment
// computes hqq's two roundings per weight (that made a 3072 x 576 layer's 128-row GEMM 1.12-1.17x slower than
// without dequantization, fp32 meta 1.03-1.08x; SmolLM2's float16 prefill is 1.01-1.03x faster this way, the same
// logits).
template <DType META>
void table_segment(const Problem& p, int64_t n, int64_t k0, int64_t len, float* out) {
  const __m128i nibble = _mm_set1_epi8(0x0f);
  const uint8_t* row = static_cast<const uint8_t*>(p.W) + n * p.row_words;
  const uint8_t* tables = p.weight_tables + n * (p.K / p.group_size) * 32;
  for (int64_t k = k0; k < k0 + len;) {
    const uint8_t* table = tables + k / p.group_size * 32;
    const __m128i low_bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table));
    const __m128i high_bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table + 16));
    for (const int64_t end = min64(k0 + len, (k / p.group_size + 1) * p.group_size); k < end; k += 8, out += 8) {
      uint32_t word;
      std::memcpy(&word, row + k / 2, sizeof(word));
      const __m128i bytes = _mm_cvtsi32_si128(static_cast<int>(word));
      const __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(bytes, nibble), _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
      const __m128i halves = _mm_unpacklo_epi8(_mm_shuffle_epi8(low_bytes, codes), _mm_shuffle_epi8(high_bytes, codes));
      if constexpr (META == DType::F16) {
        _mm256_storeu_ps(out, _mm256_cvtph_ps(halves));
      } else {  // bf16 bits are the high half of fp32's
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
      }
    }
  }
}

template <DType META>
void table_task(void* data, size_t task) {
  const FastJob& job = *static_cast<const FastJob*>(data);
  const int64_t end = min64(job.p->N, static_cast<int64_t>(task + 1) * kGemvRows);
  for (int64_t n = static_cast<int64_t>(task) * kGemvRows; n < end; ++n) table_rows<META>(job, n);
}
#endif

template <int BITS, DType META>
void fast_task(void* data, size_t task) {
  constexpr int kPer = codes_per_word(BITS);
  const FastJob& job = *static_cast<const FastJob*>(data);
  const int64_t end = min64(job.p->N, static_cast<int64_t>(task + 1) * kGemvRows);
  int64_t n = static_cast<int64_t>(task) * kGemvRows;
  if constexpr (META == DType::F32) {
    for (; n + kFastRows <= end; n += kFastRows) fast_rows<WordOf<BITS>, BITS, kPer, kFastRows>(job, n);
    for (; n < end; ++n) fast_rows<WordOf<BITS>, BITS, kPer, 1>(job, n);
  } else {
    for (; n + kFastRows <= end; n += kFastRows) exact_rows<WordOf<BITS>, BITS, kPer, META, kFastRows>(job, n);
    for (; n < end; ++n) exact_rows<WordOf<BITS>, BITS, kPer, META, 1>(job, n);
  }
}

// The block paths apply: the factorized one for the fp32 compute dtype, dequantization in registers for fp16 /
// bf16 (table_rows with weight tables, else exact_rows). fp16 activations keep the dequantize-then-dot path.
bool fast_applies(const Problem& p) {
  const int64_t block = 8 * codes_per_word(p.bits);
  return p.M < 4 && p.axis == 1 && p.act == DType::F32 && p.K % p.group_size == 0 && p.group_size % block == 0;
}

template <DType META>
void (*pick_fast_meta(int bits))(void*, size_t) {
  switch (bits) {
    case 1:
      return &fast_task<1, META>;
    case 2:
      return &fast_task<2, META>;
    case 3:
      return &fast_task<3, META>;
    case 4:
      return &fast_task<4, META>;
    default:
      return &fast_task<8, META>;
  }
}

void (*pick_fast(const Problem& p))(void*, size_t) {
#ifdef __AVX2__
  if (table_applies(p)) return p.meta == DType::F16 ? &table_task<DType::F16> : &table_task<DType::BF16>;
#endif
  switch (p.meta) {
    case DType::F16:
      return pick_fast_meta<DType::F16>(p.bits);
    case DType::BF16:
      return pick_fast_meta<DType::BF16>(p.bits);
    default:
      return pick_fast_meta<DType::F32>(p.bits);
  }
}

// Y += bias (fp32 paths).
void add_bias(const Problem& p, float* Y) {
  const float* bias = static_cast<const float*>(p.bias);
  if (bias == nullptr) return;
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t n = 0; n < p.N; ++n) Y[m * p.N + n] += bias[n];
  }
}

bool fast_gemv(const Problem& p, const Runner& runner) {
  const int per = static_cast<int>(codes_per_word(p.bits));
  const int64_t block = 8 * per;
  const int64_t groups_per_row = p.K / p.group_size;
  float* ablocks = static_cast<float*>(std::malloc(static_cast<size_t>(p.M * p.K) * sizeof(float)));
  float* asums = static_cast<float*>(std::malloc(static_cast<size_t>(p.M * groups_per_row) * sizeof(float)));
  if (ablocks == nullptr || asums == nullptr) {
    std::free(ablocks);
    std::free(asums);
    return false;
  }
  const float* A = static_cast<const float*>(p.A);
  const bool prefix = p.meta == DType::F32 && prefix_form(p.bits, per);  // exact_rows reads A as it is
  // prefix form (per <= 8): 2^(-bits j), exact powers of two; a multiply by one is exactly ldexp's result, where
  // a call to std::ldexp per value cost more than the whole product on SmolLM2's layers
  float weight[9] = {1.f};
  for (int j = 1; prefix && j <= per; ++j) weight[j] = weight[j - 1] / static_cast<float>(1 << p.bits);
  const bool table = table_applies(p);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* a = A + m * p.K;
    float* out = ablocks + m * p.K;
    for (int64_t c0 = 0; table && c0 < p.K; c0 += kTableChunk) {
      for (int64_t i = 0; i < kTableChunk; ++i) {
        out[c0 + i] = a[c0 + (p.meta == DType::F16 ? table_order<DType::F16>(i) : table_order<DType::BF16>(i))];
      }
    }
    for (int64_t b0 = 0; !table && b0 < p.K; b0 += block) {
      for (int i = 0; i < 8; ++i) {
        const float* word = a + b0 + i * per;  // the A values of word i's codes
        for (int j = 0; j < per; ++j) {
          float value = word[j];
          if (prefix) {  // a'_{j+1}: powers of two scale exactly, the difference rounds once
            const float next = j + 1 < per ? word[j + 1] * weight[j + 1] : 0.f;
            value = word[j] * weight[j] - next;
          }
          out[b0 + j * 8 + i] = value;
        }
      }
    }
    if (p.meta == DType::F32) group_sums(p, a, asums + m * groups_per_row);  // the factorized sum's zero term
  }
  FastJob job{&p, ablocks, asums, static_cast<float*>(p.Y)};
  runner.parallel_for(runner.ctx, pick_fast(p), static_cast<size_t>((p.N + kGemvRows - 1) / kGemvRows), &job);
  add_bias(p, job.Y);
  std::free(ablocks);
  std::free(asums);
  return true;
}

// ---- int8 GEMV (accuracy_level 4: M < 4, fp32 compute and activations, axis 1, 2- or 4-bit uint8 words; AVX2) ----
//
// MatMulNBits' accuracy level 4 allows int8 activations, and so does this path. Each block of 4 PER inputs of A
// (8 at 4 bits, 16 at 2: one int32 lane's, quantize_row) is quantized symmetrically (a_b = max |A| / 127,
// qa = round(A / a_b)); per group of W
//
//     sum_k A[k] (q[k] - z) s  ~  s * sum_b a_b * (sum_{k in b} qa[k] q[k])  -  s * z * (sum_k A[k])
//
// the inner sums in integers and the zero term with A's fp32 group sums, so only the rounding of A to int8 is lost
// (HQQ's fractional zeros cost nothing here). A chunk is 32 bytes of a row of W, 32 * PER codes: vpmaddubsw
// multiplies the unsigned codes of one shift (bytes masked to BITS bits) with int8 A permuted into the same
// order and adds pairs into int16 (at most 2 * PER * 15 * 127, no saturation), vpmaddwd adds pairs of those into
// int32. Lane l of that vector holds the chunk's bytes 4l .. 4l+3, 4 PER codes: one block of A, and a
// group of g codes g / (4 PER) lanes: one group spans whole chunks (g a multiple of 32 * PER), or a chunk holds
// two groups (g = 16 * PER, GroupSpan::kHalfChunk), its lanes 0-3 in the first.
#ifdef __AVX2__
constexpr int64_t int8_chunk(int bits) { return 32 * (8 / bits); }
constexpr int64_t kInt8Ahead = 4;  // rows between a row of W and the one whose codes it prefetches

struct Int8Job {
  const Problem* p;
  const int8_t* Aq;      // [M, K] A in int8, per chunk PER runs of 32: Aq[chunk][j][i] = qa[32 PER chunk + PER i + j]
  const float* Ascales;  // [M, K / chunk, 8] the block scale a_b of each int32 lane
  const float* Asums;    // [M, K / g] fp32 group sums of A
  float* Y;              // [M, N]
};

// The int32 lane sums of qa * q over one 32-byte chunk of W.
template <int BITS>
inline __m256i chunk_dot(const uint8_t* w, const __m256i* a) {
  constexpr int kPer = 8 / BITS;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  __m256i pairs = _mm256_maddubs_epi16(_mm256_and_si256(words, mask), a[0]);
  for (int j = 1; j < kPer; ++j) {
    const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(words, BITS * j), mask);
    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(codes, a[j]));
  }
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// Chunk c of a row of A in int8 (Int8Job::Aq's order): PER vectors of 32, one per shift of the codes.
template <int PER>
inline void load_chunk_of_a(const int8_t* aq, int64_t c, __m256i (&a)[PER]) {
  for (int j = 0; j < PER; ++j) a[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq + (c * PER + j) * 32));
}

// chunk_dot's int32 lane sums as floats.
template <int BITS>
inline v8f lane_sums(const uint8_t* w, const __m256i* a) {
  return __builtin_convertvector(reinterpret_cast<v8i>(chunk_dot<BITS>(w, a)), v8f);
}

// How a row's groups of W lie over its 32-byte chunks: two groups per chunk (g = 16 * PER), one group per
// chunk, or several chunks per group. A template argument, so the common cases run one straight loop over chunks.
enum class GroupSpan { kHalfChunk, kChunk, kChunks };

// R = 2 adjacent rows of W per pass (a task's odd last row alone): each load of A serves both and their sums are
// independent chains, yet a thread still reads W nearly as one stream. Four rows per pass interleave four streams,
// which the hardware prefetcher follows worse (a 576 x 1536 layer streaming from memory, one thread: 63 us against
// 46 us for one row per pass); two rows per pass, with the straight loop for g = one chunk, took SmolLM2's layers
// (K = 576, one decode row, onnxruntime's two threads) from 1.1-1.3x MLAS's MatMulNBits time to 0.98-1.0x.
template <int BITS, GroupSpan SPAN, int R>
inline void int8_rows(const Int8Job& job, int64_t n) {
  constexpr int kPer = 8 / BITS;
  constexpr int64_t kChunk = int8_chunk(BITS);
  const Problem& p = *job.p;
  const int64_t chunks = p.K / kChunk;
  const int64_t groups_per_row = p.K / p.group_size;
  const int64_t chunks_per_group = SPAN == GroupSpan::kChunks ? p.group_size / kChunk : 1;
  const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const float* scale[R];
  const float* zero[R];
  const uint8_t* row[R];
  for (int r = 0; r < R; ++r) {
    scale[r] = static_cast<const float*>(p.scale) + (n + r) * groups_per_row;
    zero[r] = static_cast<const float*>(p.zero) + (n + r) * groups_per_row;
    row[r] = static_cast<const uint8_t*>(p.W) + (n + r) * p.row_words;
  }
  // later rows, prefetched a cache line (two chunks) at a time
  const uint8_t* ahead = n + R + kInt8Ahead <= p.N ? row[0] + kInt8Ahead * p.row_words : row[0];
  for (int64_t m = 0; m < p.M; ++m) {
    const int8_t* aq = job.Aq + m * p.K;
    const float* ascale = job.Ascales + m * chunks * 8;
    const float* asum = job.Asums + m * groups_per_row;
    v8f total[R] = {};
    if constexpr (SPAN == GroupSpan::kChunks) {
      for (int64_t group = 0, c0 = 0; c0 < chunks; ++group, c0 += chunks_per_group) {
        v8f acc[R] = {};
        for (int64_t c = c0; c < c0 + chunks_per_group; ++c) {
          __m256i a[kPer];
          load_chunk_of_a<kPer>(aq, c, a);
          const v8f block_scale = load8(ascale + c * 8);
          for (int r = 0; r < R; ++r) {
            if (c % 2 == 0) __builtin_prefetch(ahead + r * p.row_words + c * 32);
            acc[r] += lane_sums<BITS>(row[r] + c * 32, a) * block_scale;
          }
        }
        for (int r = 0; r < R; ++r) total[r] += scale[r][group] * acc[r];
      }
    } else {  // one straight loop: a chunk's scales are its block scales of A times one or two group scales of W
      for (int64_t c = 0; c < chunks; ++c) {
        __m256i a[kPer];
        load_chunk_of_a<kPer>(aq, c, a);
        const v8f block_scale = load8(ascale + c * 8);
        for (int r = 0; r < R; ++r) {
          if (c % 2 == 0) __builtin_prefetch(ahead + r * p.row_words + c * 32);
          v8f group_scale;
          if constexpr (SPAN == GroupSpan::kHalfChunk) {  // lanes 0-3 in group 2c, 4-7 in group 2c + 1: the pair, spread
            const __m128 pair = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scale[r] + 2 * c)));
            group_scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(pair), spread);
          } else {
            group_scale = v8f{} + scale[r][c];
          }
          total[r] += lane_sums<BITS>(row[r] + c * 32, a) * (block_scale * group_scale);
        }
      }
    }
    for (int r = 0; r < R; ++r) {  // minus the zero term, s * z * (sum of A) over the row's groups, 8 at a time
      int64_t gi = 0;
      for (; gi + 8 <= groups_per_row; gi += 8) total[r] -= load8(scale[r] + gi) * load8(zero[r] + gi) * load8(asum + gi);
      float offset = 0.f;
      for (; gi < groups_per_row; ++gi) offset += scale[r][gi] * zero[r][gi] * asum[gi];
      job.Y[m * p.N + n + r] = hsum(total[r]) - offset;
    }
  }
}

template <int BITS, GroupSpan SPAN>
void int8_task(void* data, size_t task) {
  const Int8Job& job = *static_cast<const Int8Job*>(data);
  const int64_t end = min64(job.p->N, static_cast<int64_t>(task + 1) * kGemvRows);
  int64_t n = static_cast<int64_t>(task) * kGemvRows;
  for (; n + 2 <= end; n += 2) int8_rows<BITS, SPAN, 2>(job, n);
  for (; n < end; ++n) int8_rows<BITS, SPAN, 1>(job, n);
}

template <int BITS>
auto int8_task_for(GroupSpan span) -> void (*)(void*, size_t) {
  switch (span) {
    case GroupSpan::kHalfChunk: return &int8_task<BITS, GroupSpan::kHalfChunk>;
    case GroupSpan::kChunk: return &int8_task<BITS, GroupSpan::kChunk>;
    default: return &int8_task<BITS, GroupSpan::kChunks>;
  }
}

bool int8_applies(const Problem& p) {
  if (p.accuracy_level != 4 || p.M >= 4 || p.axis != 1 || p.meta != DType::F32 || p.act != DType::F32) return false;
  if (p.bits != 2 && p.bits != 4) return false;
  const int64_t chunk = int8_chunk(p.bits);
  return p.K % chunk == 0 && (p.group_size % chunk == 0 || 2 * p.group_size == chunk);
}

// One row of A for the int8 path: per block of an int32 lane's 4 PER inputs a = max |x| / 127 and codes
// round(x / a), stored per chunk in the codes' order (Int8Job::Aq), and each lane's block scale (Int8Job::Ascales).
// A block per lane, not MatMulNBits' 32 inputs, costs the products nothing (each lane reads its own scale either
// way); at 4 bits (8 inputs) it took 1 - cosine of SmolLM2's decode logits against the exact model (validate, an
// --accuracy-level 4 export) from 2.3e-4 at 16 inputs (3.2e-4 at 32) to 1.5e-4. PER is a constant so that the
// permutation costs shifts, not divisions.
template <int PER>
void quantize_row(const float* a, int64_t K, int8_t* aq, float* ascales) {
  constexpr int64_t kChunk = 32 * PER;
  constexpr int64_t kQuantBlock = 4 * PER;
  for (int64_t c = 0; c < K / kChunk; ++c) {
    const float* x = a + c * kChunk;
    int8_t* out = aq + c * kChunk;
    constexpr int kBlocks = static_cast<int>(kChunk / kQuantBlock);
    float block_scales[kBlocks];
    for (int b = 0; b < kBlocks; ++b) {
      const float* xb = x + b * kQuantBlock;
      float amax = 0.f;
      for (int64_t k = 0; k < kQuantBlock; ++k) amax = std::max(amax, std::fabs(xb[k]));
      block_scales[b] = amax / 127.f;
      const float inverse = amax > 0.f ? 127.f / amax : 0.f;
      for (int k = 0; k < kQuantBlock; ++k) {
        const int t = b * static_cast<int>(kQuantBlock) + k;  // code t of the chunk: byte t / PER, shift t % PER
        out[(t % PER) * 32 + t / PER] = static_cast<int8_t>(std::nearbyint(xb[k] * inverse));
      }
    }
    for (int l = 0; l < 8; ++l) ascales[c * 8 + l] = block_scales[l];
  }
}

bool int8_gemv(const Problem& p, const Runner& runner) {
  const int64_t chunks = p.K / int8_chunk(p.bits), groups_per_row = p.K / p.group_size;
  int8_t* aq = static_cast<int8_t*>(std::malloc(static_cast<size_t>(p.M * p.K)));
  float* ascales = static_cast<float*>(std::malloc(static_cast<size_t>(p.M * chunks * 8) * sizeof(float)));
  float* asums = static_cast<float*>(std::malloc(static_cast<size_t>(p.M * groups_per_row) * sizeof(float)));
  if (aq == nullptr || ascales == nullptr || asums == nullptr) {
    std::free(aq);
    std::free(ascales);
    std::free(asums);
    return false;
  }
  const float* A = static_cast<const float*>(p.A);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* a = A + m * p.K;
    if (p.bits == 4) {
      quantize_row<2>(a, p.K, aq + m * p.K, ascales + m * chunks * 8);
    } else {
      quantize_row<4>(a, p.K, aq + m * p.K, ascales + m * chunks * 8);
    }
    group_sums(p, a, asums + m * groups_per_row);
  }
  const int64_t chunk = int8_chunk(p.bits);
  Int8Job job{&p, aq, ascales, asums, static_cast<float*>(p.Y)};
  const GroupSpan span = 2 * p.group_size == chunk ? GroupSpan::kHalfChunk : p.group_size == chunk ? GroupSpan::kChunk : GroupSpan::kChunks;
  void (*task)(void*, size_t) = p.bits == 4 ? int8_task_for<4>(span) : int8_task_for<2>(span);
  runner.parallel_for(runner.ctx, task, static_cast<size_t>((p.N + kGemvRows - 1) / kGemvRows), &job);
  add_bias(p, job.Y);
  std::free(aq);
  std::free(ascales);
  std::free(asums);
  return true;
}
#else
bool int8_applies(const Problem&) { return false; }
bool int8_gemv(const Problem&, const Runner&) { return false; }
#endif

// HQQMatMulNBits whose zeros were not computed when the kernel was created (inputs that are not initializers):
// compute them for this call, then run it as HQQMatMul.
bool with_zeros(const Problem& p, const Runner& runner) {
  float* zeros = static_cast<float*>(std::malloc(static_cast<size_t>(p.groups) * sizeof(float)));
  if (zeros == nullptr) return false;
  nbits_zeros(p, zeros);
  Problem q = p;
  q.zero = zeros;
  q.zero_points = nullptr;
  q.correction = nullptr;
  const bool ok = matmul(q, runner);
  std::free(zeros);
  return ok;
}

// ---- LoRA (HQQMatMulNBitsLoRA): Y[:, columns of s] += (A @ lora_A_s^T) @ lora_B_s^T, fp32 arithmetic ----
//
// Two products with a rank-sized middle: T = A @ lora_A^T [M, segments * rank], then each lora_B row (one output
// column) dotted with its segment's part of T. Below 4 rows of A both are dot products over contiguous rows (the
// factors are stored [out, in] like W for that reason); from 4 rows on both run as the panel GEMM above, its
// "dequantization" a copy of the factors' rows (widened to fp32 when they are fp16: half the bytes to read).

constexpr int64_t kLoraRowsA = 16;  // rows of lora_A per task (M < 4)
constexpr int64_t kLoraRowsB = 64;  // rows of lora_B per task (M < 4)
// Below this many multiply-adds (M < 4) both products run on the calling thread: two dispatches to onnxruntime's
// pool cost more than the work (rank 16 on q/k/v is about 43 thousand).
constexpr int64_t kLoraSerialWork = int64_t{1} << 17;

// W[n, k0 .. k0+len] of an fp32, fp16 or bf16 matrix [N, K] held in p.W, as floats.
template <typename F>
void copy_segment(const Problem& p, int64_t n, int64_t k0, int64_t len, float* out) {
  const F* row = static_cast<const F*>(p.W) + n * p.K + k0;
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) store8(out + k, load8(row + k));
  for (; k < len; ++k) out[k] = static_cast<float>(row[k]);
}

// Lane i: the sum of v[i]'s lanes, in hsum's order: eight horizontal sums for the price of about two.
inline v8f hsum8(const v8f (&v)[8]) {
  const v8i even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
  const v8i low = {0, 1, 8, 9, 4, 5, 12, 13}, high = {2, 3, 10, 11, 6, 7, 14, 15};
  const v8i first = {0, 1, 2, 3, 8, 9, 10, 11}, second = {4, 5, 6, 7, 12, 13, 14, 15};
  v8f pairs[4], quads[2];
  for (int i = 0; i < 4; ++i) pairs[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], even) + __builtin_shuffle(v[2 * i], v[2 * i + 1], odd);
  for (int i = 0; i < 2; ++i) quads[i] = __builtin_shuffle(pairs[2 * i], pairs[2 * i + 1], low) + __builtin_shuffle(pairs[2 * i], pairs[2 * i + 1], high);
  return __builtin_shuffle(quads[0], quads[1], first) + __builtin_shuffle(quads[0], quads[1], second);
}

// Lane i: t . b[i * r .. (i + 1) * r), eight consecutive rows of a [rows, r] factor (r >= 8).
template <typename F>
inline v8f dot8(const float* t, const F* b, int64_t r) {
  v8f acc[8] = {};
  int64_t j = 0;
  for (; j + 8 <= r; j += 8) {
    const v8f tj = load8(t + j);
    for (int i = 0; i < 8; ++i) acc[i] += tj * load8(b + i * r + j);
  }
  v8f sums = hsum8(acc);
  for (; j < r; ++j) {
    // explicit fused multiply-adds, as dot's tail: the same sums for fp32 and fp16 factors whatever GCC vectorizes
    for (int i = 0; i < 8; ++i) sums[i] = __builtin_fmaf(t[j], static_cast<float>(b[i * r + j]), sums[i]);
  }
  return sums;
}

struct LoraJob {
  const Problem* p;
  float* T;  // [M, segments * rank]
};

template <typename F>
void lora_a_task(void* data, size_t task) {
  const LoraJob& job = *static_cast<const LoraJob*>(data);
  const Problem& p = *job.p;
  const int64_t R = p.lora_segments * p.lora_rank;
  const float* A = static_cast<const float*>(p.A);
  const int64_t end = min64(R, static_cast<int64_t>(task + 1) * kLoraRowsA);
  for (int64_t j = static_cast<int64_t>(task) * kLoraRowsA; j < end; ++j) {
    for (int64_t m = 0; m < p.M; ++m) job.T[m * R + j] = dot(A + m * p.K, static_cast<const F*>(p.lora_A) + j * p.K, p.K);
  }
}

template <typename F>
void lora_b_task(void* data, size_t task) {
  const LoraJob& job = *static_cast<const LoraJob*>(data);
  const Problem& p = *job.p;
  const int64_t r = p.lora_rank, R = p.lora_segments * r;
  float* Y = static_cast<float*>(p.Y);
  int64_t c = static_cast<int64_t>(task) * kLoraRowsB;
  const int64_t end = c + kLoraRowsB;
  int64_t first = 0;  // lora_B row of segment s's first column
  for (int64_t s = 0; s < p.lora_segments && c < end; ++s) {
    const int64_t start = p.lora_columns[2 * s], width = p.lora_columns[2 * s + 1] - start;
    while (c < end && c < first + width) {
      const int64_t n = start + c - first;
      const F* rows = static_cast<const F*>(p.lora_B) + c * r;
      if (r >= 8 && min64(end, first + width) - c >= 8) {  // eight output columns at once
        for (int64_t m = 0; m < p.M; ++m) store8(Y + m * p.N + n, load8(Y + m * p.N + n) + dot8(job.T + m * R + s * r, rows, r));
        c += 8;
      } else {
        for (int64_t m = 0; m < p.M; ++m) Y[m * p.N + n] += dot(job.T + m * R + s * r, rows, r);
        ++c;
      }
    }
    first += width;
  }
}

// From 4 rows of A: T by the panel GEMM, then per segment T_s @ lora_B_s^T into a scratch block added to Y.
template <typename F>
bool lora_gemm(const Problem& p, float* T, const Runner& runner) {
  const int64_t r = p.lora_rank, R = p.lora_segments * r;
  Problem lora_a = p;
  lora_a.N = R;
  lora_a.W = p.lora_A;
  if (!gemm(lora_a, &copy_segment<F>, static_cast<const float*>(p.A), T, runner)) return false;
  int64_t widest = 0;
  for (int64_t s = 0; s < p.lora_segments; ++s) widest = std::max(widest, p.lora_columns[2 * s + 1] - p.lora_columns[2 * s]);
  float* ts = static_cast<float*>(std::malloc(static_cast<size_t>(p.M * r) * sizeof(float)));
  float* up = static_cast<float*>(std::malloc(static_cast<size_t>(p.M * widest) * sizeof(float)));
  bool ok = ts != nullptr && up != nullptr;
  float* Y = static_cast<float*>(p.Y);
  int64_t first = 0;
  for (int64_t s = 0; ok && s < p.lora_segments; ++s) {
    const int64_t start = p.lora_columns[2 * s], width = p.lora_columns[2 * s + 1] - start;
    for (int64_t m = 0; m < p.M; ++m) std::memcpy(ts + m * r, T + m * R + s * r, static_cast<size_t>(r) * sizeof(float));
    Problem lora_b = p;
    lora_b.N = width;
    lora_b.K = r;
    lora_b.W = static_cast<const F*>(p.lora_B) + first * r;
    ok = gemm(lora_b, &copy_segment<F>, ts, up, runner);
    for (int64_t m = 0; ok && m < p.M; ++m) {
      for (int64_t j = 0; j < width; ++j) Y[m * p.N + start + j] += up[m * width + j];
    }
    first += width;
  }
  std::free(ts);
  std::free(up);
  return ok;
}

// lora_add for factors of C++ type F.
template <typename F>
bool lora_add_as(const Problem& p, const Runner& runner) {
  const int64_t R = p.lora_segments * p.lora_rank;
  if (R == 0 || p.M == 0) return true;
  float* T = static_cast<float*>(std::malloc(static_cast<size_t>(p.M * R) * sizeof(float)));
  if (T == nullptr) return false;
  LoraJob job{&p, T};
  bool ok = true;
  if (p.M < 4) {
    int64_t columns = 0;
    for (int64_t s = 0; s < p.lora_segments; ++s) columns += p.lora_columns[2 * s + 1] - p.lora_columns[2 * s];
    const bool serial = (R * p.K + columns * p.lora_rank) * p.M < kLoraSerialWork;
    const auto run = serial ? &serial_for : runner.parallel_for;
    run(runner.ctx, &lora_a_task<F>, static_cast<size_t>((R + kLoraRowsA - 1) / kLoraRowsA), &job);
    run(runner.ctx, &lora_b_task<F>, static_cast<size_t>((columns + kLoraRowsB - 1) / kLoraRowsB), &job);
  } else {
    ok = lora_gemm<F>(p, T, runner);
  }
  std::free(T);
  return ok;
}

// ---- HalfMatMul: Y = A @ float(W)^T for a plain float16 or bfloat16 matrix W [N, K] (an exact fp head) ----
//
// Widening either dtype to float is exact, so this is the fp32 MatMul of the widened matrix up to summation order,
// reading half its bytes. Below 4 rows of A: one row of W at a time, so that each thread streams its rows in
// order (eight rows per pass, as the LoRA product does, read SmolLM2's head at 15-20 GB/s against 19-26 here); from
// 4 rows on: the panel GEMM, its "dequantization" the widening copy.

constexpr int64_t kHalfRows = 64;  // rows of W per task (M < 4)

template <typename F>
void half_gemv_task(void* data, size_t task) {
  const Job& job = *static_cast<const Job*>(data);
  const Problem& p = *job.p;
  const F* W = static_cast<const F*>(p.W);
  const int64_t end = min64(p.N, static_cast<int64_t>(task + 1) * kHalfRows);
  for (int64_t n = static_cast<int64_t>(task) * kHalfRows; n < end; ++n) {
    for (int64_t m = 0; m < p.M; ++m) job.Y[m * p.N + n] = dot(job.A + m * p.K, W + n * p.K, p.K);
  }
}

template <typename F>
bool half_matmul_as(const Problem& p, const Runner& runner) {
  Job job{&p, &copy_segment<F>, static_cast<const float*>(p.A), static_cast<float*>(p.Y)};
  if (p.M >= 4) return gemm(p, job.segment, job.A, job.Y, runner);
  runner.parallel_for(runner.ctx, &half_gemv_task<F>, static_cast<size_t>((p.N + kHalfRows - 1) / kHalfRows), &job);
  return true;
}

// ---- SwiGLU epilogue (HQQMatMulNBits[LoRA]SwiGLU): Y = silu(gate) * up of the packed gate/up product ----

// e^x per lane to about 1 ulp, for |x| <= 88 (the caller clamps): x = n ln2 + r with |r| <= ln2 / 2, e^r by
// Cephes' degree-6 polynomial for expf, 2^n written into the exponent bits.
inline v8f exp8(v8f x) {
  const v8f fx = x * 1.44269504088896341f + 0.5f;
  v8f n = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8f);
  n = n > fx ? n - 1.f : n;  // floor: the conversion truncates toward zero
  const v8f r = x - n * 0.693359375f - n * -2.12194440e-4f;  // ln2 in two parts, so r keeps its low bits
  v8f poly = r * 1.9875691500e-4f + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const v8f er = poly * (r * r) + r + 1.f;
  const v8i exponent = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return er * scale;
}

// out[j] = silu(gate[j]) * up[j] for 8 lanes, silu(g) = g / (1 + e^-g) as torch computes it.
inline v8f swiglu8(v8f gate, v8f up) {
  const v8f limit = v8f{} + 88.f;
  v8f minus = -gate;
  minus = minus > limit ? limit : minus;
  minus = minus < -limit ? -limit : minus;  // e^-88 is below float's normal range: 1 + it rounds to 1
  return gate / (1.f + exp8(minus)) * up;
}

struct SwigluJob {
  const float* full;  // [M, 2 * half]: gate columns, then up columns
  float* out;         // [M, half]
  int64_t half;
};

void swiglu_row(void* data, size_t m) {
  const SwigluJob& job = *static_cast<const SwigluJob*>(data);
  const float* gate = job.full + static_cast<int64_t>(m) * 2 * job.half;
  const float* up = gate + job.half;
  float* out = job.out + static_cast<int64_t>(m) * job.half;
  int64_t j = 0;
  for (; j + 8 <= job.half; j += 8) store8(out + j, swiglu8(load8(gate + j), load8(up + j)));
  if (j < job.half) {  // the tail through the same lanes, so every column rounds alike
    float g[8] = {}, u[8] = {}, o[8];
    std::memcpy(g, gate + j, static_cast<size_t>(job.half - j) * sizeof(float));
    std::memcpy(u, up + j, static_cast<size_t>(job.half - j) * sizeof(float));
    store8(o, swiglu8(load8(g), load8(u)));
    std::memcpy(out + j, o, static_cast<size_t>(job.half - j) * sizeof(float));
  }
}

}  // namespace

bool matmul(const Problem& p, const Runner& runner) {
  if (p.correction != nullptr) return with_zeros(p, runner);
  if (int8_applies(p)) return int8_gemv(p, runner);
  if (fast_applies(p)) return fast_gemv(p, runner);
  const bool half = p.act == DType::F16;
  const size_t a_count = static_cast<size_t>(p.M * p.K);
  const size_t y_count = static_cast<size_t>(p.M * p.N);
  float* a_float = nullptr;
  float* y_float = nullptr;
  if (half) {
    a_float = static_cast<float*>(std::malloc(a_count * sizeof(float) + 1));
    y_float = static_cast<float*>(std::malloc(y_count * sizeof(float) + 1));
    if (a_float == nullptr || y_float == nullptr) {
      std::free(a_float);
      std::free(y_float);
      return false;
    }
    const _Float16* a16 = static_cast<const _Float16*>(p.A);
    for (size_t i = 0; i < a_count; ++i) a_float[i] = static_cast<float>(a16[i]);
  }
  Job job{&p, pick_segment(p), half ? a_float : static_cast<const float*>(p.A),
          half ? y_float : static_cast<float*>(p.Y)};
#ifdef __AVX2__
  if (table_applies(p)) job.segment = p.meta == DType::F16 ? &table_segment<DType::F16> : &table_segment<DType::BF16>;
#endif
  bool ok = true;
  if (p.M < 4) {
    runner.parallel_for(runner.ctx, &gemv_task, static_cast<size_t>((p.N + kGemvRows - 1) / kGemvRows), &job);
  } else if (word_order_applies(p)) {
    ok = gemm(p, pick_word_order_segment(p.bits), job.A, job.Y, runner, KOrder{static_cast<int>(codes_per_word(p.bits))});
  } else {
    ok = gemm(p, job.segment, job.A, job.Y, runner);
  }
  // Bias and the cast to A's dtype, as the reference: float accumulation, one rounding at the end.
  for (int64_t m = 0; m < p.M; ++m) {
    float* y = job.Y + m * p.N;
    if (p.bias != nullptr) {
      for (int64_t n = 0; n < p.N; ++n) y[n] += half ? load_meta<DType::F16>(p.bias, n) : load_meta<DType::F32>(p.bias, n);
    }
    if (half) {
      _Float16* out = static_cast<_Float16*>(p.Y) + m * p.N;
      for (int64_t n = 0; n < p.N; ++n) out[n] = static_cast<_Float16>(y[n]);
    }
  }
  std::free(a_float);
  std::free(y_float);
  return ok;
}

bool lora_add(const Problem& p, const Runner& runner) {
  return p.lora_dtype == DType::F16 ? lora_add_as<_Float16>(p, runner) : lora_add_as<float>(p, runner);
}

bool half_matmul(const Problem& p, const Runner& runner) {
  return p.half_dtype == DType::BF16 ? half_matmul_as<BFloat16>(p, runner) : half_matmul_as<_Float16>(p, runner);
}

void swiglu(const float* full, int64_t M, int64_t half, float* out, const Runner& runner) {
  SwigluJob job{full, out, half};
  const auto run = M < 4 ? &serial_for : runner.parallel_for;  // a decode row is a few microseconds
  run(runner.ctx, &swiglu_row, static_cast<size_t>(M), &job);
}

void dequantize(const Problem& p, float* out) {
  const SegmentFn segment = pick_segment(p);
  for (int64_t n = 0; n < p.N; ++n) segment(p, n, 0, p.K, out + n * p.K);
}

}  // namespace HQX_ISA
}  // namespace hqx
