// One hqexport::HQQMatMul call, described independently of onnxruntime (docs/kernels.md).
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef __CUDACC__
#define HQX_HOST_DEVICE __host__ __device__
#else
#define HQX_HOST_DEVICE
#endif

namespace hqx {

// ONNX TensorProto element types of the dtypes the op accepts.
enum class DType : int { F32 = 1, F16 = 10, BF16 = 16 };

struct Problem {
  int64_t M = 0;           // rows of A (product of A's leading dims)
  int64_t N = 0, K = 0;    // output / input features
  int64_t group_size = 0;  // HQQ group size g
  int64_t groups = 0;      // G = N * K / g
  int64_t row_words = 0;   // words per row of W (uint8, or uint32 for bits 3)
  int bits = 0;            // storage bits: 1, 2, 3, 4, 8
  int axis = 1;            // HQQ grouping axis
  DType act = DType::F32;  // dtype of A, bias and Y
  DType meta = DType::F32; // dtype of scale and zero: the layer's compute dtype
  const void* A = nullptr;
  const void* W = nullptr;
  const void* scale = nullptr;
  const void* zero = nullptr;
  const void* bias = nullptr;  // may be null
  void* Y = nullptr;
  // hqexport::HQQMatMulNBits (ops/nbits.py) instead of `zero`: W in MatMulNBits' layout (= the canonical one for
  // bits 2, 4, 8), integer zero points packed like MatMulNBits' (zp_row_bytes per row), and the correction
  // [K / group_size, N] = (zero_point - zero) * scale, all fp32 with axis 1.
  const uint8_t* zero_points = nullptr;
  const float* correction = nullptr;
  int64_t zp_row_bytes = 0;
  // MatMulNBits' accuracy_level of an HQQMatMulNBits node: 4 lets the kernel quantize A to int8 (cpu_kernel.cpp's
  // int8 GEMV); the other levels compute in fp32.
  int64_t accuracy_level = 0;
  // hqexport::HQQMatMulNBitsLoRA (ops/nbits.py): a LoRA branch added to Y, scaling folded into lora_B. Segment s
  // adds (A @ lora_A[s * rank : (s + 1) * rank]^T) @ lora_B[its rows]^T to the output columns [lora_columns[2 s],
  // lora_columns[2 s + 1]); lora_B's rows follow the segments in order. lora_rank 0 (an inactive adapter): nothing.
  // The factors are fp32, or fp16 (lora_dtype; convert --adapter-dtype fp16), widened to fp32 as they are read.
  const void* lora_A = nullptr;           // [lora_segments * lora_rank, K]
  const void* lora_B = nullptr;           // [sum of the segments' widths, lora_rank]
  DType lora_dtype = DType::F32;
  const int64_t* lora_columns = nullptr;  // [2 * lora_segments]
  int64_t lora_segments = 0, lora_rank = 0;
  // 4-bit codes of a float16 / bfloat16 layer (HQQMatMulNBits with compute_dtype, groups a multiple of
  // kWeightTableGroup, an AVX2 CPU): per group, the low bytes of the weights of codes 0..15 in that dtype, then their
  // high bytes (32 bytes), computed when the kernel is created (custom_op.cpp's weight_tables); else null.
  const uint8_t* weight_tables = nullptr;
  // hqexport::HalfMatMul (ops/half.py): W is a plain [N, K] matrix of this dtype (F16 or BF16), no codes.
  DType half_dtype = DType::F16;
};

// Group sizes whose 4-bit float16 / bfloat16 layers get weight tables: multiples of the 64 codes in the 32 bytes
// that cpu_kernel.cpp's table_rows reads at a time.
constexpr int64_t kWeightTableGroup = 64;

// W's words (formats/canonical.py's LAYOUTS, which tests/test_layout_record.py checks these against): bits 3 packs
// 10 codes in a uint32 word (bits 30-31 unused), bits 1, 2, 4 and 8 pack 8 / bits codes in a uint8 word. word_bytes
// is 0 for a width the layout does not have; codes_per_word is defined for the others only.
HQX_HOST_DEVICE constexpr int64_t word_bytes(int64_t bits) {
  return bits == 3 ? 4 : (bits == 1 || bits == 2 || bits == 4 || bits == 8) ? 1 : 0;
}
HQX_HOST_DEVICE constexpr int64_t codes_per_word(int64_t bits) { return 8 * word_bytes(bits) / bits; }

template <int64_t BYTES>
struct UnsignedOf;
template <>
struct UnsignedOf<1> {
  using type = uint8_t;
};
template <>
struct UnsignedOf<4> {
  using type = uint32_t;
};
// The C++ type of W's words for BITS-bit codes.
template <int BITS>
using WordOf = typename UnsignedOf<word_bytes(BITS)>::type;

// HQQMatMulNBits' zeros as HQQ's: z = zero_point - correction / scale per group ([N * K / group_size], fp32
// rounding; a zero scale makes the group's weights zero whatever z is), so that the HQQMatMul paths run it.
inline void nbits_zeros(const Problem& p, float* zeros) {
  const int64_t groups_per_row = p.K / p.group_size;
  const int64_t per = 8 / p.bits;
  const float* scale = static_cast<const float*>(p.scale);
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t gi = 0; gi < groups_per_row; ++gi) {
      const int64_t g = n * groups_per_row + gi;
      const uint8_t byte = p.zero_points[n * p.zp_row_bytes + gi / per];
      const float zero_point = static_cast<float>((byte >> (p.bits * (gi % per))) & ((1 << p.bits) - 1));
      zeros[g] = scale[g] == 0.f ? 0.f : zero_point - p.correction[gi * p.N + n] / scale[g];
    }
  }
}

// Runs fn(data, i) for i in [0, total), possibly in parallel (onnxruntime's intra-op pool, or a plain loop).
struct Runner {
  void* ctx;
  void (*parallel_for)(void* ctx, void (*fn)(void*, size_t), size_t total, void* data);
};

// Runner::parallel_for's signature, on the calling thread: for work too small to hand to a pool.
inline void serial_for(void*, void (*fn)(void*, size_t), size_t total, void* data) {
  for (size_t i = 0; i < total; ++i) fn(data, i);
}

// The CPU kernel, compiled once per instruction set (cpu_kernel.cpp) and chosen at run time.
#define HQX_DECLARE_CPU(ns)                                              \
  namespace ns {                                                         \
  bool matmul(const Problem& p, const Runner& runner);                   \
  bool lora_add(const Problem& p, const Runner& runner);                 \
  bool half_matmul(const Problem& p, const Runner& runner);              \
  void swiglu(const float* full, int64_t M, int64_t half, float* out,     \
              const Runner& runner);                                     \
  void dequantize(const Problem& p, float* out);                         \
  }
HQX_DECLARE_CPU(baseline)
HQX_DECLARE_CPU(avx2)
#undef HQX_DECLARE_CPU

}  // namespace hqx
