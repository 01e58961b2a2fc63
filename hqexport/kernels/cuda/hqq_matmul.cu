// CUDA kernel of hqexport::HQQMatMul: Y = A @ dequant(W)^T (+ bias), dequant exactly HQQ's (docs/kernels.md).
//
// M <= 4 (decode): one warp per output row; each lane reads whole 32-bit words of the packed row, unpacks and
// dequantizes them in registers and accumulates in fp32; a warp shuffle sums the lanes.
// M > 4 (prefill): 64x64 output tiles; each K-step of 32 dequantizes a 64x32 weight tile into shared memory next
// to the A tile, and every thread accumulates a 4x4 block.
// Dequantization rounds like the reference: one fp32 operation (no contraction: __fsub_rn / __fmul_rn) rounded to
// the compute dtype, which equals fp16/bf16 arithmetic since fp32 has more than 2p+2 significand bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "problem.h"

namespace hqx {
namespace {

constexpr int kGemvWarps = 8;  // output rows per block of the GEMV kernel
constexpr int kMaxGemvRows = 4;
constexpr int kTile = 64;      // tiled kernel: 64x64 outputs per block
constexpr int kTileK = 32;
constexpr int kTileThreads = 256;

template <DType D>
__device__ __forceinline__ float load_meta(const void* p, int64_t i) {
  if constexpr (D == DType::F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (D == DType::F16) {
    return __half2float(static_cast<const __half*>(p)[i]);
  } else {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

__device__ __forceinline__ float round_f16(float x) { return __half2float(__float2half_rn(x)); }
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// w = rnd(rnd(code - zero) * scale) in META, then cast to fp16 when A is fp16.
template <DType META>
__device__ __forceinline__ float dequant(float code, float zero, float scale, bool to_f16) {
  float w;
  if constexpr (META == DType::F32) {
    w = __fmul_rn(__fsub_rn(code, zero), scale);
  } else if constexpr (META == DType::F16) {
    w = round_f16(__fmul_rn(round_f16(__fsub_rn(code, zero)), scale));
  } else {
    w = round_bf16(__fmul_rn(round_bf16(__fsub_rn(code, zero)), scale));
  }
  return (to_f16 && META != DType::F16) ? round_f16(w) : w;
}

__device__ __forceinline__ float load_act(const void* p, int64_t i, bool half) {
  return half ? __half2float(static_cast<const __half*>(p)[i]) : static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_act(void* p, int64_t i, float v, bool half) {
  if (half) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// Walks the groups of consecutive flat indices without a division per element.
struct GroupCursor {
  int64_t group, offset;  // axis 1: group f / g and f % g; axis 0: group f % G
  __device__ GroupCursor(const Problem& p, int64_t f)
      : group(p.axis == 1 ? f / p.group_size : f % p.groups), offset(p.axis == 1 ? f % p.group_size : 0) {}
  __device__ __forceinline__ void next(const Problem& p) {
    if (p.axis == 1) {
      if (++offset == p.group_size) {
        offset = 0;
        ++group;
      }
    } else if (++group == p.groups) {
      group = 0;
    }
  }
};

// Word: W's word (WordOf<BITS>), or uint32_t for uint8 rows read 4 bytes at a time; PER codes per Word.
template <DType META, int BITS, typename Word, int PER>
__global__ void gemv_kernel(Problem p) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (n >= p.N) return;
  const bool half = p.act == DType::F16;
  const Word* row = reinterpret_cast<const Word*>(static_cast<const char*>(p.W) + n * p.row_words * word_bytes(BITS));
  const int64_t words = (p.K + PER - 1) / PER;
  float acc[kMaxGemvRows] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t w = lane; w < words; w += 32) {
    const uint32_t v = static_cast<uint32_t>(__ldg(row + w));
    const int64_t k0 = w * PER;
    GroupCursor cursor(p, n * p.K + k0);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int64_t k = k0 + j;
      if (k < p.K) {
        const float code = static_cast<float>((v >> (BITS * j)) & ((1u << BITS) - 1u));
        const float wv = dequant<META>(code, load_meta<META>(p.zero, cursor.group), load_meta<META>(p.scale, cursor.group), half);
#pragma unroll
        for (int m = 0; m < kMaxGemvRows; ++m) {
          if (m < p.M) acc[m] = fmaf(wv, load_act(p.A, m * p.K + k, half), acc[m]);
        }
      }
      cursor.next(p);
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxGemvRows; ++m) {
    float s = acc[m];
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (lane == 0 && m < p.M) {
      if (p.bias != nullptr) s += load_act(p.bias, n, half);
      store_act(p.Y, m * p.N + n, s, half);
    }
  }
}

template <int BITS>
__device__ __forceinline__ uint32_t code_at(const Problem& p, int64_t n, int64_t k) {
  constexpr int per = codes_per_word(BITS);
  const uint32_t word = static_cast<const WordOf<BITS>*>(p.W)[n * p.row_words + k / per];
  return (word >> (BITS * (k % per))) & ((1u << BITS) - 1u);
}

template <DType META, int BITS>
__global__ void __launch_bounds__(kTileThreads) tiled_kernel(Problem p) {
  __shared__ float a_tile[kTileK][kTile + 4];  // [k][m]
  __shared__ float w_tile[kTileK][kTile + 4];  // [k][n]
  const bool half = p.act == DType::F16;
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < p.K; k0 += kTileK) {
    for (int e = tid; e < kTile * kTileK; e += kTileThreads) {
      const int r = e / kTileK, c = e % kTileK;  // consecutive threads walk k: coalesced A reads
      const int64_t m = m0 + r, n = n0 + r, k = k0 + c;
      a_tile[c][r] = (m < p.M && k < p.K) ? load_act(p.A, m * p.K + k, half) : 0.f;
      float wv = 0.f;
      if (n < p.N && k < p.K) {
        const int64_t f = n * p.K + k;
        const int64_t g = p.axis == 1 ? f / p.group_size : f % p.groups;
        wv = dequant<META>(static_cast<float>(code_at<BITS>(p, n, k)), load_meta<META>(p.zero, g),
                           load_meta<META>(p.scale, g), half);
      }
      w_tile[c][r] = wv;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kTileK; ++c) {
      float a[4], w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = a_tile[c][ty * 4 + i];
        w[i] = w_tile[c][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (m < p.M && n < p.N) {
        float y = acc[i][j];
        if (p.bias != nullptr) y += load_act(p.bias, n, half);
        store_act(p.Y, m * p.N + n, y, half);
      }
    }
  }
}

template <DType META, int BITS>
void launch(const Problem& p, cudaStream_t stream) {
  if (p.M <= kMaxGemvRows) {
    const dim3 grid(static_cast<unsigned>((p.N + kGemvWarps - 1) / kGemvWarps)), block(32 * kGemvWarps);
    const bool aligned = p.row_words % 4 == 0 && reinterpret_cast<uintptr_t>(p.W) % 4 == 0;
    constexpr int per = codes_per_word(BITS);
    if constexpr (word_bytes(BITS) == 1) {  // byte words: read 4 at a time where the rows allow it
      if (aligned) {
        gemv_kernel<META, BITS, uint32_t, 4 * per><<<grid, block, 0, stream>>>(p);
        return;
      }
    }
    gemv_kernel<META, BITS, WordOf<BITS>, per><<<grid, block, 0, stream>>>(p);
  } else {
    const dim3 grid(static_cast<unsigned>((p.N + kTile - 1) / kTile), static_cast<unsigned>((p.M + kTile - 1) / kTile));
    tiled_kernel<META, BITS><<<grid, kTileThreads, 0, stream>>>(p);
  }
}

template <DType META>
void launch_bits(const Problem& p, cudaStream_t stream) {
  switch (p.bits) {
    case 1:
      return launch<META, 1>(p, stream);
    case 2:
      return launch<META, 2>(p, stream);
    case 3:
      return launch<META, 3>(p, stream);
    case 4:
      return launch<META, 4>(p, stream);
    default:
      return launch<META, 8>(p, stream);
  }
}

}  // namespace

const char* cuda_matmul(const Problem& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.meta) {
    case DType::F16:
      launch_bits<DType::F16>(p, s);
      break;
    case DType::BF16:
      launch_bits<DType::BF16>(p, s);
      break;
    default:
      launch_bits<DType::F32>(p, s);
  }
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

}  // namespace hqx
